"""--backend ray: `dopr experiment`'s runs as Ray tasks and `dopr eval`'s simulators as Ray actors.

A real local Ray (2 CPUs, listening on 127.0.0.1 only) and real processes: Ray workers killed with SIGKILL
or frozen with SIGSTOP, a `dopr experiment` driver killed with SIGKILL. Marked `ray` (deselected by default,
needs the ray extra): python -m pytest -q -m ray
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests import test_eval
from tests.test_eval import HORIZON, TASK, _fingerprint, _KillingPolicy, _NoiseDrawingPolicy

# test_eval's fixtures: a real checkpoint, and its evaluation by the local pool that every Ray one must reproduce
checkpoint, reference = test_eval.checkpoint, test_eval.reference

ray_marked = pytest.mark.ray


def _short_temp_dir():
    # Ray's socket paths under its temp dir must fit in 107 bytes: pytest's tmp_path is too deep
    return tempfile.TemporaryDirectory(prefix="dopr-ray-", dir="/tmp", ignore_cleanup_errors=True)


@pytest.fixture
def ray_temp_dir():
    with _short_temp_dir() as temp:
        yield temp


@pytest.fixture(scope="module")
def local_ray():
    """The local Ray that `--backend ray` starts without --address (dopr.ray_cluster), in this test's own temp dir."""
    if importlib.util.find_spec("ray") is None:  # not imported here: ray_session sets what Ray reads at import
        pytest.skip('needs the ray extra: pip install -e ".[ray]"')
    from dopr.ray_cluster import ray_session

    with _short_temp_dir() as temp, pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_TMPDIR", temp)
        with ray_session(num_cpus=2) as ray:
            yield ray


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, title) of every process; Ray sets a worker's title to ray::<task or actor name>."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                title = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:  # ended meanwhile
                continue
            found[int(entry)] = (int(stat.rsplit(")", 1)[1].split()[1]), title)
    return found


def our_ray_workers(title: str) -> list[int]:
    """This test's own Ray workers (descendants of this process) whose title starts with `title`."""
    procs = _processes()

    def ours(pid):
        while pid > 1:
            pid = procs.get(pid, (0, ""))[0]
            if pid == os.getpid():
                return True
        return False

    return sorted(pid for pid, (_, t) in procs.items() if t.startswith(title) and ours(pid))


def _gone(pid: int, timeout: float = 20.0) -> bool:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True  # dead, not yet reaped
        except OSError:
            return True
        time.sleep(0.1)
    return False


@ray_marked
def test_local_ray_listens_on_loopback_and_runs_workers_at_our_priority(local_ray):
    @local_ray.remote
    def priority():
        return os.nice(0)

    assert local_ray.util.get_node_ip_address() == "127.0.0.1"
    assert local_ray.get(priority.remote()) == os.nice(0)


# ---------------------------------------------------------------------------------------------
# dopr eval --backend ray


class _ActorKillingPolicy(_KillingPolicy):
    """_KillingPolicy for Ray: the signal goes to the process of one of the evaluation's simulator actors."""

    def worker_pid(self) -> int:
        return our_ray_workers("ray::_Holder")[0]


@ray_marked
def test_ray_actors_give_the_local_pool_results(local_ray, checkpoint, reference, tmp_path, capsys):
    from dopr.scripts.cli import main

    out = tmp_path / "ray"
    assert main(["eval", "--checkpoint", checkpoint, "--episodes", "4", "--workers", "2", "--backend", "ray",
                 "--horizon", str(HORIZON), "--out", str(out), "--quiet", "--threads", "1"]) == 0
    saved = json.loads((out / "results.json").read_text())
    assert saved["protocol"]["backend"] == "ray" and saved["complete"]
    episodes = [json.loads(line) for line in (out / "episodes.jsonl").read_text().splitlines()]
    assert _fingerprint(sorted(episodes, key=lambda e: e["episode"])) == _fingerprint(reference.episodes)
    t0 = time.monotonic()
    while our_ray_workers("ray::_Holder"):  # the actors end with the evaluation
        assert time.monotonic() - t0 < 20, "simulator actors outlived their evaluation"
        time.sleep(0.1)


