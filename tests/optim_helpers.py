"""Models, data and the DDP worker shared by tests/test_optim*.py (importable by spawned processes)."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from dopr.optim import DoPr


def mlp(d_in=12, width=32, d_out=5, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, width), nn.Tanh(), nn.Linear(width, width), nn.LayerNorm(width),
                         nn.Tanh(), nn.Linear(width, d_out))


class ConvNet(nn.Module):
    """Conv1d + Conv2d + Linear, with stride/padding/dilation and a bias-free layer."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.c1 = nn.Conv1d(3, 6, 3, padding=1)
        self.c2 = nn.Conv1d(6, 4, 3, stride=2, dilation=2, padding=2, bias=False)
        self.head = nn.Linear(4 * 4, 2)

    def forward(self, x):
        h = torch.tanh(self.c1(x))
        h = torch.tanh(self.c2(h))
        return self.head(h.flatten(1))


def batches(n_steps, shape, d_out, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(*shape, generator=g), torch.randn(shape[0], d_out, generator=g)) for _ in range(n_steps)]


def train(model, opt, data):
    for x, y in data:
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()


def ddp_worker(rank, world, init_file, data, out_path, dopr_kw=None):
    import torch.distributed as dist

    torch.set_num_threads(1)
    # A file store, not TCP: no rank hosts a server that the other ranks still talk to while it tears
    # down (with a TCP store, a rank exiting during the other's teardown aborted it now and then).
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = nn.parallel.DistributedDataParallel(ConvNet())
    opt = DoPr(model, lr=1e-2, **(dopr_kw or dict(stats="ema", precond_every=2)))
    assert [b.name for b in opt.blocks] == ["c1", "c2", "head"]  # no "module." prefix
    for x, y in data:
        per_rank = x.shape[0] // world
        part = slice(rank * per_rank, (rank + 1) * per_rank)
        opt.zero_grad()
        F.mse_loss(model(x[part]), y[part]).backward()
        opt.step()
    if rank == 0:
        torch.save(model.module.state_dict(), out_path)
    dist.barrier()
    dist.destroy_process_group()
    # Exit without running C++ static destructors: gloo's background threads can still be joinable
    # then, and destroying a joinable std::thread aborts the process ("terminate called without an
    # active exception") after all the work is done. An exception above still fails the test.
    os._exit(0)
