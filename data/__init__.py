"""dopr.data: the episode store (zarr), its validation, the train/val split, the sequence sampler,
the torch dataset on top, normalizer statistics, and importers."""

from dopr.data.episode_store import EpisodeStore
from dopr.data.replay import ReplayResult, check_replay, replay_episode, stored_success
from dopr.data.robomimic_import import import_robomimic
from dopr.data.sequence_sampler import SequenceSampler
from dopr.data.split import record_split, resolve_split, split_episodes
from dopr.data.stats import compute_stats
from dopr.data.validate import EpisodeStoreError


def __getattr__(name):
    # SequenceDataset needs torch; importing it lazily keeps `import dopr.data` light for writers
    # (the collector's processes, `dopr data info`), which only need the store.
    if name == "SequenceDataset":
        from dopr.data.sequence_dataset import SequenceDataset

        return SequenceDataset
    raise AttributeError(f"module 'dopr.data' has no attribute {name!r}")


__all__ = [
    "EpisodeStore", "EpisodeStoreError", "SequenceDataset", "SequenceSampler", "compute_stats",
    "split_episodes", "record_split", "resolve_split", "import_robomimic", "check_replay",
    "replay_episode", "stored_success", "ReplayResult",
]
