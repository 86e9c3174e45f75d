"""Closed-loop evaluation: the policy acts on its own predictions in the real simulator.

A control round, top to bottom (`_run`):
1. every idle worker gets the next episode (seed = seed_base + episode index) and resets its env,
   from a seeded random state or from a demonstration's first state (`init="demos"`);
2. the last To observations of the running episodes are stacked into one batch and the policy
   runs once on it (on `device`), giving (B, Ta, A) actions;
3. each worker executes its first `n_action_steps` actions (receding horizon), stopping early at
   success, termination or the horizon, and sends back its last To observations.
A policy that draws no noise is called on whichever episodes are ready as soon as their workers
answer (batches padded to a fixed size, so the actions do not depend on the batching), so no
worker waits for the slowest one; a stochastic policy runs in lockstep rounds over all episodes.
An episode's observation history starts as its first observation repeated To times, as the
training windows are padded (data.SequenceSampler). A worker that dies or hangs is restarted and
its episode recorded as failed with the error. Episode i depends only on its seed (and, for a
stochastic policy, the sampling noise), so the same checkpoint and seeds give the same results.
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np

from dopr.atomic import write_json_atomic
from dopr.eval.env_pool import EnvPool, EnvSpec, Episode, WorkerFault
from dopr.eval.metrics import success_stats
from dopr.eval.results import (
    EPISODES_FILE,
    RESULTS_FILE,
    EpisodeLog,
    EvalResult,
    library_versions,
)

DEFAULT_SEED_BASE = 100_000  # far from the seeds demonstrations are collected with (0, 1, ...)
DEFAULT_EPISODE_TIMEOUT_S = 600.0
DEFAULT_PAD_BATCH = 8  # policy batches are padded to this many rows (see _pad_rows)


class CheckpointMismatch(ValueError):
    """The checkpoint's recorded task / observation schema does not fit the environment."""


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


def check_policy_fits_task(policy_config, spec, source: str) -> str:
    """Refuse a policy whose observation keys or action size do not match the task; return obs mode."""
    from dopr.policies.config import is_image_shape

    keys = list(policy_config.obs_shapes)
    images = [k for k in keys if is_image_shape(policy_config.obs_shapes[k])]
    known = set(spec.lowdim_keys) | set(spec.image_keys)
    unknown = [k for k in keys if k not in known]
    if unknown:
        raise CheckpointMismatch(
            f"{source}: observation key(s) {unknown} are not observations of task {spec.name!r} "
            f"(low-dim {list(spec.lowdim_keys)}, image {list(spec.image_keys)})")
    if policy_config.action_dim != spec.action_dim:
        raise CheckpointMismatch(f"{source}: action_dim {policy_config.action_dim} but task {spec.name!r} "
                                 f"has action_dim {spec.action_dim}")
    return "image" if images else "lowdim"


def _check_obs_shapes(obs: dict, obs_shapes: dict, task: str, source: str) -> None:
    for key, shape in obs_shapes.items():
        got = tuple(np.asarray(obs[key]).shape)
        if got != tuple(shape):
            raise CheckpointMismatch(f"{source}: observation {key!r} has shape {list(shape)} in the checkpoint "
                                     f"but {list(got)} in task {task!r}")


