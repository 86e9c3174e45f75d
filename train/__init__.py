"""dopr.train: the training stage (library; `dopr train` is its command line).

TrainConfig declares every option once; the loop (`train`) reads top to bottom; batches, checkpoint
state and resume, validation and the metrics log are one file each. Names are imported on first use.
"""

from dopr.lazy import lazy_exports

_EXPORTS = {
    "TrainConfig": "dopr.train.config",
    "POLICY_KINDS": "dopr.train.config",
    "OPTIMIZERS": "dopr.train.config",
    "train": "dopr.train.loop",
    "train_step": "dopr.train.loop",
    "StepBatches": "dopr.train.batches",
    "validate": "dopr.train.validation",
    "MetricsLog": "dopr.train.metrics_log",
}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
