"""`dopr bench serve`: request latency and throughput of the policy server over loopback.

For each served form of one policy (the checkpoint folder, its TorchScript and ONNX exports) it
starts a real `dopr serve` process on 127.0.0.1, then measures from this process:
- the round-trip latency of single requests (p50, p99) from one client, and
- requests/s with 1 and with 4 concurrent clients (one connection and one thread each),
next to the in-process latency of the same model without the network, so the ratios compare
forms measured side by side in one run.

Without ``--policy`` it builds an MLP checkpoint of the size used on Lift (19-dim observation,
To=2, 3x256 hidden, Tp=16, 7-dim actions; random weights: latency does not depend on them)
under out/bench/serve/.
"""

from __future__ import annotations

import argparse
import select
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

GOAL_P99_MS = 20.0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dopr bench serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", default=None, help="checkpoint folder to serve (default: a Lift-sized MLP checkpoint)")
    p.add_argument("--forms", default="checkpoint,torchscript,onnx",
                   help="comma-separated forms to serve: checkpoint, torchscript, onnx")
    p.add_argument("--requests", type=int, default=500, help="requests per client per measurement")
    p.add_argument("--warmup", type=int, default=20, help="requests per client before measuring")
    p.add_argument("--threads", type=int, default=1, help="inference threads of the server")
    p.add_argument("--out", default="out/bench/serve", help="folder for the default checkpoint and the exports")
    return p


def default_checkpoint(folder: Path) -> Path:
    """A Lift-sized MLP checkpoint (random weights), written once."""
    import torch

    from dopr.policies import PolicyConfig, build_policy, save_checkpoint

    ckpt = folder / "mlp-lift-sized"
    if (ckpt / "meta.json").is_file():
        return ckpt
    torch.manual_seed(0)
    shapes = {"robot0_eef_pos": [3], "robot0_eef_quat": [4], "robot0_gripper_qpos": [2], "object": [10]}
    cfg = PolicyConfig(kind="mlp", obs_shapes=shapes, action_dim=7, n_obs_steps=2, horizon=16, n_action_steps=8)
    rng = np.random.default_rng(0)
    stats = {k: {"min": -np.ones(d), "max": np.ones(d), "mean": np.zeros(d), "std": np.ones(d)}
             for k, d in [*((k, s[0]) for k, s in shapes.items()), ("action", 7)]}
    stats["object"]["max"] = rng.uniform(1, 2, 10)
    policy = build_policy(cfg, stats)
    save_checkpoint(ckpt, policy, meta={"step": 0, "task": "lift", "control_freq": 20.0})
    return ckpt