def evaluate_policy(
    policy,
    task: str,
    episodes: int = 50,
    workers: int = 1,
    seed_base: int = DEFAULT_SEED_BASE,
    horizon: int | None = None,
    device: str = "cpu",
    init: str = "random",
    demos: str | None = None,
    n_action_steps: int | None = None,
    videos: int = 0,
    out_dir: str | None = None,
    episode_timeout_s: float = DEFAULT_EPISODE_TIMEOUT_S,
    label_with_expert: bool = False,
    stop_on_success: bool = True,
    progress: bool = True,
    protocol: dict | None = None,
    source: str = "policy",
    pad_batch: int = DEFAULT_PAD_BATCH,
) -> EvalResult:
    """Evaluate an in-memory Policy on `task` closed-loop; see the module docstring.

    The policy is moved to `device` and put in eval mode for the evaluation (its train/eval mode
    is restored afterwards).
    out_dir (optional) receives results.json, episodes.jsonl and videos/. `protocol` adds entries
    to the recorded protocol (evaluate_checkpoint passes the checkpoint path and its meta).
    """
    import torch

    from dopr.envs import task_spec

    spec = task_spec(task)
    cfg = policy.config
    obs_mode = check_policy_fits_task(cfg, spec, source)
    if init not in ("random", "demos"):
        raise ValueError(f"init must be 'random' or 'demos', got {init!r}")
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    init_states = None
    if init == "demos":
        if demos is None:
            raise ValueError("init='demos' needs demos=<path to an EpisodeStore>")
        init_states, _ = demo_initial_states(demos, task)
    horizon = int(horizon or spec.horizon)
    n_exec = int(n_action_steps or cfg.n_action_steps)
    if not 1 <= n_exec <= cfg.n_action_steps:
        raise ValueError(f"n_action_steps must be in 1..{cfg.n_action_steps} (the policy's Ta), got {n_exec}")
    image_sizes = {tuple(cfg.obs_shapes[k])[0] for k in cfg.obs_shapes if k in spec.image_keys}
    env_spec = EnvSpec(
        task=task, obs=obs_mode, horizon=horizon, image_size=image_sizes.pop() if image_sizes else 84,
        obs_keys=tuple(cfg.obs_shapes), stop_on_success=stop_on_success, label_with_expert=label_with_expert,
        video_dir=os.path.join(out_dir, "videos") if (videos and out_dir) else None,
    )
    plan = [
        Episode(index=i, seed=seed_base + i,
                init_state=None if init_states is None else init_states[i % len(init_states)],
                demo_index=None if init_states is None else i % len(init_states),
                record_video=i < videos and out_dir is not None)
        for i in range(episodes)
    ]
    full_protocol = {
        "task": task, "init": init, "demos": os.path.abspath(demos) if demos else None,
        "seed_base": seed_base, "seeds": [seed_base, seed_base + episodes - 1], "episodes": episodes,
        "horizon": horizon, "n_obs_steps": cfg.n_obs_steps, "n_action_steps": n_exec,
        "policy_kind": cfg.kind, "obs_shapes": cfg.obs_shapes, "action_dim": cfg.action_dim,
        "stop_on_success": stop_on_success, "workers": workers, "device": str(device), "pad_batch": pad_batch,
        "versions": library_versions(), "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **(protocol or {}),
    }
    if videos and out_dir is None:
        print("videos: no output folder given, so no videos are written")

    was_training = policy.training
    policy = policy.to(device).eval()
    policy.reset()
    # one generator for the sampling noise of stochastic policies (diffusion, flow): repeatable runs
    generator = torch.Generator(device=device).manual_seed(seed_base)
    log = EpisodeLog(os.path.join(out_dir, EPISODES_FILE) if out_dir else None)
    state = {"records": [], "action_errors": {}, "policy_s": 0.0, "policy_calls": 0, "env_steps": 0,
             "restarts": 0, "t0": time.perf_counter()}
    interrupted = False
    try:
        _run(policy, plan, env_spec, workers, cfg, n_exec, device, generator, episode_timeout_s,
             log, state, progress, source, pad_batch)
    except KeyboardInterrupt:
        interrupted = True
    except BaseException:
        log.close()
        raise
    finally:
        policy.train(was_training)
    result = _summarize(task, state, full_protocol, interrupted, out_dir)
    log.rewrite_sorted(result.episodes)
    if out_dir is not None:
        write_json_atomic(os.path.join(out_dir, RESULTS_FILE), result.summary())
    if interrupted:
        raise KeyboardInterrupt(f"evaluation interrupted; {len(result.episodes)} finished episodes kept"
                                + (f" in {out_dir}" if out_dir else ""))
    return result


