"""Collect expert demonstrations into an EpisodeStore with parallel worker processes.

    summary = collect(CollectConfig(task="lift", n_episodes=200, out="out/demos/lift.zarr", workers=2))

Episode k of a store is the rollout of the task's expert from seed `seed + j` for some j, and the
seeds are consumed in increasing order: the parent appends results in seed order and stops at the
first seed that completes the count, so the store's contents do not depend on the number of
workers. Workers (multiprocessing, spawn) each build one env, run whole episodes and send each
back as one message of stacked arrays; the parent appends the finished episodes in atomic batches
every couple of seconds (a kill loses at most those seconds, never leaves half an episode) and
records the seeds used in the store's attributes, so running the same command again on an existing
store appends until the count is reached, continuing after the last seed whose result was written.
Seeds in flight at a kill, or in a batch the kill cut short, run again: the store after a kill and
a resume equals an uninterrupted one. Workers are dopr.envs.worker_pool's: a worker that crashes or hangs past
--episode-timeout ends the collection with the episodes finished so far kept.

Each episode stores, per step t: every observation key (before the action), `state` (the
simulator state before the action, from env.get_state()), `action` (the expert's CLEAN label),
`reward`, and with noise_std > 0 also `executed_action` (label + seeded noise, what was sent to
the simulator; replaying it from state[0] reproduces the episode). Rollouts stop at the first step
whose info["success"] is True, or when the env terminates or reaches its horizon.
Per-episode seed and success live in the store's attrs (`episode_seeds`, `episode_success`).
"""

from __future__ import annotations

import collections
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from dopr.envs.episode import EpisodeLoop
from dopr.envs.worker_pool import WorkerFault, WorkerPool

ACTION_KEY = "action"
EXECUTED_ACTION_KEY = "executed_action"
FLUSH_SECONDS = 2.0  # finished episodes wait at most this long for the store (all that a kill -9 can lose)


@dataclass
class CollectConfig:
    task: str
    n_episodes: int
    out: str
    workers: int = 2  # worker processes; 0 runs episodes in this process (debugging, tests)
    seed: int | None = None  # base seed (default 0); on resume it must match the store's
    noise_std: float = 0.0  # std of the Gaussian noise on the executed action
    keep_failed: bool = False  # also store episodes that did not succeed
    obs: str = "lowdim"  # "lowdim" or "image"
    horizon: int | None = None  # None: the task's default horizon
    image_size: int = 84
    progress: bool = True
    max_attempts: int | None = None  # give up after this many rollouts (None: 10 x n_episodes + 10)
    expert: str | None = None  # RL-expert folder for the locomotion tasks (None: out/experts/<task>)
    episode_timeout_s: float = 600.0  # a worker that takes longer for one episode counts as hung


@dataclass
class CollectSummary:
    path: str
    n_episodes: int  # episodes in the store at the end
    added: int  # episodes added by this run
    attempts: int  # rollouts run by this run (including discarded failures)
    successes: int  # successful rollouts among them
    env_steps: int  # simulator steps of all rollouts of this run
    seconds: float  # wall time from start to the last append
    first_result_seconds: float = 0.0  # wall time until the first episode came back (startup)
    store_seconds: float = 0.0  # parent time spent writing the store (appends and attrs)
    seeds: list[int] = field(default_factory=list)  # seeds of the episodes added


# ---------------------------------------------------------------------------------------------
# worker side
@dataclass
class ExpertRollouts:
    """What a collection worker builds: the task's env; `rollout(seed)` then runs the expert's episode."""

    task: str
    obs: str
    horizon: int | None
    image_size: int
    noise_std: float
    expert: str | None = None  # RL-expert folder (locomotion tasks)

    def build(self) -> "ExpertRollouts":
        from dopr.envs import tasks

        self.env = tasks.make(self.task, obs=self.obs, horizon=self.horizon, image_size=self.image_size)
        return self

    def rollout(self, seed: int) -> dict:
        from dopr.envs import tasks

        expert = tasks.make_expert(self.task, seed=seed, noise_std=self.noise_std, expert_path=self.expert)
        return rollout(self.env, expert, seed)


