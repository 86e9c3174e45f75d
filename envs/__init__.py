"""Tasks (robosuite and gymnasium MuJoCo) behind one interface, and their scripted experts."""

# MuJoCo picks its OpenGL backend when it is first imported: choose it before anything below
# imports mujoco (dopr.envs.rendering explains the choice).
from dopr.envs.rendering import configure_gl_backend

configure_gl_backend()

from dopr.envs.task_spec import TaskSpec  # noqa: E402
from dopr.envs.tasks import TASKS, list_tasks, make, make_expert, primary_metric, task_spec  # noqa: E402

__all__ = ["TASKS", "TaskSpec", "list_tasks", "make", "make_expert", "primary_metric", "task_spec"]
