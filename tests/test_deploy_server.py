"""The websocket policy server over loopback: a real `dopr serve` process and client, malformed
requests, and a closed-loop evaluation driven through the server (127.0.0.1 only)."""

import re
import socket

import numpy as np
import pytest
import torch

from dopr.deploy.bench import ServerProcess
from dopr.deploy.client import PolicyClient, PolicyServerError
from dopr.deploy.export import export_checkpoint
from dopr.deploy.load import load_model
from dopr.deploy.protocol import packb
from dopr.deploy.runtime import PolicyRunner
from dopr.deploy.server import PolicyServer
from dopr.policies import PolicyConfig, build_policy, load_policy, save_checkpoint
from dopr.tests.deploy_helpers import OBS_SHAPES, small_mlp_checkpoint


@pytest.fixture(scope="module")
def mlp_checkpoint(tmp_path_factory):
    return small_mlp_checkpoint(tmp_path_factory.mktemp("srv") / "mlp")


@pytest.fixture(scope="module")
def served(mlp_checkpoint, tmp_path_factory):
    """`python -m dopr serve policy.onnx --port 0` in its own process, on 127.0.0.1."""
    path = export_checkpoint(mlp_checkpoint, tmp_path_factory.mktemp("onnx") / "policy.onnx", "onnx")
    with ServerProcess(path, threads=1, timeout=60) as server:
        yield server


def valid_obs(rng, batch=None):
    lead = () if batch is None else (batch,)
    return {k: rng.standard_normal((*lead, 2, *s)).astype(np.float32) for k, s in OBS_SHAPES.items()}


def expected_actions(ckpt, obs):
    policy = load_policy(ckpt)
    with torch.no_grad():
        return policy.predict_action({k: torch.from_numpy(v) for k, v in obs.items()}).numpy()


def test_client_gets_metadata_and_the_checkpoints_actions(served, mlp_checkpoint):
    rng = np.random.default_rng(1)
    with PolicyClient("127.0.0.1", served.port) as client:
        meta = client.metadata
        assert meta["obs_keys"] == list(OBS_SHAPES)
        assert meta["obs_shapes"] == OBS_SHAPES
        assert meta["obs_dtypes"] == {k: "float32" for k in OBS_SHAPES}
        assert (meta["action_dim"], meta["n_obs_steps"], meta["n_action_steps"]) == (3, 2, 3)
        assert meta["control_freq"] == 20.0 and meta["task"] == "lift" and meta["protocol"] == 1
        single = valid_obs(rng)
        chunk = client.infer(single)
        assert chunk.shape == (3, 3) and chunk.dtype == np.float32
        np.testing.assert_allclose(chunk, expected_actions(mlp_checkpoint, {k: v[None] for k, v in single.items()})[0],
                                   atol=1e-5, rtol=0)
        batch = valid_obs(rng, batch=4)
        np.testing.assert_allclose(client.infer(batch), expected_actions(mlp_checkpoint, batch), atol=1e-5, rtol=0)
        assert client.last_server_ms is not None and client.last_server_ms >= 0


def _bad_requests():
    rng = np.random.default_rng(2)
    good = valid_obs(rng)
    missing = {"robot0_eef_pos": good["robot0_eef_pos"]}
    wrong_shape = {**good, "object": np.zeros((2, 4), np.float32)}
    wrong_steps = {**good, "object": np.zeros((3, 5), np.float32)}
    wrong_dtype = {**good, "object": good["object"].astype(np.float64)}
    mixed_batch = {**good, "object": good["object"][None]}
    not_finite = {**good, "object": np.full((2, 5), np.nan, np.float32)}
    not_array = {**good, "object": [[0.0] * 5] * 2}
    batch_sizes = {k: np.repeat(v[None], n, axis=0) for (k, v), n in zip(good.items(), (2, 3))}
    empty = {k: np.zeros((0, *v.shape), np.float32) for k, v in good.items()}
    return {
        "missing key": (packb(missing), "missing observation key 'object'"),
        "wrong shape": (packb(wrong_shape), r"'object' has shape \(2, 4\), expected \(2, 5\)"),
        "wrong history": (packb(wrong_steps), r"'object' has shape \(3, 5\)"),
        "wrong dtype": (packb(wrong_dtype), "'object' has dtype float64, expected float32"),
        "mixed batching": (packb(mixed_batch), "batched"),
        "nan": (packb(not_finite), "NaN or inf"),
        "not an array": (packb(not_array), "must be a numpy array"),
        "batch sizes differ": (packb(batch_sizes), "'object' has batch size 3, 'robot0_eef_pos' has 2"),
        "empty batch": (packb(empty), "empty batch"),
        "not a map": (packb([1, 2, 3]), "must be a map"),
        "garbage bytes": (b"\xc1\xff\x00 this is not msgpack", "not a valid msgpack message"),
        "truncated array": (packb(good)[:-7], "not a valid msgpack message|needs"),
        "text frame": ("{\"robot0_eef_pos\": 1}", "binary message"),
    }


@pytest.mark.parametrize("case", list(_bad_requests()))
def test_bad_request_gets_an_error_and_the_server_keeps_serving(served, case):
    payload, match = _bad_requests()[case]
    rng = np.random.default_rng(3)
    with PolicyClient("127.0.0.1", served.port) as client, PolicyClient("127.0.0.1", served.port) as other:
        reply = client.send_raw(payload)
        assert reply["type"] == "error"
        assert re.search(match, reply["error"]), reply["error"]
        # the same connection and another client are still served
        assert client.infer(valid_obs(rng)).shape == (3, 3)
        assert other.infer(valid_obs(rng)).shape == (3, 3)


