"""Closed-loop evaluation (`dopr eval`), its metrics, and the test-time feedback (TTF) report (`dopr report`).

Names are imported on first use, so that a spawned simulator worker (which imports
dopr.eval.rollout_worker) does not pay for torch.
"""

from dopr.lazy import lazy_exports

_EXPORTS = {
    "evaluate_checkpoint": "dopr.eval.evaluator",
    "checkpoint_evaluation": "dopr.eval.evaluator",
    "evaluate_policy": "dopr.eval.evaluator",
    "CheckpointMismatch": "dopr.eval.evaluator",
    "NonFiniteActions": "dopr.eval.evaluator",
    "EvalConfig": "dopr.eval.config",
    "EvalResult": "dopr.eval.results",
    "wilson_interval": "dopr.eval.metrics",
    "success_stats": "dopr.eval.metrics",
    "spearman": "dopr.eval.metrics",
    "measure_compounding_error": "dopr.eval.compounding_error",
    "build_report": "dopr.eval.report",
}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
