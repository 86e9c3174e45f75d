"""Closed-loop evaluation: the policy acts on its own predictions in the real simulator.

A control round, top to bottom (`_run`):
1. every idle worker gets the next episode (seed = seed_base + episode index) and resets its env,
   from a seeded random state or from a demonstration's first state (`init="demos"`);
2. the last To observations of the running episodes are stacked into one batch and the policy
   runs once on it (on `device`), giving (B, Ta, A) actions;
3. each worker executes its first `n_action_steps` actions (receding horizon), stopping early at
   success, termination or the horizon, and sends back its last To observations. With temporal
   ensembling (`temporal_ensemble`, ACT's) the worker blends the chunk's first `n_action_steps` rows
   with the earlier chunks' rows for the same steps and executes one action, so the policy runs at
   every control step.
A policy that draws no noise is called on whichever episodes are ready as soon as their workers
answer (batches padded to a fixed size, so the actions do not depend on the batching), so no
worker waits for the slowest one; a stochastic policy runs in lockstep rounds over all episodes.
An episode's observation history starts as its first observation repeated To times, as the
training windows are padded (data.SequenceSampler). A worker that dies or hangs is restarted and
its episode recorded as failed with the error. Episode i depends only on its seed (and, for a
stochastic policy, the sampling noise), so the same checkpoint and seeds give the same results.
The workers are local processes, or Ray actors across a cluster (`backend="ray"`, dopr.envs.ray_pool):
the policy stays here and the round is the same, so both give the same episodes.
A policy that outputs NaN or inf actions is a fault of the policy, not a failed episode: the
evaluation stops with `NonFiniteActions` before the simulator gets them, and writes no success rate
(the episodes finished before are kept).

Resuming: an evaluation writes results.json (incomplete) when it starts and appends each finished
episode to episodes.jsonl. Run again into the same folder with the same protocol (`outcome_protocol`:
checkpoint step, task, seeds' base, horizon, init, Ta, EMA, versions, ...), it keeps the finished
episodes and runs only the missing seeds, so the merged result is the uninterrupted one (for a policy
that draws noise, the resumed episodes draw other noise: still the protocol's distribution, not the
same draws). A complete result of the same protocol is returned without running anything. A result
of another protocol, or of more episodes, is not replaced unless `overwrite` is given (`ResultExists`);
an incomplete one of another protocol is started over.
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from dopr.atomic import json_safe, write_json_atomic
from dopr.envs.worker_pool import WorkerFault, open_pool
from dopr.eval.config import EvalConfig
from dopr.eval.metrics import success_stats
from dopr.eval.results import (
    EPISODES_FILE,
    RESULTS_FILE,
    EpisodeCount,
    EpisodeLog,
    EvalResult,
    library_versions,
    read_episodes,
)
from dopr.eval.rollout_worker import EnvSpec, Episode
from dopr.eval.runs import CheckpointMeta, read_json

# protocol entries that do not decide any episode's outcome: how many episodes, how they were run, and where
# the checkpoint lies (a moved experiment folder keeps its results; its step, val loss and EMA do count)
NOT_OUTCOME = ("episodes", "seeds", "workers", "backend", "created", "checkpoint")
# protocol entries added after results were written without them, with the value those evaluations had: a missing
# entry means that value (an evaluation with ensembling is not another seed of one written before the option existed)
ADDED_LATER = {"temporal_ensemble": None}


class CheckpointMismatch(ValueError):
    """The checkpoint's recorded task / observation schema does not fit the environment."""


class NonFiniteActions(ValueError):
    """The policy output NaN or inf actions: its weights or normalizer hold NaN/inf, or it diverged."""


class ResultExists(ValueError):
    """The output folder holds a result that this evaluation would replace (another protocol, or more episodes)."""


def outcome_protocol(protocol: dict) -> dict:
    """What decides each episode's outcome (as results.json stores it): two evaluations that agree on it
    give the same episode for the same seed."""
    return {k: v for k, v in json.loads(json.dumps(json_safe(protocol))).items() if k not in NOT_OUTCOME}


