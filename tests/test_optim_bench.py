"""`dopr bench optim` runs end to end on tiny sizes (its numbers are printed, never asserted)."""

import pytest
import torch

from dopr.optim import bench

torch.set_num_threads(1)


def test_bench_runs_and_prints_ratios(capsys):
    argv = ["--repeats", "1", "--batch", "8", "--width", "16", "--depth", "2", "--unet-dims", "8", "16",
            "--unet-batch", "2", "--horizon", "4", "--widths", "32", "--precond-every", "2", "--stats-every", "1",
            "--optimizers", "adamw", "dopr-adamw", "dopr-muon", "torch-adamw"]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    for needle in ("MLP 19-16x16-7", "1D-conv UNet", "dopr-adamw", "dopr-muon", "torch-adamw", "time x", "width"):
        assert needle in out


def test_bench_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--help"])
    assert exit_info.value.code == 0 and "AdamW" in capsys.readouterr().out
