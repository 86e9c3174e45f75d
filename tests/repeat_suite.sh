#!/bin/bash
# The README's test command N times in a row on one commit (issue 17: "the suite 20 times in a row"), in the
# checkout this script lives in, with the venv given. Resumable: a log that already names the same commit is
# continued (run numbers go on), so the count survives a machine restart; another commit starts a new log.
# Between runs it waits while $LOG_DIR/pause exists (a quiet sitting for a measurement), so no test is frozen
# mid-run. Usage: tests/repeat_suite.sh N LOG_DIR [VENV]   e.g.  nohup setsid tests/repeat_suite.sh 20 /tmp/suite20 &
# (setsid/nohup start pytest with SIGINT ignored; tests/conftest.py restores it for the Ctrl-C tests.)
set -u
n=$1; logs=$2; venv=${3:-.venv}
cd "$(dirname "$0")/.."
. "$venv/bin/activate"
# the package is the checkout itself, imported as `dopr`: whatever this clone's folder is called, and whichever
# checkout the venv's editable install points at, import this one
link=$(mktemp -d); trap 'rm -rf "$link"' EXIT; ln -s "$(pwd)" "$link/dopr"; export PYTHONPATH="$link"
mkdir -p "$logs"
commit=$(git rev-parse HEAD)
if [ "$(head -1 "$logs/suite.log" 2>/dev/null)" != "commit $commit" ]; then
  echo "commit $commit" > "$logs/suite.log"
fi
first=$(( $(grep -c '^run ' "$logs/suite.log") + 1 ))
for i in $(seq "$first" "$n"); do
  while [ -e "$logs/pause" ]; do sleep 5; done
  start=$(date +%s)
  python -m pytest -q -p no:cacheprovider > "$logs/run$i.log" 2>&1; rc=$?
  echo "run $i rc=$rc $(( $(date +%s) - start ))s $(date +%H:%M) $(tail -1 "$logs/run$i.log")" >> "$logs/suite.log"
done
echo "done: $(grep -c 'rc=0' "$logs/suite.log") of $(grep -c '^run ' "$logs/suite.log") green" >> "$logs/suite.log"