def _run(policy, plan, env_spec, workers, cfg, n_exec, device, generator, episode_timeout_s, log, state,
         progress, source, pad_batch):
    import torch
    from tqdm import tqdm

    To = cfg.n_obs_steps
    queue = deque(plan)
    n_workers = max(1, min(workers, len(plan)))
    bar = tqdm(total=len(plan), desc=f"eval {env_spec.task}", unit="ep", disable=not progress, leave=False)
    shapes_checked = False

    def finish(i, slots, record):
        slot = slots[i]
        slots[i] = None
        ep = slot.episode
        errors = record.pop("action_errors", None)
        if errors is not None:
            state["action_errors"][ep.index] = errors
        full = {"episode": ep.index, "seed": ep.seed, "demo": ep.demo_index, **record}
        full.setdefault("error", None)
        state["records"].append(full)
        log.append(full)
        bar.update(1)
        n_ok = sum(r["success"] for r in state["records"])
        bar.set_postfix(success=f"{n_ok}/{len(state['records'])}")

    def fault(i, slots, err: WorkerFault):
        slot = slots[i]
        state["restarts"] = pool.n_restarts
        finish(i, slots, {"success": False, "steps": slot.steps, "return": slot.ret, "time_to_success": None,
                          "error": str(err)})

    def policy_call(rows, pad_to):
        """Actions (len(rows), Ta, A) for the episodes of `rows`; also whether the call drew noise
        from the generator."""
        batch = {
            key: torch.from_numpy(np.stack([np.stack([o[key] for o in slots[i].history]) for i in rows]))
            for key in cfg.obs_shapes
        }
        batch = {k: _pad_rows(v.float() if v.dtype == torch.float64 else v, pad_to).to(device)
                 for k, v in batch.items()}
        before = generator.get_state()
        t0 = time.perf_counter()
        with torch.inference_mode():
            actions = policy.predict_action(batch, generator=generator)
        actions = actions[: len(rows)].detach().to("cpu", torch.float64).numpy()
        state["policy_s"] += time.perf_counter() - t0
        state["policy_calls"] += 1
        return actions, not torch.equal(before, generator.get_state())

    with EnvPool(n_workers, env_spec) as pool:
        state["t_ready"] = time.perf_counter()
        slots: list[_Slot | None] = [None] * n_workers
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
                    slots[i] = _Slot(ep, deadline=time.monotonic() + episode_timeout_s)
                    err = pool.send(i, ("reset", ep))
                    if err is not None:
                        fault(i, slots, err)
                    else:
                        pending[i] = "reset"
            # 2. the policy acts for the waiting episodes (in lockstep: once every worker answered)
            if ready and (pipelined or not pending):
                rows = sorted(ready)
                ready.clear()
                groups = [rows[k:k + pad_batch] for k in range(0, len(rows), pad_batch)] if pipelined else [rows]
                for group in groups:
                    actions, drew_noise = policy_call(group, pad_batch)
                    if pipelined is None:
                        pipelined = not drew_noise
                        state["schedule"] = "pipelined" if pipelined else "lockstep"
                    # receding horizon: each worker executes the first n_exec actions of its chunk
                    for j, i in enumerate(group):
                        err = pool.send(i, ("act", (actions[j, :n_exec], To)))
                        if err is not None:
                            fault(i, slots, err)
                        else:
                            pending[i] = "act"
            if not pending:
                continue
            # 3. whichever workers answer first
            replies = pool.receive({i: slots[i].deadline for i in pending})
            for i, reply in replies.items():
                cmd = pending.pop(i)
                if isinstance(reply, WorkerFault):
                    fault(i, slots, reply)
                    continue
                slot = slots[i]
                if cmd == "reset":
                    if not shapes_checked:
                        _check_obs_shapes(reply, cfg.obs_shapes, env_spec.task, source)
                        shapes_checked = True
                    slot.history = deque([reply] * To, maxlen=To)
                    ready.add(i)
                    continue
                state["env_steps"] += reply["steps"] - slot.steps
                slot.steps, slot.ret = reply["steps"], reply["return"]
                slot.history.extend(reply["obs"])
                if reply["done"]:
                    finish(i, slots, reply["record"])
                else:
                    ready.add(i)
        state["t_done"] = time.perf_counter()  # the last episode ended; closing the workers follows
    bar.close()


def _pad_rows(x, n: int):
    """Pad a batch to at least n rows by repeating its first row.

    CPU matrix kernels pick a different summation order for tiny batches (measured: batch 1-3
    vs >= 4 differ in the last float32 bit), so without padding an episode's actions would depend
    on how many episodes share its batch, i.e. on the worker count.
    """
    if x.shape[0] >= n:
        return x
    import torch

    return torch.cat([x, x[:1].expand(n - x.shape[0], *x.shape[1:])], dim=0)


