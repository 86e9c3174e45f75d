"""DoPr (double preconditioning) and the optimizers it is compared with.

Attributes load on first use, so `from dopr.optim import OPTIMIZERS` does not import torch.
"""

from importlib import import_module

_WHERE = {"DoPr": "dopr", "build": "build", "warmup_cosine": "schedules", "warmup_cosine_factor": "schedules",
          "OPTIMIZERS": "names", "STAT_MODES": "names", "DAMPING_MODES": "names", "CONV_FORMS": "names"}
__all__ = list(_WHERE)


def __getattr__(name):
    if name not in _WHERE:
        raise AttributeError(f"module 'dopr.optim' has no attribute {name!r}")
    return getattr(import_module(f".{_WHERE[name]}", __name__), name)
