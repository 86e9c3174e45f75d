"""Train an RL expert with stable-baselines3's SAC, in chunks that survive a kill.

    dopr expert train --task humanoid --steps 1000000 --out out/experts/humanoid

Needs the optional extra: pip install -e ".[rl]". No RL algorithm is written here: SAC is
stable-baselines3's, at its published defaults (lr 3e-4, batch 256, 1M buffer, 256x256 networks,
one gradient step per environment step) with rl-zoo's 10k random warm-up steps for MuJoCo.

Training runs in chunks of `chunk_steps` environment steps. After every chunk the trainer:
  1. evaluates the deterministic actor on `eval_episodes` seeded episodes (through the exported
     ExpertActor, so the file that collection will read is what gets measured);
  2. appends a line to metrics.jsonl (env steps, eval return mean/sd, episode length, train
     return, steps/s) and redraws returns.png;
  3. writes the resume state into trainer/ atomically (a new folder, then a rename): SB3's own
     archive (policy, optimizers, entropy coefficient, step counters), the filled part of the
     replay buffer as .npy arrays, and the torch / numpy / python / environment RNG states;
  4. exports the actor (dopr.envs.expert_actor) to latest/, and to the top folder when its
     evaluation return is the best so far (or it meets `stop_at_return`, which ends training): the
     top folder is the expert that collection uses.
A kill loses at most the chunk in progress; re-running the same command continues from the last
chunk (the episode in progress at the kill is restarted, since the simulator's mid-episode state
is not part of the checkpoint).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from dopr.atomic import json_line, json_safe
from dopr.lazy import require

# the replay-buffer fields of stable-baselines3's ReplayBuffer that hold transitions
BUFFER_FIELDS = ("observations", "next_observations", "actions", "rewards", "dones", "timeouts")


@dataclass
class SACConfig:
    env_id: str
    steps: int = 1_000_000  # total environment steps
    seed: int = 0
    chunk_steps: int = 20_000  # environment steps between evaluations and checkpoints
    eval_episodes: int = 5
    learning_starts: int = 10_000  # random-action warm-up (rl-zoo's value for MuJoCo)
    buffer_size: int = 1_000_000
    batch_size: int = 256
    learning_rate: float = 3e-4
    gradient_steps: int = 1  # gradient steps per environment step (the update ratio)
    hidden: tuple[int, ...] = (256, 256)
    threads: int = 1
    # stop early at the first evaluation whose mean return reaches this with every episode at the horizon
    # (a goal met, as rl-zoo's StopTrainingOnRewardThreshold does; survival too, since one lucky long episode
    # can lift a mean while the others fall); None trains to `steps`
    stop_at_return: float | None = None


# SACConfig fields that may change between a run and its resumption: they do not change what is trained
RESUMABLE_CHANGES = ("steps", "chunk_steps", "eval_episodes", "threads", "stop_at_return")


def require_sb3():
    return require("stable_baselines3", "rl", "training an RL expert")


def _make_vec_env(env_id: str):
    import gymnasium
    from stable_baselines3.common.monitor import Monitor
    from stable_baselines3.common.vec_env import DummyVecEnv

    return DummyVecEnv([lambda: Monitor(gymnasium.make(env_id))])


def export_actor(model, config: SACConfig, extra: dict):
    """The SB3 SAC actor as an ExpertActor: hidden Linear layers of latent_pi, then mu."""
    import torch

    from dopr.envs.expert_actor import ExpertActor

    actor = model.policy.actor
    linears = [m for m in actor.latent_pi if isinstance(m, torch.nn.Linear)] + [actor.mu]
    weights = [(m.weight.detach().cpu().numpy(), m.bias.detach().cpu().numpy()) for m in linears]
    space = model.action_space
    cfg = dict(env_id=config.env_id, obs_dim=int(weights[0][0].shape[1]), action_dim=int(space.shape[0]),
               activation="relu", squash="tanh", action_low=space.low.tolist(), action_high=space.high.tolist(),
               trainer=f"stable-baselines3 {require_sb3().__version__} SAC", sac_config=asdict(config), **extra)
    return ExpertActor(weights, cfg)


def evaluate_actor(actor, env_id: str, episodes: int, seed: int) -> dict:
    """Mean and sd of the return and length of `episodes` deterministic episodes on seeds seed, seed+1, ..."""
    import gymnasium

    env = gymnasium.make(env_id)
    returns, lengths, survived = [], [], 0
    for i in range(episodes):
        obs, _ = env.reset(seed=seed + i)
        total, n, terminated, truncated = 0.0, 0, False, False
        while not (terminated or truncated):
            obs, reward, terminated, truncated, _ = env.step(actor.act_vector(obs))
            total += float(reward)
            n += 1
        returns.append(total)
        lengths.append(n)
        survived += not terminated  # ended by the time limit: the horizon reached
    env.close()
    return dict(eval_return_mean=float(np.mean(returns)), eval_return_sd=float(np.std(returns)),
                eval_length_mean=float(np.mean(lengths)), eval_returns=[round(r, 2) for r in returns],
                eval_survived=survived)


def goal_met(row: dict, config: SACConfig) -> bool:
    """Whether an evaluation row meets config.stop_at_return: the mean return reached, every episode survived (rows
    written before survival was recorded never do)."""
    return (config.stop_at_return is not None and bool(row)
            and row["eval_return_mean"] >= config.stop_at_return
            and row.get("eval_survived") == len(row.get("eval_returns", ())))


# --- resume state ------------------------------------------------------------------------------
def _save_state(model, vec_env, folder: Path) -> None:
    """Write the resume state into folder/trainer (atomically: a full new folder, then renames)."""
    import torch

    tmp, final, old = folder / "trainer.tmp", folder / "trainer", folder / "trainer.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save(tmp / "sac.zip", exclude=["replay_buffer"])
    rb = model.replay_buffer
    n = rb.buffer_size if rb.full else rb.pos
    for name in BUFFER_FIELDS:
        np.save(tmp / f"replay_{name}.npy", getattr(rb, name)[:n])
    env = vec_env.envs[0].unwrapped
    rng = dict(python=json_safe(random.getstate()), numpy=json_safe(np.random.get_state()),
               torch=torch.get_rng_state().tolist(), env=env.np_random.bit_generator.state,
               action_space=model.action_space.np_random.bit_generator.state,
               replay=dict(pos=int(rb.pos), full=bool(rb.full)))
    (tmp / "state.json").write_text(json.dumps(rng))
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _load_state(folder: Path, vec_env):
    """The model and replay buffer saved by _save_state, with every RNG restored."""
    import torch
    from stable_baselines3 import SAC

    path = folder / "trainer"
    if not path.exists() and (folder / "trainer.old").exists():
        path = folder / "trainer.old"  # killed between the two renames
    model = SAC.load(path / "sac.zip", env=vec_env, device="cpu")
    state = json.loads((path / "state.json").read_text())
    rb = model.replay_buffer
    for name in BUFFER_FIELDS:
        arr = np.load(path / f"replay_{name}.npy")
        getattr(rb, name)[: len(arr)] = arr
    rb.pos, rb.full = state["replay"]["pos"], state["replay"]["full"]
    random.setstate(_python_state(state["python"]))
    np.random.set_state(tuple(state["numpy"]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    vec_env.envs[0].unwrapped.np_random.bit_generator.state = state["env"]
    model.action_space.np_random.bit_generator.state = state["action_space"]
    # the simulator's mid-episode state is not saved: start a new episode on resume
    model._last_obs = None
    return model


def _python_state(x):
    return (x[0], tuple(x[1]), x[2])


# --- metrics -------------------------------------------------------------------------------------
def read_metrics(folder: Path) -> list[dict]:
    path = Path(folder) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_returns(folder: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(folder)
    steps = np.array([r["env_steps"] for r in rows])
    mean = np.array([r["eval_return_mean"] for r in rows])
    sd = np.array([r["eval_return_sd"] for r in rows])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, mean, marker="o", ms=3, label="evaluation return (deterministic)")
    ax.fill_between(steps, mean - sd, mean + sd, alpha=0.25, label="+- sd over episodes")
    train = [(r["env_steps"], r["train_return_mean"]) for r in rows if r.get("train_return_mean") is not None]
    if train:
        ax.plot(*zip(*train), lw=1, alpha=0.7, label="training return (stochastic, last 100 episodes)")
    ax.set_xlabel("environment steps")
    ax.set_ylabel("return")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(folder) / "returns.png"
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


# --- the training run ---------------------------------------------------------------------------
def train_sac_expert(config: SACConfig, out: str | Path, progress: bool = True) -> dict:
    """Train (or resume) SAC on config.env_id until config.steps environment steps; returns the last metrics row.
    One process trains an expert folder at a time: a second one on it is refused (dopr.folder_lock)."""
    from dopr.folder_lock import FolderLock

    require_sb3()
    with FolderLock.acquire(out, "dopr expert train"):
        return _train(config, Path(out), progress)


def _train(config: SACConfig, out: Path, progress: bool) -> dict:
    import torch
    from stable_baselines3 import SAC
    from stable_baselines3.common.callbacks import BaseCallback
    from tqdm import tqdm

    torch.set_num_threads(config.threads)
    saved = out / "sac_config.json"
    if saved.exists():
        before = json.loads(saved.read_text())
        changed = {k: (before.get(k), v) for k, v in asdict(config).items()
                   if k not in RESUMABLE_CHANGES and before.get(k) != json_safe(v)}
        if changed:
            raise SystemExit(f"{out}: already holds a run with other settings {changed} (was, now); "
                             "choose another --out or the same settings")
    saved.write_text(json.dumps(asdict(config), indent=2) + "\n")

    vec_env = _make_vec_env(config.env_id)
    if (out / "trainer").exists() or (out / "trainer.old").exists():
        model = _load_state(out, vec_env)
    else:
        random.seed(config.seed)
        np.random.seed(config.seed)
        model = SAC("MlpPolicy", vec_env, seed=config.seed, device="cpu", verbose=0,
                    learning_rate=config.learning_rate, buffer_size=config.buffer_size,
                    batch_size=config.batch_size, learning_starts=config.learning_starts,
                    gradient_steps=config.gradient_steps,
                    policy_kwargs=dict(net_arch=list(config.hidden)))
    rows = read_metrics(out)
    best = max((r["eval_return_mean"] for r in rows), default=-math.inf)
    bar = tqdm(total=config.steps, initial=model.num_timesteps, unit="step", disable=not progress,
               desc=f"SAC {config.env_id}", dynamic_ncols=True)

    class Progress(BaseCallback):
        def _on_step(self) -> bool:
            bar.update(1)
            return True

    last = rows[-1] if rows else {}
    while model.num_timesteps < config.steps and not goal_met(last, config):
        chunk = min(config.chunk_steps, config.steps - model.num_timesteps)
        start, t0 = model.num_timesteps, time.perf_counter()
        model.learn(total_timesteps=chunk, reset_num_timesteps=False, callback=Progress())
        train_s = time.perf_counter() - t0
        episodes = [e["r"] for e in model.ep_info_buffer]
        fields = dict(env_steps=int(model.num_timesteps), eval_seed=10_000)
        actor = export_actor(model, config, fields)
        stats = evaluate_actor(actor, config.env_id, config.eval_episodes, seed=10_000)
        row = dict(env_steps=int(model.num_timesteps), **stats,
                   train_return_mean=float(np.mean(episodes)) if episodes else None,
                   steps_per_s=round((model.num_timesteps - start) / train_s, 1), wall_time=time.time())
        actor.config.update(stats)
        actor.save(out / "latest")
        if stats["eval_return_mean"] > best or goal_met(row, config):  # the goal-meeting actor is the expert
            best = max(best, stats["eval_return_mean"])
            actor.save(out)
        _save_state(model, vec_env, out)
        # the metrics line goes last: a row in metrics.jsonl always has its checkpoint on disk
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json_line(row))
            f.flush()
            os.fsync(f.fileno())
        plot_returns(out, f"SAC expert, {config.env_id}")
        bar.set_postfix(eval_return=f"{stats['eval_return_mean']:.0f}", best=f"{best:.0f}")
        last = row
    bar.close()
    if goal_met(last, config):
        print(f"{out}: stopped at {last['env_steps']} env steps: evaluation return {last['eval_return_mean']:.1f} "
              f">= {config.stop_at_return:g} with all {last['eval_survived']} episodes at the horizon")
    vec_env.close()
    return last