@ray_marked
def test_killed_actor_is_recorded_and_evaluation_goes_on(local_ray, checkpoint, reference, tmp_path):
    from dopr.eval import EvalConfig, evaluate_policy
    from dopr.policies import load_policy

    # as test_eval's local-pool version: lockstep, so both actors have run two rounds when one is killed
    policy = _ActorKillingPolicy(_NoiseDrawingPolicy(load_policy(checkpoint)), at_call=3, sig=signal.SIGKILL)
    result = evaluate_policy(policy, TASK, EvalConfig(episodes=4, workers=2, backend="ray", horizon=HORIZON,
                                                      progress=False), out_dir=str(tmp_path))
    assert policy.killed_pid is not None
    assert result.n_episodes == 4 and result.n_errors == 1 and result.timing["worker_restarts"] == 1
    (failed,) = [e for e in result.episodes if e["error"]]
    assert f"pid {policy.killed_pid}" in failed["error"] and "died" in failed["error"]
    assert not failed["success"] and 0 < failed["steps"] < HORIZON
    # every other episode, including those the replacement actor ran, is exactly the fault-free one
    ok = [e for e in result.episodes if not e["error"]]
    assert _fingerprint(ok) == _fingerprint([e for e in reference.episodes if e["episode"] != failed["episode"]])
    assert len((tmp_path / "episodes.jsonl").read_text().splitlines()) == 4


@ray_marked
def test_hung_actor_times_out_and_is_replaced(local_ray, checkpoint, reference, tmp_path):
    from dopr.eval import EvalConfig, evaluate_policy
    from dopr.policies import load_policy

    # SIGSTOP freezes the actor's process: it neither answers nor dies, as a simulator stuck in a loop
    policy = _ActorKillingPolicy(load_policy(checkpoint), at_call=2, sig=signal.SIGSTOP)
    cfg = EvalConfig(episodes=3, workers=1, backend="ray", horizon=HORIZON, episode_timeout_s=5.0, progress=False)
    result = evaluate_policy(policy, TASK, cfg, out_dir=str(tmp_path))
    assert result.n_errors == 1 and "timed out" in result.episodes[0]["error"]
    assert f"pid {policy.killed_pid}" in result.episodes[0]["error"]
    assert _fingerprint(result.episodes[1:]) == _fingerprint(reference.episodes[1:3])
    assert _gone(policy.killed_pid)  # killed, not left frozen


@ray_marked
def test_bench_ray_prints_the_overheads_side_by_side(local_ray, capsys):
    from dopr.scripts.cli import main

    assert main(["bench", "ray", "--repeats", "5", "--cold-starts", "1"]) == 0
    out = capsys.readouterr().out
    for what in ("no-op task round trip:", "a run's start-up", "new worker", "Ray actor", "local process pipe"):
        assert what in out