def rollout(env, expert, seed: int, stop_on_success: bool = True) -> dict:
    """Run one expert episode from `env.reset(seed=seed)`; return stacked arrays and its info.

    The episode stops at the first success (unless stop_on_success is False: then success means
    "succeeded at some step"), or when the env terminates or reaches its horizon. `final_state`
    is the simulator state after the last step (the per-step `state`s are those before each action).
    """
    loop = EpisodeLoop(env, stop_on_success)
    obs = loop.start(env.reset(seed=seed)[0])
    expert.reset()
    noisy = getattr(expert, "noise_std", 0.0) > 0
    steps: dict[str, list] = collections.defaultdict(list)
    while not loop.done:
        for key, value in obs.items():
            steps[key].append(value)
        steps["state"].append(env.get_state())
        label = np.asarray(expert.act(env), dtype=np.float32)
        steps[ACTION_KEY].append(label)
        executed = label
        if noisy:  # stored as executed (float32), so replaying it reproduces the episode exactly
            executed = np.asarray(expert.noisy(label), dtype=np.float32)
            steps[EXECUTED_ACTION_KEY].append(executed)
        obs, reward, _ = loop.step(executed)
        steps["reward"].append(reward)
    episode = {key: np.stack(values) for key, values in steps.items()}
    episode["reward"] = episode["reward"].astype(np.float32)
    return {"episode": episode, "seed": seed, "success": loop.success, "length": len(episode["reward"]),
            "final_state": env.get_state()}


# ---------------------------------------------------------------------------------------------
# parent side
def _versions() -> dict:
    import importlib.metadata

    versions = {}
    for dist in ("dopr", "mujoco", "robosuite", "gymnasium", "numpy", "zarr"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def _obs_keys(cfg: CollectConfig, spec) -> list[str]:
    return list(spec.lowdim_keys) + (list(spec.image_keys) if cfg.obs == "image" else [])


def _expert_provenance(cfg: CollectConfig, spec) -> dict | None:
    """Where an RL expert came from (its folder, training steps and evaluation return), for the store's attrs."""
    from dopr.envs.gym_experts import default_expert_path, load_rl_expert_actor

    if spec.extra.get("expert") != "rl":
        return None
    path = cfg.expert or default_expert_path(cfg.task)
    actor = load_rl_expert_actor(path)
    keys = ("env_id", "trainer", "env_steps", "eval_return_mean", "eval_return_sd")
    return {"path": str(path), **{k: actor.config.get(k) for k in keys}}


def _store_attrs(cfg: CollectConfig, spec) -> dict:
    obs_keys = _obs_keys(cfg, spec)
    return {
        "task": cfg.task,
        "obs_keys": obs_keys,
        "action_key": ACTION_KEY,
        "control_freq": spec.control_freq,
        "env_meta": {
            "kind": spec.kind,
            "env_id": spec.env_id,
            "obs": cfg.obs,
            "horizon": int(cfg.horizon or spec.horizon),
            "image_size": cfg.image_size,
            "action_dim": spec.action_dim,
            "spec": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(spec).items()},
        },
        "versions": _versions(),
        "collect": {
            "seed": cfg.seed,
            "noise_std": cfg.noise_std,
            "keep_failed": cfg.keep_failed,
            "action_is_clean_label": True,
            "expert": _expert_provenance(cfg, spec),
            "next_seed": cfg.seed,
            "attempts": 0,
        },
        "episode_seeds": [],
        "episode_success": [],
    }


def _open_or_create(cfg: CollectConfig, spec):
    """The store at cfg.out (checked against this task and options), created if missing."""
    from dopr.data.episode_store import EpisodeStore

    if not Path(cfg.out).exists():
        cfg.seed = 0 if cfg.seed is None else cfg.seed
        return EpisodeStore.create(cfg.out, attrs=_store_attrs(cfg, spec))
    store = EpisodeStore.open(cfg.out, mode="a")
    attrs = store.attrs
    if attrs.get("task") != cfg.task:
        raise ValueError(
            f"{cfg.out}: this store holds task {attrs.get('task')!r}, not {cfg.task!r}; "
            "give another --out to collect a different task"
        )
    recorded = attrs.get("collect")
    if recorded is None:
        raise ValueError(f"{cfg.out}: attribute 'collect' missing: not a store written by dopr collect")
    checks = {
        "seed": (cfg.seed, recorded["seed"]),
        "noise_std": (cfg.noise_std, recorded["noise_std"]),
        "obs": (cfg.obs, attrs["env_meta"]["obs"]),
    }
    for name, (asked, stored) in checks.items():
        if asked is not None and asked != stored:
            raise ValueError(
                f"{cfg.out}: was collected with {name}={stored!r}, but {name}={asked!r} was asked; "
                f"resume with the same {name} or collect into a new store"
            )
    cfg.seed = recorded["seed"]
    _settle(store)  # a batch a kill left half-written
    if cfg.horizon is not None and cfg.horizon != attrs["env_meta"]["horizon"]:
        raise ValueError(f"{cfg.out}: was collected with horizon {attrs['env_meta']['horizon']}, "
                         f"but horizon {cfg.horizon} was asked")
    return store


