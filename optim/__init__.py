"""DoPr (double preconditioning) and the optimizers it is compared with.

Attributes load on first use, so `from dopr.optim import OPTIMIZERS` does not import torch.
"""

import sys
import types
from importlib import import_module

_WHERE = {"DoPr": "dopr", "build": "build", "warmup_cosine": "schedules", "warmup_cosine_factor": "schedules",
          "OPTIMIZERS": "names", "STAT_MODES": "names", "DAMPING_MODES": "names", "CONV_FORMS": "names"}
__all__ = list(_WHERE)


def __getattr__(name):
    if name not in _WHERE:
        raise AttributeError(f"module 'dopr.optim' has no attribute {name!r}")
    value = getattr(import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    def __setattr__(self, name, value):
        # importing the submodule dopr.optim.build must not hide the function dopr.optim.build
        if not (name in _WHERE and isinstance(value, types.ModuleType)):
            super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