def test_without_the_extra_the_error_says_how_to_install_it(monkeypatch):
    from dopr.ray_cluster import require_ray

    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` does when it is not installed
    with pytest.raises(SystemExit, match=r'pip install -e "\.\[ray\]"'):
        require_ray()


# ---------------------------------------------------------------------------------------------
# dopr experiment --backend ray

# 100 steps with checkpoints (and evaluations) at 50 and 100: a run can be killed between the two
EXPERIMENT = dict(tasks=["reacher"], policies=["mlp"], optims=["dopr-adamw", "adamw"], seeds=1, demos=4,
                  steps={"mlp": 100}, eval_every=50, eval_episodes=2, compounding_episodes=0, workers=1,
                  batch_size=32)
RUNS = ["reacher-mlp-dopr-adamw-s0", "reacher-mlp-adamw-s0"]
FLAGS = ["--tasks", "reacher", "--policies", "mlp", "--optims", "dopr-adamw,adamw", "--seeds", "1", "--demos", "4",
         "--steps", "100", "--eval-every", "50", "--eval-episodes", "2", "--compounding-episodes", "0",
         "--workers", "1", "--batch-size", "32"]


def _experiment(out, **options):
    from dopr.eval.experiment import ExperimentConfig

    return ExperimentConfig(**EXPERIMENT, out=str(out), **options)


def outcomes(out) -> dict:
    """What each run of an experiment folder gave: every checkpoint's validation loss (meta.json, what the table and
    report read) and closed-loop episodes (seed, success, length, return), and the success rates logged in training."""
    from dopr.eval.results import read_episodes

    result = {}
    for run in RUNS:
        folder = Path(out) / "runs" / run
        checkpoints = {}
        for ckpt in sorted(folder.glob("ckpt-*")):
            episodes = None  # the last step's checkpoint is saved twice, and ckpt-final evaluated
            if (ckpt / "eval").exists():
                assert json.loads((ckpt / "eval" / "results.json").read_text())["complete"], ckpt
                episodes = [(e["seed"], e["success"], e["steps"], e["return"])
                            for e in read_episodes(str(ckpt / "eval"))]
            checkpoints[ckpt.name] = (json.loads((ckpt / "meta.json").read_text())["val_loss"], episodes)
        metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        logged = {m["step"]: m["eval_success_rate"] for m in metrics if "eval_success_rate" in m}
        result[run] = {"checkpoints": checkpoints, "logged_success": logged}
    return result


@pytest.fixture(scope="module")
def sequential(tmp_path_factory):
    """The experiment run by the default (local, sequential) backend: what every Ray run must reproduce."""
    from dopr.eval.experiment import run_experiment

    out = tmp_path_factory.mktemp("sequential")
    run_experiment(_experiment(out))
    return outcomes(out)


@ray_marked
def test_ray_experiment_gives_the_sequential_results(local_ray, sequential, tmp_path, capsys):
    from dopr.eval.experiment import run_experiment

    table = run_experiment(_experiment(tmp_path, backend="ray", max_parallel=2))
    assert outcomes(tmp_path) == sequential
    for o in sequential.values():  # evaluated at step 50 and at the end
        assert [name for name, (_, episodes) in o["checkpoints"].items() if episodes] == ["ckpt-0000050", "ckpt-final"]
    assert "dopr-adamw" in table
    out = capsys.readouterr().out
    assert "(1/2 runs done" in out and "(2/2 runs done" in out and "ETA" in out


class _RunKiller(threading.Thread):
    """SIGKILLs the process running run `name`'s Ray task, `times` times (each time a new attempt's process),
    the first time once `when()` holds."""

    def __init__(self, name: str, times: int, when):
        super().__init__(daemon=True)
        self.name_, self.times, self.when = name, times, when
        self.killed: list[int] = []
        self.stop = threading.Event()

    def run(self):
        while len(self.killed) < self.times and not self.stop.is_set():
            pids = [p for p in our_ray_workers(f"ray::dopr-run:{self.name_}") if p not in self.killed]
            if pids and self.when():
                os.kill(pids[0], signal.SIGKILL)
                self.killed.append(pids[0])
            time.sleep(0.02)

    def __exit__(self, *exc):
        self.stop.set()
        self.join()

    def __enter__(self):
        self.start()
        return self


@ray_marked
def test_crashed_run_is_reported_retried_and_resumed(local_ray, sequential, tmp_path, capsys):
    from dopr.eval.experiment import run_experiment

    victim, other = RUNS
    mid_run = tmp_path / "runs" / victim / "ckpt-0000050"
    cfg = _experiment(tmp_path, backend="ray", max_parallel=1, retries=1)
    # killed twice: its one retry crashes too, so it is reported failed, and the other run goes on
    with _RunKiller(victim, times=2, when=mid_run.exists) as killer:
        with pytest.raises(RuntimeError, match=f"1 of 2 runs failed after 2 attempt.*{victim}"):
            run_experiment(cfg)
    assert len(killer.killed) == 2
    out = capsys.readouterr().out
    assert f"{victim}: crashed" in out and "attempt 2 of 2" in out, out
    assert f"{victim}: FAILED after 2 attempt(s)" in out, out
    assert (tmp_path / "runs" / other / "ckpt-final" / "eval" / "results.json").exists()
    assert mid_run.exists() and not (tmp_path / "runs" / victim / "ckpt-final").exists()

    # run again: killed once more, its retry goes on from the checkpoint at step 50 and finishes
    with _RunKiller(victim, times=1, when=lambda: True) as killer:
        run_experiment(cfg)
    assert len(killer.killed) == 1
    out = capsys.readouterr().out
    # (the driver's own lines: what the run tasks print comes through Ray's log forwarding, some time later)
    assert f"{victim}: crashed" in out and f"{victim}: resumed from its latest checkpoint" in out, out
    assert f"{other}: trained and evaluated, reused" in out, out
    # killed and resumed, the runs are the uninterrupted sequential ones
    assert outcomes(tmp_path) == sequential


@ray_marked
def test_experiment_resumes_after_its_driver_is_killed(local_ray, sequential, tmp_path, ray_temp_dir):
    """`dopr experiment --backend ray` starting its own local Ray, SIGKILLed mid-run with its run tasks, and the same
    command run again, here on an existing cluster (--address), reuses what finished and resumes the
    rest from their checkpoints."""
    temp = ray_temp_dir
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_TMPDIR": temp}
    cmd = [sys.executable, "-m", "dopr", "experiment", *FLAGS, "--backend", "ray", "--max-parallel", "2",
           "--out", str(tmp_path)]
    driver = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        t0 = time.monotonic()
        while not list(tmp_path.glob("runs/*/ckpt-0000050")):
            assert driver.poll() is None and time.monotonic() - t0 < 600, "no checkpoint at step 50"
            time.sleep(0.02)
        # the driver and its run tasks die at once, as with a lost machine or an OOM kill: Ray alone ends a killed
        # driver's tasks 1.5-2.3 s later (measured), in which runs this short finish and leave nothing to resume
        tasks = [pid for pid, title in _ray_processes_of(temp).items() if "dopr-run" in title]
        for pid in tasks:
            os.kill(pid, signal.SIGSTOP)
        driver.kill()
        driver.wait()
        for pid in tasks:
            os.kill(pid, signal.SIGKILL)
    finally:
        if driver.poll() is None:
            driver.kill()
    # What else still runs with this test's RAY_TMPDIR in its environment (the driver's local cluster) is ended here
    # (Ray's two helper agents, started without it, notice and exit within a minute or two)
    for pid in _ray_processes_of(temp):
        os.kill(pid, signal.SIGKILL)
    # unfinished runs with a checkpoint to go on from (at least the one whose step-50 checkpoint set off the kill)
    resumable = [run for run in RUNS if not _finished(tmp_path / "runs" / run)
                 and list((tmp_path / "runs" / run).glob("ckpt-*"))]
    assert resumable, "killed too late: the test would prove nothing"

    address = local_ray.get_runtime_context().gcs_address
    again = subprocess.run([*cmd, "--address", address], env={**os.environ, "OMP_NUM_THREADS": "1"},
                           capture_output=True, text=True, timeout=1200)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Started a local Ray instance" not in again.stderr  # it joined the test's cluster
    for run in resumable:  # (the driver's lines: the run tasks' own come through Ray's log forwarding, if at all)
        assert (f"{run}: resumed from its latest checkpoint" in again.stdout
                or f"{run}: final checkpoint evaluated" in again.stdout), again.stdout
    assert outcomes(tmp_path) == sequential


def _finished(run: Path) -> bool:
    results = run / "ckpt-final" / "eval" / "results.json"
    return results.exists() and json.loads(results.read_text())["complete"]


def _ray_processes_of(temp: str) -> dict[int, str]:
    """pid -> title of the processes started with RAY_TMPDIR=temp (found in their environment)."""
    found = {}
    for pid, (_, title) in _processes().items():
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RAY_TMPDIR={temp}".encode() in environ and pid != os.getpid():
            found[pid] = title
    return found