def episodes_to_keep(out_dir: str | None, protocol: dict, episodes: int, overwrite: bool = False) -> list[dict]:
    """The finished episodes of an earlier evaluation in out_dir that this one keeps: those of the same
    outcome protocol, among its first `episodes` seeds; none when there is no earlier one, or it is
    incomplete and of another protocol (started over). Raises ResultExists rather than replace a complete
    result of another protocol, or shrink a result of more episodes, unless `overwrite`."""
    path = os.path.join(out_dir, RESULTS_FILE) if out_dir else None
    if overwrite or path is None or not os.path.isfile(path):
        return []
    old = read_json(path)
    count = EpisodeCount.of(old)
    before, now = {**ADDED_LATER, **outcome_protocol(old.get("protocol") or {})}, outcome_protocol(protocol)
    # an entry an older results.json did not record yet is not held against it (ADDED_LATER's mean their old value)
    differ = [f"{k} {before[k]!r} there, {now[k]!r} here"
              for k in sorted(set(before) & set(now)) if before[k] != now[k]]
    if not differ and episodes >= count.requested:
        seed_base = protocol["seed_base"]
        kept = {r["episode"]: r for r in read_episodes(out_dir)
                if r.get("episode", episodes) < episodes and r.get("seed") == seed_base + r["episode"]}
        return [kept[i] for i in sorted(kept)]
    if differ and not count.complete:
        print(f"{path}: an incomplete evaluation ({count.done} of {count.requested} episodes) of another protocol "
              f"({'; '.join(differ[:3])}): starting over")
        return []
    what = "; ".join(differ[:3]) if differ else f"{count.requested} episodes there, {episodes} asked here"
    raise ResultExists(f"{path} holds {'a complete' if count.complete else 'an'} evaluation of {count.done} episodes "
                       f"of another protocol ({what}); pass --out DIR to write elsewhere, or --overwrite to replace it")


@dataclass
class _Slot:
    """The episode a worker is running and its observation history."""

    episode: Episode
    deadline: float
    history: deque = field(default_factory=deque)
    steps: int = 0
    ret: float = 0.0


def demo_initial_states(demos_path: str, task: str | None = None) -> tuple[list[np.ndarray], list[int]]:
    """First simulator state and length of every demonstration in an EpisodeStore."""
    from dopr.data import EpisodeStore

    store = EpisodeStore.open(demos_path, mode="r")
    store_task = store.attrs.get("task")
    if task is not None and store_task is not None and store_task != task:
        raise CheckpointMismatch(f"{demos_path}: demonstrations are of task {store_task!r}, evaluating {task!r}")
    if "state" not in store.keys:
        raise ValueError(f"{demos_path}: no data/state array, so episodes cannot start from the demonstrations' "
                         f"initial states (keys: {sorted(store.keys)})")
    ends = np.asarray(store.episode_ends, dtype=np.int64)
    if len(ends) == 0:
        raise ValueError(f"{demos_path}: the store holds no episodes")
    starts = np.concatenate([[0], ends[:-1]])
    state = store.array("state")
    return [np.asarray(state[int(s)]) for s in starts], [int(n) for n in np.diff(np.concatenate([[0], ends]))]


def resolve_horizon(task_horizon: int, horizon: int | None = None, horizon_mult: float | None = None,
                    demo_lengths: list[int] | None = None, demo_steps: int = 0) -> int:
    """The evaluation horizon: explicit, or a multiple of the demonstrations' longest episode
    (of the task's typical expert episode when no demonstrations are given), else the task's."""
    if horizon is not None and horizon_mult is not None:
        raise ValueError("give either horizon or horizon_mult, not both")
    if horizon is not None:
        if horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {horizon}")
        return int(horizon)
    if horizon_mult is not None:
        base = max(demo_lengths) if demo_lengths else demo_steps
        if not base:
            raise ValueError("horizon_mult needs demonstrations (--demos) or a task with a known demo length")
        return max(1, int(round(horizon_mult * base)))
    return int(task_horizon)


