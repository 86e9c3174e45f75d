"""One episode of a task, one action at a time: the loop collection, replay and evaluation all run.

    loop = EpisodeLoop(env, stop_on_success=True, max_steps=horizon)
    obs = loop.start(env.reset(seed=s)[0])
    while not loop.done:
        obs, reward, info = loop.step(choose(obs))
    loop.success, loop.time_to_success, loop.steps, loop.ret

An episode ends at its first success (with stop_on_success; without it, success means "succeeded at
some step"), when the env terminates or truncates (its horizon), or after max_steps. Who chooses the
actions (an expert, stored actions, a policy's chunk) is the caller's business.
"""

from __future__ import annotations


class EpisodeLoop:
    def __init__(self, env, stop_on_success: bool = True, max_steps: int | None = None):
        self.env, self.stop_on_success, self.max_steps = env, stop_on_success, max_steps
        self.start(None)

    def start(self, obs):
        """A new episode from `obs` (the env was just reset); returns obs."""
        self.steps, self.ret, self.success, self.time_to_success, self.done = 0, 0.0, False, None, False
        return obs

    def step(self, action):
        """Execute one action; returns (obs, reward, info) and sets `done` when the episode ended."""
        if self.done:
            raise RuntimeError("EpisodeLoop.step after the episode ended; call start() first")
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.steps += 1
        self.ret += float(reward)
        if info.get("success", False) and not self.success:
            self.success, self.time_to_success = True, self.steps
        self.done = bool((self.success and self.stop_on_success) or terminated or truncated
                         or (self.max_steps is not None and self.steps >= self.max_steps))
        return obs, reward, info
