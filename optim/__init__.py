"""DoPr (double preconditioning) and the optimizers it is compared with."""

from .build import OPTIMIZERS, build
from .dopr import DoPr
from .schedules import warmup_cosine, warmup_cosine_factor

__all__ = ["DoPr", "build", "OPTIMIZERS", "warmup_cosine", "warmup_cosine_factor"]