def check_fits_task(policy_config, spec, source: str, meta: CheckpointMeta | None = None) -> str:
    """The one answer to "does this policy fit this task": its observation keys are the task's, its action
    size is the task's, and for a checkpoint (meta.json) the task and control rate it was trained at are
    this task's (a policy trained at 20 Hz acts wrongly at 50 Hz) and the observation shapes it recorded are
    those its config.json builds. Returns the observation mode, "image" or "lowdim"."""
    from dopr.policies.config import is_image_shape

    if meta is not None and meta.task is not None and meta.task != spec.name:
        raise CheckpointMismatch(f"{source}: checkpoint was trained on task {meta.task!r}, not {spec.name!r}")
    keys = list(policy_config.obs_shapes)
    known = set(spec.lowdim_keys) | set(spec.image_keys)
    unknown = [k for k in keys if k not in known]
    if unknown:
        raise CheckpointMismatch(
            f"{source}: observation key(s) {unknown} are not observations of task {spec.name!r} "
            f"(low-dim {list(spec.lowdim_keys)}, image {list(spec.image_keys)})")
    if policy_config.action_dim != spec.action_dim:
        raise CheckpointMismatch(f"{source}: action_dim {policy_config.action_dim} but task {spec.name!r} "
                                 f"has action_dim {spec.action_dim}")
    if meta is not None:
        freq = meta.control_freq
        if freq is not None and spec.control_freq and abs(float(freq) - float(spec.control_freq)) > 1e-6:
            raise CheckpointMismatch(f"{source}: control_freq {freq} but task {spec.name!r} runs at "
                                     f"{spec.control_freq} Hz")
        for key, shape in policy_config.obs_shapes.items():
            if meta.obs_shapes and list(meta.obs_shapes.get(key) or []) != list(shape):
                raise CheckpointMismatch(f"{source}: meta.json's obs_shapes[{key!r}] = {meta.obs_shapes.get(key)} "
                                         f"does not match config.json's {shape}")
    return "image" if any(is_image_shape(policy_config.obs_shapes[k]) for k in keys) else "lowdim"


def _check_obs_shapes(obs: dict, obs_shapes: dict, task: str, source: str) -> None:
    for key, shape in obs_shapes.items():
        got = tuple(np.asarray(obs[key]).shape)
        if got != tuple(shape):
            raise CheckpointMismatch(f"{source}: observation {key!r} has shape {list(shape)} in the checkpoint "
                                     f"but {list(got)} in task {task!r}")


def evaluate_policy(policy, task: str, cfg: EvalConfig | None = None, *, out_dir: str | None = None,
                    protocol: dict | None = None, source: str = "policy",
                    checkpoint_meta: CheckpointMeta | None = None, overwrite: bool = False) -> EvalResult:
    """Evaluate an in-memory Policy on `task` closed-loop; see the module docstring.

    The policy is moved to `cfg.device` and put in eval mode for the evaluation (its train/eval mode
    is restored afterwards). out_dir (optional) receives results.json, episodes.jsonl and videos/.
    `protocol` adds entries to the recorded protocol (evaluate_checkpoint passes the checkpoint path
    and step); `checkpoint_meta`, the checkpoint's meta.json, is checked against the task. An earlier
    evaluation in out_dir is resumed, reused or refused as the module docstring says.
    """
    import torch

    from dopr.envs import task_spec

    cfg = cfg or EvalConfig()
    spec = task_spec(task)
    pcfg = policy.config
    obs_mode = check_fits_task(pcfg, spec, source, checkpoint_meta)
    init_states = demo_initial_states(cfg.demos, task)[0] if cfg.init == "demos" else None
    horizon = int(cfg.horizon or spec.horizon)
    n_exec = int(cfg.n_action_steps or pcfg.n_action_steps)
    if not 1 <= n_exec <= pcfg.n_action_steps:
        raise ValueError(f"n_action_steps must be in 1..{pcfg.n_action_steps} (the policy's Ta), got {n_exec}")
    image_sizes = {tuple(pcfg.obs_shapes[k])[0] for k in pcfg.obs_shapes if k in spec.image_keys}
    env_spec = EnvSpec(
        task=task, obs=obs_mode, horizon=horizon, image_size=image_sizes.pop() if image_sizes else 84,
        obs_keys=tuple(pcfg.obs_shapes), stop_on_success=cfg.stop_on_success,
        label_with_expert=cfg.label_with_expert, temporal_ensemble=cfg.temporal_ensemble,
        video_dir=os.path.join(out_dir, "videos") if (cfg.videos and out_dir) else None,
    )
    plan = [
        Episode(index=i, seed=cfg.seed_base + i,
                init_state=None if init_states is None else init_states[i % len(init_states)],
                demo_index=None if init_states is None else i % len(init_states),
                record_video=i < cfg.videos and out_dir is not None)
        for i in range(cfg.episodes)
    ]
    full_protocol = {
        "task": task, "init": cfg.init, "demos": os.path.abspath(cfg.demos) if cfg.demos else None,
        "seed_base": cfg.seed_base, "seeds": [cfg.seed_base, cfg.seed_base + cfg.episodes - 1],
        "episodes": cfg.episodes, "horizon": horizon, "n_obs_steps": pcfg.n_obs_steps, "n_action_steps": n_exec,
        "temporal_ensemble": cfg.temporal_ensemble,
        "policy_kind": pcfg.kind, "obs_shapes": pcfg.obs_shapes, "action_dim": pcfg.action_dim,
        "stop_on_success": cfg.stop_on_success, "label_with_expert": cfg.label_with_expert,
        "workers": cfg.workers, "backend": cfg.backend, "device": str(cfg.device),
        "pad_batch": cfg.pad_batch, "versions": library_versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), **(protocol or {}),
    }
    if cfg.videos and out_dir is None:
        print("videos: no output folder given, so no videos are written")
    kept = episodes_to_keep(out_dir, full_protocol, cfg.episodes, overwrite)
    if cfg.label_with_expert:  # an episode logged without its expert-label errors (older files) runs again
        kept = [r for r in kept if "action_errors" in r]
    plan = [ep for ep in plan if ep.index not in {r["episode"] for r in kept}]
    if kept and plan:
        print(f"{out_dir}: resuming, {len(kept)} of {cfg.episodes} episodes kept, {len(plan)} to run")

    was_training = policy.training
    policy = policy.to(cfg.device).eval()
    policy.reset()
    # one generator for the sampling noise of stochastic policies (diffusion, flow): repeatable runs
    generator = torch.Generator(device=cfg.device).manual_seed(cfg.seed_base)
    # a complete result of this protocol (nothing planned) is reused as it is on disk
    log = EpisodeLog(os.path.join(out_dir, EPISODES_FILE) if out_dir and plan else None, kept)
    tally = _Tally()
    for record in kept:
        record = dict(record)
        errors = record.pop("action_errors", None)
        if errors is not None:
            tally.action_errors[record["episode"]] = errors
        tally.records.append(record)
    interrupted = False
    try:
        if plan:
            if out_dir is not None:  # what this evaluation is, and that it is not done, even if it gets killed
                write_json_atomic(os.path.join(out_dir, RESULTS_FILE),
                                  _summarize(task, tally, full_protocol, False, out_dir, cfg.episodes, 0).summary())
            _run(policy, plan, env_spec, cfg, n_exec, generator, log, tally, source)
    except KeyboardInterrupt:
        interrupted = True
    except BaseException:
        log.close()
        raise
    finally:
        policy.train(was_training)
    result = _summarize(task, tally, full_protocol, interrupted, out_dir, cfg.episodes, len(tally.records) - len(kept))
    log.rewrite_sorted([{**r, **({"action_errors": tally.action_errors[r["episode"]]}
                                 if r["episode"] in tally.action_errors else {})} for r in result.episodes])
    results_path = os.path.join(out_dir, RESULTS_FILE) if out_dir else None
    # nothing run: the file stands, unless a kill after the last episode left it saying fewer were done
    if results_path and (plan or EpisodeCount.of(read_json(results_path)).done != len(result.episodes)):
        write_json_atomic(results_path, result.summary())
    if interrupted:
        raise KeyboardInterrupt(f"evaluation interrupted; {len(result.episodes)} of {cfg.episodes} episodes finished"
                                + (f" and kept in {out_dir}: run it again to run the missing ones" if out_dir else ""))
    return result


