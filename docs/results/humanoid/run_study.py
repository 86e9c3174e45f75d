"""The Humanoid study from stage 1 to the reporting runs, in the protocol's order, resumable, committing as it goes.

    python docs/results/humanoid/run_study.py            # run (or resume) every remaining stage
    python docs/results/humanoid/run_study.py --commit   # and commit each config before its runs, and each archive

Stages (PROTOCOL.md, amendments 1, 2 and 4; stage 0 must have been read and stage1-tune.toml written):
1. stage1-tune.toml: the tuning grid (`dopr experiment`, resumable: finished runs are reused).
2. select_tuned.py on the tuning runs; while it asks for grid extensions, stage1-extend.toml is written with them
   (its optims grow; every other key is stage1-tune.toml's), committed, and run; then the rule is read again.
3. Once the selection is final, humanoid.toml is written with the reporting optims (every other key is
   stage1-tune.toml's but seeds 0-7, an evaluation every 2500 steps and the output folder), committed before any
   of its runs, and run.
Every stage's finished runs are archived (`dopr archive`, no weights) to archive/STAGE every ten minutes while it
runs and once it ends, and with --commit the archive is committed, so that a lost machine loses at most the runs in
flight. A config already written is never rewritten: if the selection now asks for something else, it stops.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import subprocess
import sys
import time
import tomllib

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, HERE)
from select_tuned import selection  # noqa: E402 -- the committed rule, from its own file

OUT = os.path.join("out", "humanoid")
TUNE, EXTEND, REPORT = "stage1-tune", "stage1-extend", "report"
CONFIG = {TUNE: "stage1-tune.toml", EXTEND: "stage1-extend.toml", REPORT: "humanoid.toml"}
ARCHIVE_EVERY_S = 600


def git(*args: str) -> str:
    for _ in range(30):  # another git command may hold the index for a moment
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        if done.returncode == 0:
            return done.stdout
        if "index.lock" not in done.stderr:
            raise RuntimeError(f"git {' '.join(args)}: {done.stderr.strip()}")
        time.sleep(2)
    raise RuntimeError(f"git {' '.join(args)}: the index stayed locked")


def commit(path: str, message: str, enabled: bool) -> None:
    """Commit `path` alone (whatever else is staged stays staged), if it changed."""
    if not enabled:
        return
    git("add", "-A", "--", path)
    if git("status", "--porcelain", "--", path).strip():
        git("commit", "-q", "-m", message, "--only", "--", path)
        print(f"[study] committed {os.path.relpath(path, ROOT)}: {message}", flush=True)


def archive(stage: str, enabled: bool) -> None:
    runs = sorted(glob.glob(os.path.join(ROOT, OUT, stage, "runs", "*")))
    if not runs:
        return
    target = os.path.join(HERE, "archive", stage)
    subprocess.run([sys.executable, "-m", "dopr", "archive", *runs, "--out", target], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    finished = len(next(os.walk(target))[1]) if os.path.isdir(target) else 0
    commit(target, f"humanoid {stage}: {finished} finished runs archived (run_study.py)", enabled)


def run_stage(stage: str, commit_archive: bool) -> None:
    """`dopr experiment` on the stage's config, archiving its finished runs while it runs."""
    config = os.path.join(HERE, CONFIG[stage])
    while subprocess.run(["pgrep", "-f", f"dopr experiment --config .*{CONFIG[stage]}"],
                         capture_output=True).returncode == 0:
        print(f"[study] another `dopr experiment` runs {CONFIG[stage]}: waiting for it to end", flush=True)
        time.sleep(ARCHIVE_EVERY_S)
        archive(stage, commit_archive)
    log = open(os.path.join(ROOT, OUT, f"{stage}.log"), "a")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two runs, one core each (PROTOCOL.md: 2-core machine)
    print(f"[study] {stage}: dopr experiment --config {os.path.relpath(config, ROOT)} (log {log.name})", flush=True)
    proc = subprocess.Popen(["dopr", "experiment", "--config", config, "--backend", "ray", "--max-parallel", "2",
                             "--workers", "1"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    while True:
        try:
            rc = proc.wait(timeout=ARCHIVE_EVERY_S)
            break
        except subprocess.TimeoutExpired:
            archive(stage, commit_archive)
    archive(stage, commit_archive)
    if rc != 0:
        raise SystemExit(f"[study] {stage}: dopr experiment exited with {rc}; see {log.name}")


def derived_config(header: str, **changes: object) -> str:
    """stage1-tune.toml with its header comment replaced and the `changes` keys rewritten; nothing else differs."""
    text = open(os.path.join(HERE, CONFIG[TUNE])).read()
    body = text[text.index("\ntasks = ") + 1:]
    for key, value in changes.items():
        if key == "optims":
            new = "optims = [\n" + "".join(f'    "{o}",\n' for o in value) + "]"
            body, n = re.subn(r"^optims = \[\n(?:    .*\n)*\]", new, body, flags=re.M)
        else:
            body, n = re.subn(rf"^{key} = .*$", f"{key} = {value!r}".replace("'", '"'), body, flags=re.M)
        assert n == 1, f"{CONFIG[TUNE]} has no single {key!r} line"
    comment = "".join(f"# {line}\n".replace("# \n", "#\n") for line in header.strip().split("\n"))
    result = comment + body
    tune, derived = tomllib.loads(text), tomllib.loads(result)
    assert {k: v for k, v in derived.items() if k not in changes} == {k: v for k, v in tune.items()
                                                                        if k not in changes}
    return result


def write_once(stage: str, text: str, optims: list[str], enabled: bool) -> None:
    """Write the stage's config, or check that the one already written asks for the same optims."""
    path = os.path.join(HERE, CONFIG[stage])
    if os.path.exists(path):
        written = tomllib.load(open(path, "rb"))["optims"]
        if written != optims:
            raise SystemExit(f"[study] {CONFIG[stage]} is already written with other optims than the rule now asks "
                             f"for:\n  written: {written}\n  asked: {optims}\nA committed config is not rewritten; "
                             "see PROTOCOL.md.")
        return
    open(path, "w").write(text)
    print(f"[study] wrote {CONFIG[stage]}", flush=True)
    commit(path, f"humanoid: {CONFIG[stage]} written by run_study.py from the committed rule, before its runs",
           enabled)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--commit", action="store_true",
                        help="commit each config before its runs and each stage's archive as runs finish")
    args = parser.parse_args()
    os.makedirs(os.path.join(ROOT, OUT), exist_ok=True)
    run_stage(TUNE, args.commit)
    while True:
        stages = [os.path.join(ROOT, OUT, s) for s in (TUNE, EXTEND) if os.path.isdir(os.path.join(ROOT, OUT, s))]
        text, extensions, final = selection(stages)
        print(text, flush=True)
        if final is not None:
            break
        if not extensions:
            raise SystemExit("[study] the tuning grids are incomplete after their stage ran: a run failed? "
                             "Run the stage again (finished runs are reused).")
        extend_path = os.path.join(HERE, CONFIG[EXTEND])
        before = tomllib.load(open(extend_path, "rb"))["optims"] if os.path.exists(extend_path) else []
        if set(extensions) <= set(before):
            raise SystemExit(f"[study] the rule asks again for {extensions}, already in {CONFIG[EXTEND]}: "
                             "their runs did not finish; run the stage again.")
        optims = before + [e for e in extensions if e not in before]
        if before:  # the extension grows: the committed file is the record of each round, rewritten only by growing
            os.remove(extend_path)
        header = ("Grid extensions of stage 1 (PROTOCOL.md, amendment 1 and the session-9 note), written by\n"
                  "run_study.py from select_tuned.py's output on the tuning runs, before any of these runs.\n"
                  "Every key but optims and out is stage1-tune.toml's. Each round of the rule adds its extensions.\n"
                  "Run (resumable): python docs/results/humanoid/run_study.py")
        write_once(EXTEND, derived_config(header, optims=optims, out=os.path.join(OUT, EXTEND)), optims, args.commit)
        run_stage(EXTEND, args.commit)
    header = ("Reporting stage of PROTOCOL.md: the eight tuned arms (select_tuned.py's final output on stage 1 and\n"
              "its extensions), training seeds 0-7, evaluated every 2500 steps on 50 episodes (amendment 1);\n"
              "every other key is stage1-tune.toml's. Written by run_study.py before any reporting run.\n"
              "Run (resumable): python docs/results/humanoid/run_study.py")
    write_once(REPORT, derived_config(header, optims=final, seeds=8, seed_offset=0, eval_every=2500,
                                      out=os.path.join(OUT, REPORT)), final, args.commit)
    run_stage(REPORT, args.commit)
    print("[study] done: dopr report docs/results/humanoid/archive/report/* --out out/humanoid/report/report",
          flush=True)


if __name__ == "__main__":
    main()
