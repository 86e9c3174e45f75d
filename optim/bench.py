"""`dopr bench optim`: the cost of DoPr against AdamW, measured side by side in one run.

1. Whole training steps (forward, backward, optimizer step) of an MLP BC policy and of the
   diffusion policy's 1D-conv UNet (dopr.policies.unet1d) with AdamW and DoPr variants.
   The optimizers take turns (interleaved, rotating order) so machine noise hits all of them alike;
   each timed block is a whole number of refresh periods, so the factorization's cost is amortized
   as in training. Printed: median time per step and memory, as ratios to the first optimizer.
2. The optimizer step on one Linear(w, w) layer, batch 256, for widths 256 .. 4096, for every optimizer.

An optimizer is a build() name with DoPr settings after colons, e.g.
    dopr bench optim --optimizers adamw dopr-adamw:stats=same-batch dopr-adamw:stats=ema:precond_every=20 \
        dopr-adamw:conv=channel
(settings: damping, damping_mode, stats, stats_every, precond_every, conv; the --damping etc. flags set
the defaults of every DoPr optimizer).

Memory: on CUDA the peak allocated during the timed steps (above what was resident before); on CPU,
where torch keeps no allocator statistics, the bytes held between steps (parameters, gradients,
optimizer state including DoPr's statistics and factors).
"""

from __future__ import annotations

import argparse
import inspect
import math
import statistics
import time

from .names import CONV_FORMS, DAMPING_MODES, STAT_MODES

SETTINGS = {"damping": float, "damping_mode": str, "stats": str, "stats_every": int, "precond_every": int,
            "conv": str}


def parse_spec(spec: str, defaults: dict) -> tuple[str, dict]:
    """"dopr-adamw:stats=ema:precond_every=20" -> ("dopr-adamw", {...defaults, stats: "ema", precond_every: 20})."""
    name, *settings = spec.split(":")
    kw = dict(defaults) if name.startswith("dopr") else {}
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep or key not in SETTINGS:
            raise SystemExit(f"--optimizers {spec!r}: {item!r} is not KEY=VALUE with KEY in {sorted(SETTINGS)}")
        kw[key] = SETTINGS[key](value)
    return name, kw