def test_infer_raises_the_servers_error(served):
    with PolicyClient("127.0.0.1", served.port) as client:
        with pytest.raises(PolicyServerError, match="missing observation key"):
            client.infer({})


def test_server_survives_a_client_that_drops_its_socket(served):
    raw = socket.create_connection(("127.0.0.1", served.port), timeout=10)
    raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    raw.recv(4096)
    raw.sendall(b"\x82\xfe\xff\xff")  # a frame header announcing 65535 masked bytes that never come
    raw.close()
    assert served.proc.poll() is None
    with PolicyClient("127.0.0.1", served.port) as client:
        assert client.infer(valid_obs(np.random.default_rng(4))).shape == (3, 3)


# ------------------------------------------------------------------------------------- closed loop
TASK = "reacher"  # gymnasium MuJoCo: about 3000 steps/s, episodes of 100 steps


def train_small_policy(folder, n_demos=40, steps=1000):
    """A few expert demos and a short AdamW run: a real checkpoint that succeeds on some seeds only."""
    from dopr.data import SequenceDataset
    from dopr.envs import task_spec
    from dopr.envs.collect import CollectConfig, collect

    spec = task_spec(TASK)
    store = folder / "demos.zarr"
    collect(CollectConfig(task=TASK, n_episodes=n_demos, out=str(store), workers=0, progress=False))
    ds = SequenceDataset(store, ["observation"], n_obs_steps=2, horizon=4, split="all")
    cfg = PolicyConfig(kind="mlp", obs_shapes={"observation": list(ds[0]["obs"]["observation"].shape[1:])},
                       action_dim=spec.action_dim, n_obs_steps=2, horizon=4, n_action_steps=2, mlp_hidden_dim=128)
    torch.manual_seed(0)
    policy = build_policy(cfg, ds.normalizer_stats())
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    for _ in range(steps):
        loss = policy.compute_loss(ds[rng.integers(0, len(ds), 64)])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return save_checkpoint(folder / "ckpt", policy.eval(),
                           meta={"step": steps, "task": TASK, "control_freq": spec.control_freq,
                                 "obs_shapes": cfg.obs_shapes})


def run_episode(env, runner, seed, horizon):
    """A controller's loop: one action per tick from the runner, until success or the horizon."""
    obs, _ = env.reset(seed=seed)
    runner.reset()
    steps, ret, success = 0, 0.0, False
    while steps < horizon:
        obs, reward, terminated, truncated, info = env.step(runner.act(obs))
        steps += 1
        ret += float(reward)
        if info.get("success", False):
            success = True
            break
        if terminated or truncated:
            break
    return success, steps, ret


def test_closed_loop_through_the_server_matches_direct_evaluation(tmp_path):
    from dopr.envs import make, task_spec
    from dopr.eval.config import EvalConfig
    from dopr.eval.evaluator import evaluate_checkpoint

    torch.set_num_threads(1)
    ckpt = train_small_policy(tmp_path)
    seed_base, episodes = 100_000, 8
    cfg = EvalConfig(episodes=episodes, workers=1, seed_base=seed_base, progress=False)
    direct = evaluate_checkpoint(str(ckpt), cfg, out_dir=str(tmp_path / "eval"))
    direct_eps = sorted(direct.episodes, key=lambda r: r["episode"])
    assert any(r["success"] for r in direct_eps), "the trained policy never succeeds: the comparison would be empty"

    horizon = task_spec(TASK).horizon
    model = load_model(ckpt)
    env = make(TASK, horizon=horizon)
    with PolicyServer(model, model.meta, host="127.0.0.1", port=0) as server, \
            PolicyClient("127.0.0.1", server.port) as client:
        runner = PolicyRunner.from_client(client)
        remote = [run_episode(env, runner, seed_base + i, horizon) for i in range(episodes)]
    env.close()
    print("direct:", [(r["success"], r["steps"], r["return"]) for r in direct_eps])
    print("remote:", remote)
    assert [s for s, _, _ in remote] == [r["success"] for r in direct_eps]
    assert [n for _, n, _ in remote] == [r["steps"] for r in direct_eps]
    np.testing.assert_allclose([r for _, _, r in remote], [r["return"] for r in direct_eps], rtol=1e-4)


def test_served_diffusion_checkpoint_draws_noise_from_the_seeded_generator(tmp_path):
    """`dopr serve CKPT --seed S` on a generative policy answers what predict_action(generator(S)) gives."""
    torch.manual_seed(0)
    cfg = PolicyConfig(kind="diffusion", obs_shapes=OBS_SHAPES, action_dim=3, n_obs_steps=2, horizon=8,
                       n_action_steps=3,
                       down_dims=[16, 32], timestep_embed_dim=16, n_groups=4, num_inference_steps=4, sampler="ddpm")
    ckpt = save_checkpoint(tmp_path / "diff", build_policy(cfg), meta={"task": "lift", "control_freq": 20.0})
    obs = valid_obs(np.random.default_rng(6), batch=2)
    policy = load_policy(ckpt)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        first, second = (policy.predict_action({k: torch.from_numpy(v) for k, v in obs.items()},
                                               generator=generator).numpy() for _ in range(2))
    model = load_model(ckpt, seed=7)
    with PolicyServer(model, model.meta, port=0) as server, PolicyClient("127.0.0.1", server.port) as client:
        assert client.metadata["policy"] == "diffusion" and client.metadata["num_inference_steps"] == 4
        np.testing.assert_allclose(client.infer(obs), first, atol=1e-6, rtol=0)
        np.testing.assert_allclose(client.infer(obs), second, atol=1e-6, rtol=0)  # the noise moves on
    assert np.abs(first - second).max() > 1e-3
