"""dopr.train: the training stage (library; `dopr train` is its command line).

TrainConfig declares every option once; the loop (`train`) reads top to bottom; batches, checkpoint
state and resume, validation and the metrics log are one file each. Names are imported on first use.
"""

from dopr.lazy import lazy_exports

_EXPORTS = {**dict.fromkeys(("TrainConfig", "POLICY_KINDS", "OPTIMIZERS"), "dopr.train.config"),
            "train": "dopr.train.loop"}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
