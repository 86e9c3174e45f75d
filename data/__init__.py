"""dopr.data: the episode store (zarr), its validation, the train/val split, the sequence sampler,
the torch dataset on top, normalizer statistics, importers (robomimic, LeRobot) and the LeRobot exporter.

Names are imported on first use, so that importing a light submodule does not pay for zarr or torch.
"""

from dopr.lazy import lazy_exports

_EXPORTS = {
    "EpisodeStore": "dopr.data.episode_store",
    "EpisodeStoreError": "dopr.data.validate",
    "check_finite": "dopr.data.validate",
    "SequenceDataset": "dopr.data.sequence_dataset",
    "SequenceSampler": "dopr.data.sequence_sampler",
    "compute_stats": "dopr.data.stats",
    "split_episodes": "dopr.data.split",
    "record_split": "dopr.data.split",
    "resolve_split": "dopr.data.split",
    "import_robomimic": "dopr.data.robomimic_import",
    "import_lerobot": "dopr.data.lerobot_import",
    "export_lerobot": "dopr.data.lerobot_export",
}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