def _write(store, kept: list[dict], next_seed: int, attempts: int) -> None:
    """Append the kept episodes with their bookkeeping (seeds, successes, next seed, attempts) so that a
    kill at any moment leaves attrs that say which seed each stored episode came from and where to go on:
    1. the batch's bookkeeping goes to attrs["collect"]["pending"];
    2. the episodes are appended (one atomic commit);
    3. the batch moves from pending into episode_seeds, episode_success and next_seed (`_settle`).
    A kill before 3 is settled when the store is opened again: the batch counts if its episodes are in
    the store, and is forgotten if not, so its seeds run again, as an uninterrupted run would store them.
    (Recording the seeds as used before appending would skip the seeds of a batch lost to a kill.)"""
    pending = {"n_episodes": store.n_episodes + len(kept), "seeds": [int(r["seed"]) for r in kept],
               "success": [bool(r["success"]) for r in kept], "next_seed": int(next_seed), "attempts": attempts}
    _set_attrs(store, {"collect": {**store.attrs["collect"], "pending": pending}})
    store.append_episodes([r["episode"] for r in kept])
    _settle(store)


def _settle(store) -> None:
    """Count or forget the batch that attrs["collect"]["pending"] names (see `_write`)."""
    attrs = store.attrs
    collect = dict(attrs["collect"])
    pending = collect.pop("pending", None)
    if pending is None:
        return
    values = {"collect": collect}
    if store.n_episodes == pending["n_episodes"]:  # its episodes were appended
        n = pending["n_episodes"] - len(pending["seeds"])
        values["episode_seeds"] = list(attrs.get("episode_seeds", []))[:n] + pending["seeds"]
        values["episode_success"] = list(attrs.get("episode_success", []))[:n] + pending["success"]
        collect.update(next_seed=pending["next_seed"], attempts=int(collect.get("attempts", 0)) + pending["attempts"])
    _set_attrs(store, values)


class _Unwritten:
    """Finished rollouts not yet in the store. The parent writes them in one atomic batch every
    FLUSH_SECONDS (and at the end, or when interrupted): one append per short episode cost the
    parent 22-41 ms each (lift, measured by `dopr bench collect`), CPU taken from the workers on a
    machine with as many cores as workers; a batch costs ~3.5 ms per episode."""

    def __init__(self, store):
        self.store, self.kept, self.attempts, self.next_seed = store, [], 0, None
        self.last_flush = time.perf_counter()

    def add(self, result: dict, keep: bool) -> None:
        self.attempts += 1
        self.next_seed = result["seed"] + 1
        if keep:
            self.kept.append(result)

    def due(self) -> bool:
        return time.perf_counter() - self.last_flush >= FLUSH_SECONDS

    def flush(self) -> float:
        """Write everything unwritten; returns the seconds it took."""
        t0 = time.perf_counter()
        kept, attempts, self.kept, self.attempts = self.kept, self.attempts, [], 0  # a failed write is not retried
        if attempts:
            _write(self.store, kept, self.next_seed, attempts)
        self.last_flush = time.perf_counter()
        return self.last_flush - t0


def _set_attrs(store, values: dict) -> None:
    attrs = store.attrs
    if hasattr(attrs, "put"):  # zarr: one metadata write for all keys
        attrs.put({**attrs.asdict(), **values})
    else:
        attrs.update(values)