class ServerProcess:
    """`python -m dopr serve PATH --port 0` on 127.0.0.1; the port is read from its first line."""

    def __init__(self, path: Path, threads: int = 1, timeout: float = 120.0):
        import tempfile

        cmd = [sys.executable, "-m", "dopr", "serve", str(path), "--host", "127.0.0.1", "--port", "0",
               "--threads", str(threads)]
        self._log = tempfile.TemporaryFile(mode="w+")  # the server's log (stderr), shown if it fails to start
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log, text=True)
        deadline = time.monotonic() + timeout
        line = ""
        while "ws://" not in line:
            remaining = deadline - time.monotonic()
            ready = remaining > 0 and select.select([self.proc.stdout], [], [], remaining)[0]
            line = self.proc.stdout.readline() if ready else ""
            if not line:  # timed out, or the process closed its output (it exited)
                tail = self.log_tail()
                self.close()
                raise RuntimeError(f"`{' '.join(cmd)}` did not start serving (exit code {self.proc.returncode}, "
                                   f"waited up to {timeout} s); its log:\n{tail}")
        self.port = int(line.rsplit(":", 1)[1].split()[0])

    def log_tail(self, chars: int = 3000) -> str:
        self._log.seek(0)
        return self._log.read()[-chars:]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        if not self._log.closed:
            self._log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def random_observation(meta: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One request's worth of observation history (To, *shape) per key, in the declared dtypes."""
    obs = {}
    for key in meta["obs_keys"]:
        shape = (meta["n_obs_steps"], *meta["obs_shapes"][key])
        dtype = np.dtype(meta["obs_dtypes"][key])
        obs[key] = (rng.integers(0, 256, shape) if dtype == np.uint8 else rng.standard_normal(shape)).astype(dtype)
    return obs


def _client_loop(port: int, n: int, warmup: int, latencies: list, start: threading.Barrier, seed: int):
    from dopr.deploy.client import PolicyClient

    with PolicyClient("127.0.0.1", port) as client:
        obs = random_observation(client.metadata, np.random.default_rng(seed))
        for _ in range(warmup):
            client.infer(obs)
        start.wait()
        for _ in range(n):
            t = time.perf_counter()
            client.infer(obs)
            latencies.append(time.perf_counter() - t)


def measure_clients(port: int, clients: int, n: int, warmup: int) -> dict:
    """Latencies (s) of every request and requests/s with ``clients`` concurrent connections."""
    per_client = [[] for _ in range(clients)]
    barrier = threading.Barrier(clients + 1)
    threads = [threading.Thread(target=_client_loop, args=(port, n, warmup, per_client[i], barrier, i))
               for i in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.concatenate([np.asarray(x) for x in per_client])
    if len(lat) != clients * n:
        raise RuntimeError(f"a client failed: {len(lat)} of {clients * n} requests answered")
    return {"p50_ms": 1e3 * np.percentile(lat, 50), "p99_ms": 1e3 * np.percentile(lat, 99),
            "rps": clients * n / wall}


def measure_in_process(path: Path, n: int, threads: int) -> float:
    """p50 (ms) of calling the same model in this process, no network."""
    import torch

    from dopr.deploy.load import load_model

    torch.set_num_threads(threads)
    model = load_model(path, num_threads=threads)
    obs = {k: v[None] for k, v in random_observation(model.meta, np.random.default_rng(0)).items()}
    for _ in range(10):
        model(obs)
    times = []
    for _ in range(n):
        t = time.perf_counter()
        model(obs)
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.percentile(times, 50))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from dopr.deploy.export import export_checkpoint

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = Path(args.policy) if args.policy else default_checkpoint(out)
    forms = [f.strip() for f in args.forms.split(",") if f.strip()]
    paths = {}
    for form in forms:
        if form == "checkpoint":
            paths[form] = ckpt
        elif form in ("torchscript", "onnx"):
            suffix = "pt" if form == "torchscript" else "onnx"
            paths[form] = export_checkpoint(ckpt, out / f"{ckpt.name}.{suffix}", form)
        else:
            raise SystemExit(f"unknown form {form!r}; choose from checkpoint, torchscript, onnx")

    print(f"policy {ckpt}; {args.requests} requests per client after {args.warmup} warm-up; "
          f"server threads {args.threads}; loopback 127.0.0.1")
    header = (f"{'form':<12} {'in-proc p50':>11} {'p50 ms':>8} {'p99 ms':>8} {'req/s 1c':>9} {'req/s 4c':>9} "
              f"{'p99 4c':>8}")
    print(header)
    results = {}
    for form, path in paths.items():
        in_proc = measure_in_process(path, args.requests, args.threads)
        with ServerProcess(path, threads=args.threads) as server:
            one = measure_clients(server.port, 1, args.requests, args.warmup)
            four = measure_clients(server.port, 4, args.requests, args.warmup)
        results[form] = (in_proc, one, four)
        print(f"{form:<12} {in_proc:>11.3f} {one['p50_ms']:>8.3f} {one['p99_ms']:>8.3f} {one['rps']:>9.0f} "
              f"{four['rps']:>9.0f} {four['p99_ms']:>8.3f}", flush=True)
    base = next(iter(results))
    for form, (in_proc, one, four) in results.items():
        print(f"{form}: p99 {one['p99_ms']:.2f} ms ({'meets' if one['p99_ms'] < GOAL_P99_MS else 'MISSES'} the "
              f"{GOAL_P99_MS:.0f} ms goal); network+protocol overhead p50 {one['p50_ms'] - in_proc:.3f} ms; "
              f"1-client req/s vs {base}: {one['rps'] / results[base][1]['rps']:.2f}x; 4 vs 1 clients: "
              f"{four['rps'] / one['rps']:.2f}x")
    return 0
