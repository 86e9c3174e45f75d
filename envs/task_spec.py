"""What a task is, independent of the simulator behind it."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TaskSpec:
    """Everything training and evaluation need to know about a task without building it.

    A checkpoint records these fields so that evaluation can refuse an environment whose
    observations or actions do not match what the policy was trained on.
    """

    name: str  # dopr's name, e.g. "lift"
    kind: str  # "robosuite" or "gymnasium"
    env_id: str  # the simulator's own name, e.g. "Lift" or "Reacher-v5"
    horizon: int  # default evaluation horizon in control steps
    lowdim_keys: tuple[str, ...]  # low-dimensional observation keys
    image_keys: tuple[str, ...] = ()  # camera keys when obs="image"
    action_dim: int = 7
    control_freq: float = 20.0  # control steps per second
    demo_steps: int = 0  # typical length of a scripted expert episode (0: unknown)
    # (To, Tp, Ta) that a policy trained on the task's demonstrations gets unless told otherwise (`dopr collect`
    # records it in the store). None: the policies' own (diffusion_policy's 2, 16, 8, for manipulation). The
    # locomotion tasks: one observation to one action, as a 67-125 Hz controller cannot keep its balance while
    # executing open-loop chunks.
    policy_chunks: tuple[int, int, int] | None = None
    extra: dict = field(default_factory=dict)  # simulator-specific construction options


def checked_state(state, size: int, task: str):
    """`state` as the float64 vector of `size` entries that the task's get_state() returns, or a clear error."""
    import numpy as np

    state = np.asarray(state, dtype=np.float64)
    if state.shape != (size,):
        raise ValueError(f"{task}: state has shape {state.shape}, expected ({size},) as returned by get_state() "
                         "for this task")
    return state