def parse_args(argv):
    p = argparse.ArgumentParser(prog="dopr bench optim", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: the machine is shared)")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu", help="cpu or cuda")
    p.add_argument("--clock", choices=["cpu", "wall"], default=None,
                   help="cpu: this process's CPU time, which other jobs on a shared machine do not inflate (default "
                        "on a CPU); wall: elapsed time (default on CUDA, where the work is not this process's "
                        "CPU time)")
    p.add_argument("--optimizers", nargs="+", default=["adamw", "dopr-adamw", "muon", "dopr-muon"],
                   help="optimizers to compare (first one is the reference for the ratios): dopr.optim.build's "
                        "names with optional ':key=value' DoPr settings, or torch-adamw (torch.optim.AdamW at "
                        "torch's defaults: on a CPU its unfused loop)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds; the median is reported")
    p.add_argument("--periods", type=int, default=1, help="refresh periods (precond_every steps) per timed block")
    p.add_argument("--min-steps", type=int, default=20, help="at least this many steps per timed block")
    p.add_argument("--batch", type=int, default=256, help="MLP batch size")
    p.add_argument("--obs-dim", type=int, default=19, help="MLP observation size")
    p.add_argument("--width", type=int, default=256, help="MLP hidden width")
    p.add_argument("--depth", type=int, default=3, help="MLP hidden layers")
    p.add_argument("--unet-dims", type=int, nargs="+", default=[64, 128, 256],
                   help="UNet down_dims (the diffusion policy's full size is 256 512 1024: minutes per step on one "
                        "CPU thread)")
    p.add_argument("--unet-batch", type=int, default=64, help="UNet batch size")
    p.add_argument("--horizon", type=int, default=16, help="UNet action horizon")
    p.add_argument("--no-unet", action="store_true", help="skip the UNet")
    p.add_argument("--widths", type=int, nargs="*", default=[256, 512, 1024, 2048, 4096],
                   help="layer widths for the optimizer-step scaling table (none to skip)")
    p.add_argument("--width-optimizers", nargs="+", default=None,
                   help="optimizers for the width table (default: --optimizers without the Muon-type ones, whose "
                        "bfloat16 Newton-Schulz at 4096 takes minutes on a CPU)")
    p.add_argument("--damping", type=float, default=None, help="DoPr damping (default: DoPr's)")
    p.add_argument("--damping-mode", choices=DAMPING_MODES, default=None, help="DoPr damping mode (default: DoPr's)")
    p.add_argument("--stats", choices=STAT_MODES, default=None, help="DoPr statistics mode (default: DoPr's)")
    p.add_argument("--conv", choices=CONV_FORMS, default=None, help="DoPr conv form (default: DoPr's)")
    p.add_argument("--stats-every", type=int, default=None, help="DoPr stats_every (default: DoPr's)")
    p.add_argument("--precond-every", type=int, default=None, help="DoPr precond_every (default: DoPr's)")
    return p.parse_args(argv)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from torch import nn

    from dopr.optim import DoPr

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    use_cpu_clock = (args.clock or ("cpu" if device.type == "cpu" else "wall")) == "cpu"
    clock = time.process_time if use_cpu_clock else time.perf_counter
    flags = {k: v for k, v in dict(damping=args.damping, damping_mode=args.damping_mode, stats=args.stats,
                                   stats_every=args.stats_every, precond_every=args.precond_every,
                                   conv=args.conv).items() if v is not None}
    specs = {spec: parse_spec(spec, flags) for spec in args.optimizers}
    defaults = {k: v.default for k, v in inspect.signature(DoPr).parameters.items()}
    period = 1
    for name, kw in specs.values():
        if name.startswith("dopr"):
            measured = {**defaults, **kw}  # report the settings actually measured
            every = 1 if measured["stats"] == "same-batch" else measured["precond_every"]
            period = math.lcm(period, every, measured["stats_every"])
    steps = period * max(args.periods, math.ceil(args.min_steps / period))
    print(f"device {device}, {args.threads} thread(s), {'CPU' if use_cpu_clock else 'wall'} time; DoPr defaults "
          f"damping={defaults['damping']} damping_mode={defaults['damping_mode']} stats={defaults['stats']} "
          f"precond_every={defaults['precond_every']} "
          f"conv={defaults['conv']}; flags {flags or 'none'}; {steps} steps per timed block, median of "
          f"{args.repeats} interleaved rounds")

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def compare(title, make_model, make_loss):
        runs = {}
        for name in args.optimizers:
            model = make_model().to(device)
            opt = _build(*specs[name], model)
            runs[name] = dict(model=model, opt=opt, times=[], peaks=[])
            _train(model, opt, make_loss, steps)  # warm-up: the first refresh, allocator, caches
        for r in range(args.repeats):
            order = args.optimizers[r % len(args.optimizers):] + args.optimizers[:r % len(args.optimizers)]
            for name in order:
                run = runs[name]
                if device.type == "cuda":
                    sync()
                    base = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                sync()
                t0 = clock()
                _train(run["model"], run["opt"], make_loss, steps)
                sync()
                run["times"].append((clock() - t0) / steps)
                run["peaks"].append(torch.cuda.max_memory_allocated() - base if device.type == "cuda"
                                    else _held_bytes(run["model"], run["opt"]))
        ref = args.optimizers[0]
        t_ref = statistics.median(runs[ref]["times"])
        m_ref = max(runs[ref]["peaks"])
        mem = "peak MiB" if device.type == "cuda" else "held MiB"
        tmin_ref = min(runs[ref]["times"])
        # median: the typical step; min: the least disturbed by other processes on a shared machine
        wide = max(12, *map(len, runs))
        print(f"\n{title}\n  {'optimizer':<{wide}} {'ms/step':>9} {'time x':>7} {'(min) x':>8} {mem:>9} {'mem x':>6}")
        for name, run in runs.items():
            t, m = statistics.median(run["times"]), max(run["peaks"])
            print(f"  {name:<{wide}} {1e3 * t:9.2f} {t / t_ref:7.2f} {min(run['times']) / tmin_ref:8.2f} "
                  f"{m / 2**20:9.1f} {m / m_ref:6.2f}", flush=True)
        del runs

    # ---- 1. whole training steps
    obs_dim, act_dim = args.obs_dim, 7

    def make_mlp():
        torch.manual_seed(0)
        layers, d = [], obs_dim
        for _ in range(args.depth):
            layers += [nn.Linear(d, args.width), nn.Mish()]
            d = args.width
        return nn.Sequential(*layers, nn.Linear(d, act_dim))

    x = torch.randn(args.batch, obs_dim, device=device)
    y = torch.randn(args.batch, act_dim, device=device)
    compare(f"MLP {obs_dim}-{'x'.join([str(args.width)] * args.depth)}-{act_dim}, batch {args.batch}",
            make_mlp, lambda m: nn.functional.mse_loss(m(x), y))

    if not args.no_unet:
        from dopr.policies.unet1d import ConditionalUnet1D

        a_dim, cond_dim, b = 10, 2 * obs_dim, args.unet_batch
        sample = torch.randn(b, args.horizon, a_dim, device=device)
        t = torch.randint(0, 100, (b,), device=device)
        cond = torch.randn(b, cond_dim, device=device)

        def make_unet():
            torch.manual_seed(0)
            return ConditionalUnet1D(a_dim, cond_dim, down_dims=tuple(args.unet_dims))

        n_params = sum(p.numel() for p in make_unet().parameters())
        compare(f"1D-conv UNet down_dims={tuple(args.unet_dims)} ({n_params / 1e6:.1f}M params), "
                f"horizon {args.horizon}, "
                f"batch {b}", make_unet, lambda m: nn.functional.mse_loss(m(sample, t, cond), sample))

    # ---- 2. optimizer-step cost against layer width
    if args.widths:
        names = args.width_optimizers or [n for n in args.optimizers if not specs[n][0].endswith("muon")]
        specs.update({n: parse_spec(n, flags) for n in names if n not in specs})
        wide = max(12, *map(len, names))
        print(f"\nOne Linear(w, w), batch 256, ms per step (amortized over {steps} steps, median of {args.repeats}); "
              f"step x = whole step (fwd+bwd+opt) / {names[0]}'s")
        print(f"  {'width':>6} {'optimizer':<{wide}} {'fwd+bwd':>8} {'opt':>8} {'step x':>7}")
        for w in args.widths:
            xw = torch.randn(256, w, device=device)
            fb, opt_ms = {}, {}
            for name in names:
                torch.manual_seed(0)
                layer = nn.Linear(w, w).to(device)
                opt = _build(*specs[name], layer)
                blocks = []
                for r in range(args.repeats + 1):  # the first block is a warm-up
                    fwd_bwd, step_times = 0.0, 0.0
                    for _ in range(steps):
                        sync()
                        t0 = clock()
                        opt.zero_grad()
                        layer(xw).square().mean().backward()  # with DoPr's hooks where they record
                        sync()
                        t1 = clock()
                        opt.step()
                        sync()
                        fwd_bwd += t1 - t0
                        step_times += clock() - t1
                    blocks.append((fwd_bwd / steps, step_times / steps))
                fb[name] = 1e3 * statistics.median(x[0] for x in blocks[1:])
                opt_ms[name] = 1e3 * statistics.median(x[1] for x in blocks[1:])
                del layer, opt
            ref = fb[names[0]] + opt_ms[names[0]]
            for name in names:
                print(f"  {w:>6} {name:<{wide}} {fb[name]:8.2f} {opt_ms[name]:8.2f} "
                      f"{(fb[name] + opt_ms[name]) / ref:7.2f}", flush=True)
    return 0


def _build(name: str, dopr_kw: dict, model):
    import torch

    from dopr.optim import build

    if name == "torch-adamw":  # what a user gets without asking for the fused kernel
        return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-2)
    return build(name, model, lr=1e-4, **dopr_kw)


def _train(model, opt, make_loss, steps: int) -> None:
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        make_loss(model).backward()
        opt.step()


def _held_bytes(model, opt) -> int:
    import torch

    tensors = {id(p): p for p in model.parameters()}
    tensors.update({id(p.grad): p.grad for p in model.parameters() if p.grad is not None})
    for state in opt.state.values():
        tensors.update({id(v): v for v in state.values() if torch.is_tensor(v)})
    return sum(t.numel() * t.element_size() for t in tensors.values())


if __name__ == "__main__":
    raise SystemExit(main())
