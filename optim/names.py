"""The names DoPr's options and the command line accept, in one torch-free place (`dopr --help` imports it)."""

BASES = ("adamw", "muon", "signum", "adamuon", "sgd")
BASE_OPTIMIZERS = ("adamw", "muon", "signum", "adamuon")
# Every optimizer `build` knows (the CLIs' choices): each compared base with and without AP.
OPTIMIZERS = tuple(f"dopr-{b}" for b in BASE_OPTIMIZERS) + BASE_OPTIMIZERS
STAT_MODES = ("batch", "ema", "same-batch")
DAMPING_MODES = ("trace", "mean_eig")
CONV_FORMS = ("channel", "patch")