def _summarize(task, state, protocol, interrupted, out_dir) -> EvalResult:
    records = sorted(state["records"], key=lambda r: r["episode"])
    stats = success_stats(records)
    end = time.perf_counter()
    done = state.get("t_done", end)
    running = done - state.get("t_ready", done)  # from the workers' start to the last episode's end
    timing = {
        "wall_s": round(end - state["t0"], 3),
        "startup_s": round(state.get("t_ready", end) - state["t0"], 3),
        "shutdown_s": round(end - done, 3),
        "env_steps": state["env_steps"],
        "env_steps_per_s": round(state["env_steps"] / running, 2) if running > 0 else None,
        "policy_calls": state["policy_calls"],
        "policy_ms_per_call": round(1000 * state["policy_s"] / state["policy_calls"], 3)
        if state["policy_calls"] else None,
        "worker_restarts": state["restarts"],
        "schedule": state.get("schedule"),
    }
    return EvalResult(task=task, **vars(stats), protocol=protocol, timing=timing, interrupted=interrupted,
                      episodes=records, out_dir=out_dir, action_errors=state["action_errors"])


def evaluate_checkpoint(
    checkpoint: str,
    episodes: int = 50,
    workers: int = 1,
    seed_base: int = DEFAULT_SEED_BASE,
    horizon: int | None = None,
    device: str = "cpu",
    init: str = "random",
    demos: str | None = None,
    n_action_steps: int | None = None,
    videos: int = 0,
    out_dir: str | None = None,
    episode_timeout_s: float = DEFAULT_EPISODE_TIMEOUT_S,
    task: str | None = None,
    ema: bool = True,
    progress: bool = True,
    **kwargs,
) -> EvalResult:
    """Load a checkpoint folder and evaluate it on the task recorded in its meta.json.

    Results go to `out_dir` (default <checkpoint>/eval). `task` may name the task explicitly; it
    must then match the checkpoint's. Returns the EvalResult (also written as results.json).
    """
    from dopr.policies import load_checkpoint_meta, load_policy

    meta = load_checkpoint_meta(checkpoint)
    meta_path = os.path.join(checkpoint, "meta.json")
    recorded = checkpoint_task(meta)
    if recorded is None and task is None:
        raise CheckpointMismatch(f"{meta_path}: no recorded task (key 'task'); pass the task explicitly")
    if task is not None and recorded is not None and task != recorded:
        raise CheckpointMismatch(f"{meta_path}: checkpoint was trained on task {recorded!r}, not {task!r}")
    task = task or recorded
    policy = load_policy(checkpoint, ema=ema, device=device)
    from dopr.envs import task_spec

    _check_meta_schema(meta, policy.config, meta_path, task_spec(task))
    if out_dir is None:
        out_dir = os.path.join(checkpoint, "eval")
    protocol = {"checkpoint": os.path.abspath(checkpoint), "ema": ema, "step": meta.get("step"),
                "val_loss": meta.get("val_loss")}
    return evaluate_policy(policy, task, episodes=episodes, workers=workers, seed_base=seed_base, horizon=horizon,
                           device=device, init=init, demos=demos, n_action_steps=n_action_steps, videos=videos,
                           out_dir=out_dir, episode_timeout_s=episode_timeout_s, progress=progress,
                           protocol=protocol, source=str(checkpoint), **kwargs)


def checkpoint_task(meta: dict) -> str | None:
    """The task a checkpoint was trained on, from meta.json (top level or its protocol section)."""
    for section in (meta, meta.get("protocol") or {}, meta.get("eval_protocol") or {}):
        if isinstance(section, dict) and section.get("task"):
            return section["task"]
    return None


def _check_meta_schema(meta: dict, policy_config, meta_path: str, spec) -> None:
    """The observation schema recorded in meta.json must be the one the policy was built with,
    and its control rate the task's (a policy trained at 20 Hz acts wrongly at 50 Hz)."""
    freq = meta.get("control_freq")
    if freq is not None and spec.control_freq and abs(float(freq) - float(spec.control_freq)) > 1e-6:
        raise CheckpointMismatch(f"{meta_path}: control_freq {freq} but task {spec.name!r} runs at "
                                 f"{spec.control_freq} Hz")
    for section in (meta, meta.get("protocol") or {}, meta.get("eval_protocol") or {}):
        shapes = section.get("obs_shapes") if isinstance(section, dict) else None
        if shapes:
            for key, shape in policy_config.obs_shapes.items():
                if key not in shapes or list(shapes[key]) != list(shape):
                    raise CheckpointMismatch(
                        f"{meta_path}: obs_shapes[{key!r}] = {shapes.get(key)} does not match config.json's {shape}")
            return
