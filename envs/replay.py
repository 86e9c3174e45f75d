"""Replay stored actions from a stored simulator state and check the outcome is reproduced.

The env comes from the caller (a factory): any env with `reset_to_state(state) -> obs`, `get_state()`
and gymnasium's `step` returning `info["success"]` works (the contract of dopr.envs).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dopr.envs.episode import EpisodeLoop


@dataclass
class ReplayResult:
    episode: int
    steps: int  # actions replayed
    stored_success: bool
    replay_success: bool
    max_state_error: float  # max |state after step t - stored state[t+1]| (nan without comparable states)

    @property
    def ok(self) -> bool:
        return self.stored_success == self.replay_success


def stored_success(store, episode: int, success_key: str = "success") -> bool:
    """Whether the stored episode succeeded: any step of data/<success_key> when the store has it,
    else attrs["episode_success"][episode] (written by `dopr collect`), else True: stores without
    either hold only successful demonstrations (robomimic's, diffusion_policy's)."""
    if success_key in store.keys:
        start, end = store.episode_range(episode)
        return bool(np.any(store.array(success_key)[start:end]))
    recorded = dict(store.attrs).get("episode_success") or []
    if episode < len(recorded):
        return bool(recorded[episode])
    return True


def replay_action_key(store) -> str:
    """The actions that were sent to the simulator: `executed_action` when the collector added
    noise (then `action` is the clean expert label), else `action`."""
    return "executed_action" if "executed_action" in store.keys else "action"


def replay_episode(store, episode: int, env, state_key: str = "state", action_key: str | None = None,
                   success_key: str = "success") -> ReplayResult:
    """Reset `env` to the episode's first stored state and step its stored actions
    (`replay_action_key(store)` unless action_key is given)."""
    action_key = action_key or replay_action_key(store)
    data = store.get_episode(episode, keys=[state_key, action_key])
    states, actions = data[state_key], data[action_key]
    loop = EpisodeLoop(env, stop_on_success=False)  # the stored episode decides where it ends
    loop.start(env.reset_to_state(states[0]))
    errors = []
    for t, action in enumerate(actions):
        loop.step(action)
        if t + 1 < len(states):
            state = np.asarray(env.get_state())
            if state.shape == states[t + 1].shape:
                errors.append(float(np.max(np.abs(state - states[t + 1]))))
        if loop.done:
            break
    return ReplayResult(episode, loop.steps, stored_success(store, episode, success_key), loop.success,
                        max(errors) if errors else float("nan"))


def check_replay(store, make_env, episodes=None, progress: bool = True, **kw) -> list[ReplayResult]:
    """Replay `episodes` (all if None) in one env from `make_env()`; returns one result per episode."""
    from tqdm import tqdm

    if store.n_episodes == 0:
        return []
    for key in (kw.get("state_key") or "state", kw.get("action_key") or replay_action_key(store)):
        if key not in store.keys:
            raise KeyError(f"{store.path}: no key data/{key}; replay needs stored simulator states and actions")
    episodes = range(store.n_episodes) if episodes is None else episodes
    env = make_env()
    try:
        return [replay_episode(store, int(i), env, **kw) for i in tqdm(episodes, desc="replay", disable=not progress)]
    finally:
        env.close()
