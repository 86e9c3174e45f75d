"""The study's remaining stages in the protocol's order, resumable, committing as it goes.

    python docs/results/humanoid/run_study.py --commit                  # Humanoid from stage 1, then Walker2d
    python docs/results/humanoid/run_study.py --tasks walker2d --commit  # Walker2d only

Each stage is applied mechanically by the committed rules (PROTOCOL.md): nothing is chosen here.
Humanoid (stage 0 read, stage1-tune.toml written):
1. stage1-tune.toml: the tuning grid (`dopr experiment`: finished runs are reused).
2. select_tuned.py on the tuning runs; while it asks for grid extensions, stage1-extend.toml is written with them
   (its optims grow; every other key is stage1-tune.toml's), committed, and run; then the rule is read again.
3. Once the selection is final, humanoid.toml is written with the reporting optims (every other key is the tuning
   config's but seeds 0-7, an evaluation every 2500 steps and the output folder), committed, then run.
Walker2d (amendment 3 and the session-11 note), the same after two more steps:
0. its expert (`dopr expert train --task walker2d ... --stop-at-return 4000`, resumed; trains nothing once met),
   measured on the 50 evaluation episodes (its record committed to walker2d-expert/); then stage 0:
   walker2d-stage0-demosN.toml for N = 5, 10, 25, 50 in order, stopping at the first count whose better AdamW lies
   in 20-80% of the expert's return (a count between two that jump over the band: 7, 15 or 35);
   walker2d-stage1-tune.toml is then written from the chosen count's config (the four arms, lrs 1e-4..3e-3).
Every stage's finished runs are archived (`dopr archive`, no weights) to archive/STAGE every ten minutes while it
runs and when it ends; with --commit, each config is committed before its runs and each archive as it grows, so a
lost machine loses at most the runs in flight. A written config is never rewritten with other optims: if the rule
then asks for something else, the driver stops and says so.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, HERE)
from select_tuned import ALTERNATIVE, DOPR_DEFAULT, GRID, lr_text, selection  # noqa: E402 -- the committed rule

ARCHIVE_EVERY_S = 600
POLL_S = 30  # for another process's end
COUNTS = (5, 10, 25, 50)  # stage 0's demonstration counts, in the order run
BETWEEN = {(5, 10): 7, (10, 25): 15, (25, 50): 35}  # the count added where two neighbours jump over the band
BAND = (0.2, 0.8)  # of the expert's return on the evaluation episodes


@dataclass(frozen=True)
class Study:
    task: str
    prefix: str  # of its config files and archives: "" for Humanoid, "walker2d-" for Walker2d
    bases: tuple[str, ...]  # the base optimizers tuned and reported, each with its DoPr arm
    stop_at_return: float  # the expert's goal (with every evaluation episode at the horizon)
    # where the recorded expert's training was stopped and resumed: a resume starts a new episode, so a retraining
    # repeats the recorded actor only if it stops at the same steps (Humanoid's, session 10: at 40k)
    expert_resumed_at: tuple[int, ...] = ()

    def config(self, stage: str) -> str:
        return os.path.join(HERE, f"{self.task}.toml" if stage == "report" else f"{self.prefix}{stage}.toml")

    def out(self, stage: str) -> str:
        return os.path.join("out", self.task, stage)

    def archive(self, stage: str) -> str:
        return os.path.join(HERE, "archive", f"{self.prefix}{stage}")

    def expert_record(self) -> str:
        return os.path.join(HERE, f"{self.prefix}expert")


STUDIES = {"humanoid": Study("humanoid", "", ("adamw", "muon", "signum", "adamuon"), 5000, (40000,)),
           "walker2d": Study("walker2d", "walker2d-", ("adamw",), 4000)}


def say(message: str) -> None:
    print(f"[study] {time.strftime('%H:%M')} {message}", flush=True)


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
        say(f"committed {os.path.relpath(path, ROOT)}: {message}")


def archive(study: Study, stage: str, enabled: bool) -> None:
    runs = sorted(glob.glob(os.path.join(ROOT, study.out(stage), "runs", "*")))
    if not runs:
        return
    target = study.archive(stage)
    subprocess.run([sys.executable, "-m", "dopr", "archive", *runs, "--out", target], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    finished = len(next(os.walk(target))[1]) if os.path.isdir(target) else 0
    commit(target, f"{study.task} {stage}: {finished} finished runs archived (run_study.py)", enabled)


def wait_for_other(pattern: str, what: str, meanwhile=lambda: None) -> None:
    """Wait while another process started by hand does this stage's work (it holds the folder's lock)."""
    waited = 0
    while subprocess.run(["pgrep", "-f", pattern], capture_output=True).returncode == 0:
        if waited % ARCHIVE_EVERY_S == 0:
            say(f"another process runs {what}: waiting for it to end")
        time.sleep(POLL_S)  # polled often, so that the study goes on soon after
        waited += POLL_S
        if waited % ARCHIVE_EVERY_S == 0:
            meanwhile()


def run_stage(study: Study, stage: str, commit_archive: bool) -> None:
    """`dopr experiment` on the stage's config, archiving its finished runs while it runs."""
    config = study.config(stage)
    wait_for_other(f"dopr experiment --config .*{os.path.basename(config)}", os.path.basename(config),
                   lambda: archive(study, stage, commit_archive))
    os.makedirs(os.path.join(ROOT, "out", study.task), exist_ok=True)
    log = open(os.path.join(ROOT, "out", study.task, f"{stage}.log"), "a")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two runs, one core each (the 2-core machine)
    say(f"{study.task} {stage}: dopr experiment --config {os.path.relpath(config, ROOT)} (log {log.name})")
    # --archive: the runs already archived (committed) are not run again, e.g. after the machine was lost
    proc = subprocess.Popen(["dopr", "experiment", "--config", config, "--backend", "ray", "--max-parallel", "2",
                             "--workers", "1", "--archive", study.archive(stage)], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    while True:
        try:
            rc = proc.wait(timeout=ARCHIVE_EVERY_S)
            break
        except subprocess.TimeoutExpired:
            archive(study, stage, commit_archive)
    archive(study, stage, commit_archive)
    if rc != 0:
        raise SystemExit(f"[study] {study.task} {stage}: dopr experiment exited with {rc}; see {log.name}")


def derived_config(base: str, header: str, **changes: object) -> str:
    """The config file `base` with its header comment replaced and the `changes` keys rewritten; nothing else
    differs (checked)."""
    text = open(base).read()
    body = text[text.index("\ntasks = ") + 1:]
    for key, value in changes.items():
        if key == "optims":
            new = "optims = [\n" + "".join(f'    "{o}",\n' for o in value) + "]"
            body, n = re.subn(r"^optims = \[(?:\n(?:    .*\n)*|.*)\]$", new, body, flags=re.M)
        else:
            body, n = re.subn(rf"^{key} = .*$", f"{key} = {value!r}".replace("'", '"'), body, flags=re.M)
        assert n == 1, f"{os.path.basename(base)} has no single {key!r} line"
    comment = "".join(f"# {line}\n".replace("# \n", "#\n") for line in header.strip().split("\n"))
    result = comment + body
    old, new = tomllib.loads(text), tomllib.loads(result)
    assert {k: v for k, v in new.items() if k not in changes} == {k: v for k, v in old.items() if k not in changes}
    return result


def write_once(path: str, text: str, enabled: bool) -> None:
    """Write a stage's config, or check that the one already written asks for the same optims."""
    optims = tomllib.loads(text)["optims"]
    if os.path.exists(path):
        written = tomllib.load(open(path, "rb"))["optims"]
        if written != optims:
            raise SystemExit(f"[study] {os.path.basename(path)} is already written with other optims than the rule "
                             f"now asks for:\n  written: {written}\n  asked: {optims}\nA committed config is not "
                             "rewritten; see PROTOCOL.md.")
        return
    open(path, "w").write(text)
    say(f"wrote {os.path.relpath(path, ROOT)}")
    commit(path, f"{os.path.basename(path)} written by run_study.py from the committed rule, before its runs",
           enabled)


def sha256(path: str) -> str:
    import hashlib

    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def train_expert(study: Study, enabled: bool) -> str:
    """Train (or resume) the expert to its goal; returns its folder. The first expert's actor is recorded by its
    sha256 (record/actor.sha256, `sha256sum -c` format); an expert trained again (the machine lost) must be that
    actor bit for bit, since every archived run learned from its demonstrations: else the driver stops."""
    expert = os.path.join(ROOT, "out", "experts", study.task)
    wait_for_other(f"dopr expert train --task {study.task}", f"{study.task}'s expert training")
    say(f"{study.task} expert: training (or resuming) to mean return >= {study.stop_at_return:.0f}")
    from dopr.envs.sac_trainer import read_metrics

    os.makedirs(os.path.dirname(expert), exist_ok=True)
    rows = read_metrics(expert)
    trained = rows[-1]["env_steps"] if rows else 0
    stops = [s for s in study.expert_resumed_at if s > trained] + [1000000]  # the recorded run's stops, then the goal
    with open(os.path.join(ROOT, "out", "experts", f"{study.task}.log"), "a") as log:
        for steps in stops:
            subprocess.run(["dopr", "expert", "train", "--task", study.task, "--steps", str(steps),
                            "--stop-at-return", str(study.stop_at_return), "--threads", "2", "--out", expert],
                           cwd=ROOT, check=True, stdout=log, stderr=subprocess.STDOUT)
    actual = sha256(os.path.join(expert, "actor.safetensors"))
    recorded = os.path.join(study.expert_record(), "actor.sha256")
    if not os.path.exists(recorded):
        os.makedirs(study.expert_record(), exist_ok=True)
        with open(recorded, "w") as f:
            f.write(f"{actual}  actor.safetensors\n")
        commit(recorded, f"{study.task} expert: its actor's sha256", enabled)
    elif open(recorded).read().split()[0] != actual:
        raise SystemExit(f"[study] {study.task} expert: the actor trained now (sha256 {actual}) is not the recorded "
                         f"one ({recorded}); the archived runs learned from the recorded one's demonstrations. "
                         "Stopped for a decision to be written in PROTOCOL.md.")
    else:
        say(f"{study.task} expert: the recorded actor, bit for bit (sha256 {actual[:12]}...)")
    return expert


def stage_done(study: Study, stage: str) -> bool:
    """Whether the stage's config is written and its archive holds every one of its runs, finished (as `dopr
    experiment --archive` finds them)."""
    from dopr.eval.experiment import ExperimentConfig, archived_run, planned_runs

    if not os.path.exists(study.config(stage)):
        return False
    cfg = ExperimentConfig.from_file(study.config(stage))
    cfg.archive = study.archive(stage)
    return all(archived_run(cfg, run) for run in planned_runs(cfg))


def expert_and_stage0(study: Study, enabled: bool) -> str:
    """Train (or resume) the expert to its goal, measure it, run stage 0; returns the chosen count's config."""
    from dopr.envs.measure_experts import measure_success
    from dopr.eval.comparison import cells_from_runs

    expert = train_expert(study, enabled)
    record = study.expert_record()
    measured_path = os.path.join(record, "measured-50-episodes.json")
    if not os.path.exists(measured_path):
        say(f"{study.task} expert: measuring it on the 50 evaluation episodes (seeds 100000-100049)")
        measured = measure_success(study.task, episodes=50, first_seed=100000, progress=False,
                                   expert_path=expert)
        os.makedirs(record, exist_ok=True)
        for name in ("expert.json", "metrics.jsonl", "returns.png"):  # the README shows the curve
            shutil.copyfile(os.path.join(expert, name), os.path.join(record, name))
        with open(measured_path, "w") as f:
            json.dump({k: measured[k] for k in ("episodes", "successes", "mean_return", "return_sd", "mean_steps",
                                                "failed_seeds", "returns")}, f, indent=1)
        commit(record, f"{study.task} expert: its record and its return on the 50 evaluation episodes", enabled)
    expert_return = json.load(open(measured_path))["mean_return"]
    low, high = (f * expert_return for f in BAND)
    say(f"{study.task} expert: return {expert_return:.0f}; stage 0's band {low:.0f}-{high:.0f}")

    verdicts: dict[int, str] = {}
    while True:
        action, n = stage0_next(verdicts)
        if action == "chosen":
            return study.config(f"stage0-demos{n}")
        if action == "stop":
            raise SystemExit(f"[study] {study.task} stage 0: {n} ({verdicts}); the protocol says nothing more: "
                             "stopped for a decision to be written in PROTOCOL.md")
        stage = f"stage0-demos{n}"
        if not os.path.exists(study.config(stage)):  # a count between two that jumped over the band
            header = (f"{study.task} stage 0, the count added between two that jump over the band (PROTOCOL.md, "
                      f"notes of session 8),\nwritten by run_study.py before any of its runs; every key but demos "
                      f"and out is the 5-demonstration config's.")
            write_once(study.config(stage), derived_config(study.config("stage0-demos5"), header, demos=n,
                                                           out=study.out(stage)), enabled)
        run_stage(study, stage, enabled)
        cells = cells_from_runs(sorted(glob.glob(os.path.join(study.archive(stage), "*"))))
        best = max(sum(c.values()) / len(c.values()) for c in cells)
        verdicts[n] = "in" if low <= best <= high else ("below" if best < low else "above")
        say(f"{study.task} stage 0, {n} demonstrations: better AdamW {best:.0f} ({best / expert_return:.0%} of the "
            f"expert's): {verdicts[n]} the band")


def stage0_next(verdicts: dict[int, str]) -> tuple[str, int | str]:
    """Stage 0's rule (PROTOCOL.md and its notes of sessions 8 and 11) on the verdicts so far ({count: "below", "in"
    or "above" the band}): ("run", count), ("chosen", count) or ("stop", why)."""
    inside = [n for n, v in verdicts.items() if v == "in"]
    if inside:
        return "chosen", min(inside)
    above = sorted(n for n, v in verdicts.items() if v == "above")
    if not above:
        missing = [n for n in COUNTS if n not in verdicts]
        return ("run", missing[0]) if missing else ("stop", f"even {COUNTS[-1]} demonstrations lie below the band")
    below = [n for n, v in verdicts.items() if v == "below" and n < above[0]]
    if not below:
        return "stop", f"{above[0]} demonstrations, the fewest run, lie above the band already"
    between = BETWEEN.get((max(below), above[0]))
    if between is None:
        return "stop", f"{max(below)} lie below the band and {above[0]} above it, with no count between in the protocol"
    return "run", between  # run once: its verdict then makes it a "below" or the first "above"


def tuning_optims(study: Study) -> list[str]:
    """Stage 1's optims: each base and its DoPr arm in amendment 2's default form, and the two second forms,
    over the lr grid."""
    arms = [o for b in study.bases for o in (b, f"dopr-{b}:{DOPR_DEFAULT}")] + list(ALTERNATIVE.values())
    return [f"{arm.split(':')[0]}:lr={lr_text(lr)}" + "".join(f":{s}" for s in arm.split(":")[1:])
            for arm in arms for lr in GRID]


def tune_and_report(study: Study, enabled: bool) -> None:
    if not stage_done(study, "report"):  # the expert's demonstrations are collected for any run still to do
        train_expert(study, enabled)
    run_stage(study, "stage1-tune", enabled)
    if os.path.exists(study.config("stage1-extend")):  # written before an interruption: its runs finish first
        run_stage(study, "stage1-extend", enabled)
    while True:
        # the archives hold every finished run (run_stage archives when the stage ends), whatever the machine kept
        stages = [study.archive(s) for s in ("stage1-tune", "stage1-extend") if os.path.isdir(study.archive(s))]
        text, extensions, final = selection(stages)
        print(text, flush=True)
        if final is not None:
            break
        if not extensions:
            raise SystemExit("[study] the tuning grids are incomplete after their stage ran: a run failed? "
                             "Run the stage again (finished runs are reused).")
        extend = study.config("stage1-extend")
        before = tomllib.load(open(extend, "rb"))["optims"] if os.path.exists(extend) else []
        if set(extensions) <= set(before):  # their stage ran to its end (before the loop or in the last round)
            raise SystemExit(f"[study] the rule asks again for {extensions}, already in {os.path.basename(extend)}, "
                             "whose runs all finished: a run failed? See its log.")
        header = (f"Grid extensions of {study.task}'s stage 1 (PROTOCOL.md, amendment 1 and the session-9 note), "
                  "written by\nrun_study.py from select_tuned.py's output on the tuning runs, before any of these "
                  "runs; each round of the rule\nadds its extensions. Every key but optims and out is "
                  f"{os.path.basename(study.config('stage1-tune'))}'s.\n"
                  "Run (resumable): python docs/results/humanoid/run_study.py --commit")
        if before:  # the extension grows: each round's file is in git's history
            os.remove(extend)
        write_once(extend, derived_config(study.config("stage1-tune"), header,
                                          optims=before + [e for e in extensions if e not in before],
                                          out=study.out("stage1-extend")), enabled)
        run_stage(study, "stage1-extend", enabled)
    header = (f"Reporting stage of {study.task} (PROTOCOL.md): the tuned arms (select_tuned.py's final output on "
              "stage 1 and its\nextensions), training seeds 0-7, evaluated every 2500 steps on 50 episodes "
              "(amendment 1); every other key is\nthe tuning config's. Written by run_study.py before any "
              "reporting run.\nRun (resumable): python docs/results/humanoid/run_study.py --commit")
    write_once(study.config("report"), derived_config(study.config("stage1-tune"), header, optims=final, seeds=8,
                                                      seed_offset=0, eval_every=2500, out=study.out("report")),
               enabled)
    run_stage(study, "report", enabled)
    say(f"{study.task} done: dopr report {os.path.relpath(study.archive('report'), ROOT)}/* --out "
        f"out/{study.task}/report/report")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--tasks", nargs="+", default=list(STUDIES), choices=list(STUDIES),
                        help="the studies to run, in this order (default: humanoid walker2d)")
    parser.add_argument("--commit", action="store_true",
                        help="commit each config before its runs and each stage's archive as runs finish")
    args = parser.parse_args()
    for task in args.tasks:
        study = STUDIES[task]
        if not os.path.exists(study.config("stage1-tune")):
            chosen = expert_and_stage0(study, args.commit)
            header = (f"{task} stage 1 (PROTOCOL.md, amendments 2 and 3), written by run_study.py once stage 0 was "
                      f"read, before\nany of its runs: {', '.join(study.bases)} and DoPr in amendment 2's default "
                      "form, AdamW with weight decay 1e-2 and\nDoPr-AdamW in the paper's form, each over lr "
                      f"{{1e-4, 3e-4, 1e-3, 3e-3}}, tuning seeds 100-101, the final checkpoint\nevaluated on 50 "
                      f"episodes. Every other key is {os.path.basename(chosen)}'s (the count stage 0 chose).\n"
                      "Run (resumable): python docs/results/humanoid/run_study.py --commit")
            write_once(study.config("stage1-tune"), derived_config(chosen, header, optims=tuning_optims(study),
                                                                   eval_every=10000, out=study.out("stage1-tune")),
                       args.commit)
        tune_and_report(study, args.commit)


if __name__ == "__main__":
    main()