@dataclass
class _Tally:
    """What an evaluation counts while it runs."""

    records: list = field(default_factory=list)  # finished episodes
    action_errors: dict = field(default_factory=dict)  # episode -> |action - expert label| per step
    policy_s: float = 0.0
    policy_calls: int = 0
    env_steps: int = 0
    restarts: int = 0
    schedule: str | None = None  # "pipelined" or "lockstep"
    t0: float = field(default_factory=time.perf_counter)
    t_ready: float | None = None  # the workers answered
    t_done: float | None = None  # the last episode ended


def _run(policy, plan, env_spec, cfg: EvalConfig, n_exec, generator, log, tally: _Tally, source):
    import torch
    from tqdm import tqdm

    To = policy.config.n_obs_steps
    obs_shapes = policy.config.obs_shapes
    queue = deque(plan)
    n_workers = max(1, min(cfg.workers, len(plan)))
    bar = tqdm(total=len(plan), desc=f"eval {env_spec.task}", unit="ep", disable=not cfg.progress, leave=False)
    shapes_checked = False
    slots: list[_Slot | None] = [None] * n_workers

    def finish(i, record):
        ep = slots[i].episode
        slots[i] = None
        errors = record.pop("action_errors", None)
        if errors is not None:
            tally.action_errors[ep.index] = errors
        full = {"episode": ep.index, "seed": ep.seed, "demo": ep.demo_index, **record}
        full.setdefault("error", None)
        tally.records.append(full)
        # the line keeps the expert-label errors, so a resumed compounding-error run has every episode's
        log.append(full if errors is None else {**full, "action_errors": errors})
        bar.update(1)
        n_ok = sum(r["success"] for r in tally.records)
        bar.set_postfix(success=f"{n_ok}/{len(tally.records)}")

    def fault(i, err: WorkerFault):
        slot = slots[i]
        finish(i, {"success": False, "steps": slot.steps, "return": slot.ret, "time_to_success": None,
                   "error": str(err)})

    def policy_call(rows, pad_to):
        """Actions (len(rows), Ta, A) for the episodes of `rows`; also whether the call drew noise
        from the generator."""
        batch = {
            key: torch.from_numpy(np.stack([np.stack([o[key] for o in slots[i].history]) for i in rows]))
            for key in obs_shapes
        }
        batch = {k: _pad_rows(v.float() if v.dtype == torch.float64 else v, pad_to).to(cfg.device)
                 for k, v in batch.items()}
        before = generator.get_state()
        t0 = time.perf_counter()
        with torch.inference_mode():
            actions = policy.predict_action(batch, generator=generator)
        actions = actions[: len(rows)].detach().to("cpu", torch.float64).numpy()
        finite = np.isfinite(actions.reshape(len(rows), -1)).all(axis=1)
        if not finite.all():  # never drive the simulator with them: 0 successes would hide a broken policy
            slot = slots[rows[int(np.argmin(finite))]]
            raise NonFiniteActions(
                f"{source}: the policy output NaN or inf actions for episode {slot.episode.index} (seed "
                f"{slot.episode.seed}) at step {slot.steps}: its weights or normalizer hold NaN/inf, or it "
                f"diverged on this observation. The evaluation stopped and recorded no success rate; the "
                f"{len(tally.records)} episode(s) finished before are in {EPISODES_FILE}")
        tally.policy_s += time.perf_counter() - t0
        tally.policy_calls += 1
        return actions, not torch.equal(before, generator.get_state())

    with open_pool(n_workers, env_spec, "dopr-eval-worker", cfg.backend, cfg.address) as pool:
        tally.t_ready = time.perf_counter()
        pending: dict[int, str] = {}  # worker -> the command whose reply it owes
        ready: set[int] = set()  # workers whose episode waits for its next action chunk
        # Lockstep (every running episode in one policy call per round) until the first call shows
        # whether the policy draws noise. A policy that does not is then called on whichever
        # episodes are ready, in batches of exactly pad_batch rows, so no worker waits for the
        # slowest one and each row's actions do not depend on which rows share its batch. A
        # stochastic policy stays in lockstep: its noise comes from one generator in call order,
        # which must not depend on which worker happens to answer first.
        pipelined = None
        while queue or any(s is not None for s in slots):
            # 1. idle workers start the next episodes
            for i in range(n_workers):
                if slots[i] is None and queue and i not in pending:
                    ep = queue.popleft()
                    slots[i] = _Slot(ep, deadline=time.monotonic() + cfg.episode_timeout_s)
                    err = pool.send(i, ("reset", (ep,)))
                    if err is not None:
                        fault(i, err)
                    else:
                        pending[i] = "reset"
            # 2. the policy acts for the waiting episodes (in lockstep: once every worker answered)
            if ready and (pipelined or not pending):
                rows = sorted(ready)
                ready.clear()
                step = cfg.pad_batch
                groups = [rows[k:k + step] for k in range(0, len(rows), step)] if pipelined else [rows]
                for group in groups:
                    actions, drew_noise = policy_call(group, cfg.pad_batch)
                    if pipelined is None:
                        pipelined = not drew_noise
                        tally.schedule = "pipelined" if pipelined else "lockstep"
                    # receding horizon: each worker executes the first n_exec actions of its chunk (temporal
                    # ensembling: blends them with the earlier chunks and executes one)
                    for j, i in enumerate(group):
                        err = pool.send(i, ("act", (actions[j, :n_exec], To)))
                        if err is not None:
                            fault(i, err)
                        else:
                            pending[i] = "act"
            if not pending:
                continue
            # 3. whichever workers answer first
            replies = pool.receive({i: slots[i].deadline for i in pending})
            for i, reply in replies.items():
                cmd = pending.pop(i)
                if isinstance(reply, WorkerFault):
                    fault(i, reply)
                    continue
                slot = slots[i]
                if cmd == "reset":
                    if not shapes_checked:
                        _check_obs_shapes(reply, obs_shapes, env_spec.task, source)
                        shapes_checked = True
                    slot.history = deque([reply] * To, maxlen=To)
                    ready.add(i)
                    continue
                tally.env_steps += reply["steps"] - slot.steps
                slot.steps, slot.ret = reply["steps"], reply["return"]
                slot.history.extend(reply["obs"])
                if reply["done"]:
                    finish(i, reply["record"])
                else:
                    ready.add(i)
        tally.t_done = time.perf_counter()  # the last episode ended; closing the workers follows
        tally.restarts = pool.n_restarts
    bar.close()