def collect(cfg: CollectConfig) -> CollectSummary:
    """Fill the store at cfg.out with cfg.n_episodes expert episodes of cfg.task (see module doc)."""
    from tqdm import tqdm

    from dopr.data import resolve_split
    from dopr.envs import tasks

    spec = tasks.task_spec(cfg.task)  # KeyError with the known tasks for an unknown name
    if cfg.obs not in ("lowdim", "image"):
        raise ValueError(f"obs must be 'lowdim' or 'image', got {cfg.obs!r}")
    if cfg.n_episodes < 0 or cfg.workers < 0:
        raise ValueError("n_episodes and workers must be >= 0")
    if cfg.obs == "image":
        from dopr.envs.rendering import require_offscreen_rendering

        require_offscreen_rendering()  # here, not as a failure in every worker
    tasks.make_expert(cfg.task, noise_std=cfg.noise_std, expert_path=cfg.expert)  # a missing expert: here too
    t0 = time.perf_counter()
    store = _open_or_create(cfg, spec)
    next_seed = int(store.attrs["collect"]["next_seed"])
    start_episodes = store.n_episodes
    needed = cfg.n_episodes - start_episodes
    summary = CollectSummary(path=str(cfg.out), n_episodes=start_episodes, added=0, attempts=0,
                             successes=0, env_steps=0, seconds=0.0)
    if needed <= 0:
        return summary
    max_attempts = cfg.max_attempts or 10 * needed + 10
    expected_keys = {*_obs_keys(cfg, spec), "state", ACTION_KEY, "reward"}
    if cfg.noise_std > 0:
        expected_keys.add(EXECUTED_ACTION_KEY)

    worker = ExpertRollouts(cfg.task, cfg.obs, cfg.horizon, cfg.image_size, cfg.noise_std,
                            cfg.expert)
    pool = WorkerPool(cfg.workers, worker, name="dopr-collect-worker") if cfg.workers > 0 else None
    bar = tqdm(total=cfg.n_episodes, initial=start_episodes, disable=not cfg.progress,
               desc=f"collect {cfg.task}", unit="ep")
    seeds = range(next_seed, next_seed + max_attempts)
    unwritten = _Unwritten(store)
    try:
        for result in _results_in_seed_order(pool, worker, seeds, cfg.episode_timeout_s):
            if summary.attempts == 0:
                summary.first_result_seconds = time.perf_counter() - t0
                if set(result["episode"]) != expected_keys:
                    raise ValueError(
                        f"{cfg.task}: the env returned keys {sorted(result['episode'])}, but its "
                        f"TaskSpec promises {sorted(expected_keys)}"
                    )
            summary.attempts += 1
            summary.env_steps += result["length"]
            summary.successes += result["success"]
            keep = result["success"] or cfg.keep_failed
            unwritten.add(result, keep)
            if keep:
                summary.added += 1
                summary.seeds.append(result["seed"])
                bar.update(1)
            bar.set_postfix(success=f"{summary.successes}/{summary.attempts}")
            if summary.added >= needed:
                break
            if unwritten.due():
                summary.store_seconds += unwritten.flush()
    finally:
        # finished episodes are kept even when collection is interrupted (Ctrl-C, a worker's error)
        summary.store_seconds += unwritten.flush()
        bar.close()
        if pool is not None:
            pool.close()  # episodes still in flight are abandoned: not recorded as used, a resumed run starts there
    # Record the default episode-level train/validation split (training reads it back; a different
    # --val-ratio or --split-seed makes training compute and announce its own).
    resolve_split(store)
    summary.n_episodes = store.n_episodes
    summary.seconds = time.perf_counter() - t0
    if summary.added < needed:
        raise RuntimeError(
            f"{cfg.task}: only {summary.successes} of {summary.attempts} rollouts succeeded; "
            f"{cfg.out} has {summary.n_episodes} of the {cfg.n_episodes} episodes asked. "
            "Running the command again continues from there."
        )
    return summary


def _results_in_seed_order(pool: WorkerPool | None, worker: ExpertRollouts, seeds: range, timeout_s: float):
    """Yield rollout results for `seeds` in order until the caller stops, one episode per worker in
    flight, from the pool's workers or, without a pool, from this process."""
    if pool is None:
        worker.build()
        for seed in seeds:
            yield worker.rollout(seed)
        return
    seed_iter, running, done = iter(seeds), {}, {}  # running: worker -> (seed, deadline); done: seed -> result
    next_seed = seeds.start
    while True:
        for i in range(len(pool)):
            if i not in running and (seed := next(seed_iter, None)) is not None:
                running[i] = (seed, time.monotonic() + timeout_s)
                fault = pool.send(i, ("rollout", (seed,)))
                if fault is not None:
                    raise RuntimeError(f"collect: seed {seed}: {fault}")
        if not running and next_seed not in done:
            return
        for i, reply in pool.receive({i: deadline for i, (_, deadline) in running.items()}).items():
            seed, _ = running.pop(i)
            if isinstance(reply, WorkerFault):
                raise RuntimeError(f"collect: seed {seed}: {reply}")
            done[seed] = reply
        while next_seed in done:
            yield done.pop(next_seed)
            next_seed += 1