def _pad_rows(x, n: int):
    """Pad a batch to at least n rows by repeating its first row (EvalConfig.pad_batch says why)."""
    if x.shape[0] >= n:
        return x
    import torch

    return torch.cat([x, x[:1].expand(n - x.shape[0], *x.shape[1:])], dim=0)


def _summarize(task, tally: _Tally, protocol, interrupted, out_dir, requested: int, n_run: int) -> EvalResult:
    records = sorted(tally.records, key=lambda r: r["episode"])
    stats = success_stats(records)
    end = time.perf_counter()
    done = tally.t_done or end
    ready = tally.t_ready or end
    running = done - ready  # from the workers' start to the last episode's end
    timing = {
        "wall_s": round(end - tally.t0, 3),
        "startup_s": round(ready - tally.t0, 3),
        "shutdown_s": round(end - done, 3),
        "env_steps": tally.env_steps,
        "env_steps_per_s": round(tally.env_steps / running, 2) if running > 0 else None,
        "policy_calls": tally.policy_calls,
        "policy_ms_per_call": round(1000 * tally.policy_s / tally.policy_calls, 3) if tally.policy_calls else None,
        "worker_restarts": tally.restarts,
        "schedule": tally.schedule,
        "episodes_run": n_run,  # by this invocation; the others were kept from an earlier one
    }
    return EvalResult(task=task, **vars(stats), protocol=protocol, timing=timing, interrupted=interrupted,
                      episodes_requested=requested, complete=len(records) >= requested, episodes=records,
                      out_dir=out_dir, action_errors=tally.action_errors)


def evaluate_checkpoint(checkpoint: str, cfg: EvalConfig | None = None, *, out_dir: str | None = None,
                        task: str | None = None, ema: bool = True, overwrite: bool = False) -> EvalResult:
    """Load a checkpoint folder and evaluate it on the task recorded in its meta.json.

    Results go to `out_dir` (default <checkpoint>/eval). `task` may name the task explicitly; it
    must then match the checkpoint's. Returns the EvalResult (also written as results.json). An earlier
    evaluation there is resumed, reused or refused (ResultExists; `overwrite` replaces it): see the module.
    """
    from dopr.policies import load_policy

    cfg = cfg or EvalConfig()
    meta = CheckpointMeta.read(checkpoint)
    task = task or meta.task
    if task is None:
        raise CheckpointMismatch(f"{os.path.join(checkpoint, 'meta.json')}: no recorded task (key 'task'); "
                                 f"pass the task explicitly")
    policy = load_policy(checkpoint, ema=ema, device=cfg.device)
    protocol = {"checkpoint": os.path.abspath(checkpoint), "ema": ema, "step": meta.step, "val_loss": meta.val_loss}
    return evaluate_policy(policy, task, cfg, out_dir=out_dir or os.path.join(checkpoint, "eval"),
                           protocol=protocol, source=os.path.join(checkpoint, "meta.json"), checkpoint_meta=meta,
                           overwrite=overwrite)


def checkpoint_evaluation(train_cfg) -> Callable[[Path], dict]:
    """The closed-loop evaluation a training run makes of its checkpoints (TrainConfig's eval_* options): it
    returns the eval_* entries of the checkpoint's metrics line (dopr.train.loop)."""
    if train_cfg.eval_videos:  # refuse now, not at the first evaluation
        from dopr.envs.rendering import require_offscreen_rendering

        require_offscreen_rendering("videos (--eval-videos)")
    cfg = EvalConfig(episodes=train_cfg.eval_episodes, workers=train_cfg.eval_workers, horizon=train_cfg.eval_horizon,
                     device=train_cfg.device, videos=train_cfg.eval_videos, progress=False)

    def evaluate(checkpoint) -> dict:
        result = evaluate_checkpoint(str(checkpoint), cfg)
        record = {"eval_success_rate": result.success_rate, "eval_episodes": result.n_episodes}
        videos = [e["video"] for e in result.episodes if e.get("video")]
        return {**record, "eval_videos": videos} if videos else record

    return evaluate
