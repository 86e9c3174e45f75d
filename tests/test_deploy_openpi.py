"""`dopr serve --protocol openpi` driven by the real openpi-client package (0.1.2), over loopback."""

import threading
import traceback
import urllib.request
from collections import deque

import numpy as np
import pytest
import torch

from dopr.deploy.bench import ServerProcess, default_checkpoint
from dopr.deploy.client import PolicyClient, PolicyServerError
from dopr.deploy.load import load_model
from dopr.deploy.protocol import packb, unpackb
from dopr.deploy.runtime import PolicyRunner
from dopr.deploy.server import PolicyServer
from dopr.policies import load_policy
from dopr.tests.deploy_helpers import OBS_SHAPES, small_mlp_checkpoint

openpi_client = pytest.importorskip("openpi_client",
                                    reason='openpi-client is in the dev extra: pip install -e ".[dev]"')
from openpi_client import msgpack_numpy  # noqa: E402
from openpi_client.websocket_client_policy import WebsocketClientPolicy  # noqa: E402

RENAME = "observation/state=robot0_eef_pos"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return small_mlp_checkpoint(tmp_path_factory.mktemp("openpi") / "mlp")


@pytest.fixture(scope="module")
def served(checkpoint):
    with ServerProcess(checkpoint, threads=1, timeout=60, args=("--protocol", "openpi", "--rename", RENAME)) as server:
        yield server


def expected_chunk(ckpt, history: dict[str, list]) -> np.ndarray:
    """What the checkpoint answers for a (To, ...) history per key, in float32."""
    policy = load_policy(ckpt)
    obs = {k: torch.from_numpy(np.asarray(v, dtype=np.float32)[None]) for k, v in history.items()}
    with torch.no_grad():
        return policy.predict_action(obs).numpy()[0]


def step(rng):
    """One control step as an openpi client sends it: float64 (Python floats), the client's key names."""
    return {"observation/state": rng.standard_normal(3), "object": rng.standard_normal(5), "prompt": "lift the cube"}


def test_openpi_client_gets_actions_from_single_steps_with_history_per_connection(served, checkpoint):
    rng = np.random.default_rng(1)
    s0, s1, s2 = step(rng), step(rng), step(rng)
    policy = WebsocketClientPolicy(host="127.0.0.1", port=served.port)
    meta = policy.get_server_metadata()
    assert meta["obs_keys"] == ["observation/state", "object"] and meta["n_obs_steps"] == 2
    first = policy.infer(s0)
    # the first step of an episode fills the history, as the training windows were padded
    want = expected_chunk(checkpoint, {"robot0_eef_pos": [s0["observation/state"]] * 2, "object": [s0["object"]] * 2})
    assert first["actions"].shape == (3, 3) and first["actions"].dtype == np.float32
    np.testing.assert_allclose(first["actions"], want, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(first["action"], first["actions"])
    assert first["server_timing"]["infer_ms"] >= 0
    second = policy.infer(s1)["actions"]
    np.testing.assert_allclose(second, expected_chunk(checkpoint, {
        "robot0_eef_pos": [s0["observation/state"], s1["observation/state"]], "object": [s0["object"], s1["object"]]}),
        atol=1e-5, rtol=0)
    # episode control: reset forgets the history
    policy._ws.send(msgpack_numpy.packb({"endpoint": "reset"}))
    assert msgpack_numpy.unpackb(policy._ws.recv()) == {"status": "reset successful"}
    fresh = {"robot0_eef_pos": [s2["observation/state"]] * 2, "object": [s2["object"]] * 2}
    np.testing.assert_allclose(policy.infer({"endpoint": "infer", **s2})["actions"], expected_chunk(checkpoint, fresh),
                               atol=1e-5, rtol=0)
    # a new connection is a new episode
    policy.infer(s0)
    other = WebsocketClientPolicy(host="127.0.0.1", port=served.port)
    np.testing.assert_allclose(other.infer(s2)["actions"], expected_chunk(checkpoint, fresh), atol=1e-5, rtol=0)


def test_openpi_action_chunk_broker_hands_out_the_chunk_row_by_row(served):
    from openpi_client.action_chunk_broker import ActionChunkBroker

    rng = np.random.default_rng(5)
    s0 = step(rng)
    chunk = WebsocketClientPolicy(host="127.0.0.1", port=served.port).infer(s0)["actions"]
    broker = ActionChunkBroker(WebsocketClientPolicy(host="127.0.0.1", port=served.port), action_horizon=3)
    rows = [broker.infer(s0)["actions"] for _ in range(3)]  # one request, three actions
    np.testing.assert_allclose(rows, chunk, atol=1e-6, rtol=0)


@pytest.mark.parametrize("request_, match", [
    ({"object": np.zeros(5)}, "missing observation key 'observation/state'"),
    ({"observation/state": np.zeros(4), "object": np.zeros(5)},
     r"'observation/state' has shape \(4,\), expected one step \(3,\)"),
    ({"observation/state": np.array([1, 2, 2**30 + 1]), "object": np.zeros(5)},
     "'observation/state' has dtype int64 with values that float32 cannot hold exactly"),
    ({"observation/state": np.array([np.nan, 0, 0]), "object": np.zeros(5)}, "NaN or inf"),
    ({"observation/state": np.zeros(3), "object": np.zeros(5), "endpoint": "train"}, "unknown endpoint"),
])
def test_openpi_client_raises_the_servers_error_and_the_server_keeps_serving(served, request_, match):
    policy = WebsocketClientPolicy(host="127.0.0.1", port=served.port)
    with pytest.raises(RuntimeError, match=match) as err:
        policy.infer(request_)
    assert "Traceback" in str(err.value)  # openpi sends the traceback as a text frame
    ok = policy.infer({"observation/state": np.array([1, 2, 3]), "object": np.zeros(5, np.float32)})  # int64: exact
    assert ok["actions"].shape == (3, 3)


def test_numpy_scalars_travel_as_openpi_encodes_them_both_ways():
    message = {"a": np.float32(1.5), "b": np.int64(-3), "c": np.bool_(True), "arr": np.arange(3, dtype=np.uint8)}
    theirs = msgpack_numpy.unpackb(packb(message))  # was: could not convert string to float: b'\x00\x00\xc0?'
    assert theirs["a"] == np.float32(1.5) and theirs["a"].dtype == np.float32 and theirs["b"] == -3
    assert theirs["c"] and np.array_equal(theirs["arr"], [0, 1, 2])
    ours = unpackb(msgpack_numpy.packb(message))
    assert ours["a"] == np.float32(1.5) and ours["a"].dtype == np.float32 and ours["b"].dtype == np.int64
    # the raw-bytes form older dopr clients send is still read
    old = {b"__npgeneric__": True, b"data": np.float32(1.5).tobytes(), b"dtype": "<f4"}
    import msgpack
    assert unpackb(msgpack.packb({"x": old}))["x"] == np.float32(1.5)


def test_healthz(served):
    with urllib.request.urlopen(f"http://127.0.0.1:{served.port}/healthz", timeout=10) as reply:
        assert reply.status == 200 and reply.read().strip() == b"OK"


class _OpenpiStyleServer:
    """A server as openpi's WebsocketPolicyServer writes it: the metadata map, then
    ``policy(obs) -> {"actions": ...}``, and on an exception the traceback as a text frame.
    (openpi's server package is not installable here; openpi-client ships only the client.)"""

    def __init__(self, policy, metadata):
        from websockets.sync.server import serve

        self.policy, self.metadata = policy, metadata
        self.server = serve(self._handle, "127.0.0.1", 0, compression=None)
        self.port = self.server.socket.getsockname()[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _handle(self, ws):
        ws.send(msgpack_numpy.packb(self.metadata))
        for message in ws:
            try:
                ws.send(msgpack_numpy.packb(self.policy(msgpack_numpy.unpackb(message))))
            except Exception:
                ws.send(traceback.format_exc())


def test_dopr_client_talks_to_an_openpi_server():
    def policy(obs):
        return {"actions": np.tile(obs["state"], (4, 1)) * 2}

    server = _OpenpiStyleServer(policy, {"model": "pi0"})
    try:
        with PolicyClient("127.0.0.1", server.port) as client:
            assert client.protocol == "openpi" and client.metadata == {"model": "pi0"}
            np.testing.assert_array_equal(client.infer({"state": np.array([1.0, 2.0])}), [[2.0, 4.0]] * 4)
            with pytest.raises(PolicyServerError, match="KeyError: 'state'"):
                client.infer({"other": np.zeros(2)})
            client.reset()  # that server offers no reset endpoint: nothing to send
    finally:
        server.server.shutdown()


def test_dopr_runner_over_the_openpi_protocol_acts_as_over_the_native_one(checkpoint):
    """PolicyRunner sends its (To, ...) history to an openpi server too, and resets it with the reset endpoint."""
    model = load_model(checkpoint)
    rng = np.random.default_rng(7)
    steps = [{k: rng.standard_normal(s[0]) for k, s in OBS_SHAPES.items()} for _ in range(7)]
    actions = {}
    for protocol in ("native", "openpi"):
        with PolicyServer(model, model.meta, port=0, protocol=protocol) as server, \
                PolicyClient("127.0.0.1", server.port) as client:
            assert client.protocol == protocol
            runner = PolicyRunner.from_client(client)
            actions[protocol] = [runner.act(s) for s in steps[:4]]
            runner.reset()
            actions[protocol] += [runner.act(s) for s in steps[4:]]
    np.testing.assert_allclose(actions["openpi"], actions["native"], atol=1e-6, rtol=0)


def test_native_protocol_is_the_default_and_unchanged(checkpoint):
    model = load_model(checkpoint)
    with PolicyServer(model, model.meta, port=0) as server, PolicyClient("127.0.0.1", server.port) as client:
        assert client.protocol == "native" and client.metadata["type"] == "metadata"
        with pytest.raises(PolicyServerError, match="has dtype float64, expected float32"):
            client.infer({k: np.zeros((2, *s)) for k, s in OBS_SHAPES.items()})
    with pytest.raises(ValueError, match="renames are part of the openpi protocol"):
        PolicyServer(model, model.meta, port=0, renames={"a": "object"})


# ------------------------------------------------------------------------------------- a lift episode
def run_lift(env, act, seed: int, horizon: int):
    """Actions, rewards and success of one episode; ``act(obs, t)`` gives the action of tick t."""
    obs, _ = env.reset(seed=seed)
    actions, rewards, success = [], [], False
    for t in range(horizon):
        action = np.asarray(act(obs, t), dtype=np.float64)
        obs, reward, terminated, truncated, info = env.step(action)
        actions.append(action)
        rewards.append(reward)
        success = success or bool(info.get("success", False))
        if terminated or truncated:
            break
    return np.array(actions), np.array(rewards), success


def test_openpi_client_drives_a_full_lift_episode_like_the_native_protocol(tmp_path):
    """openpi-client's loop (one step per call, a fresh chunk per call, executed receding-horizon) against
    `dopr serve --protocol openpi`, and dopr's own runner over the native protocol: the same episode."""
    from dopr.envs import make, task_spec

    torch.set_num_threads(1)
    ckpt = default_checkpoint(tmp_path)  # Lift's observation keys, To=2, Ta=8 (weights: random, seeded)
    horizon = task_spec("lift").horizon
    env = make("lift", obs="lowdim", horizon=horizon)
    seed = 3

    model = load_model(ckpt)
    with PolicyServer(model, model.meta, port=0) as server, PolicyClient("127.0.0.1", server.port) as client:
        runner = PolicyRunner.from_client(client)
        runner.reset()
        native = run_lift(env, lambda obs, t: runner.act(obs), seed, horizon)

    with ServerProcess(ckpt, threads=1, timeout=60,
                       args=("--protocol", "openpi", "--rename", "observation/eef_pos=robot0_eef_pos")) as proc:
        policy = WebsocketClientPolicy(host="127.0.0.1", port=proc.port)
        keys = policy.get_server_metadata()["obs_keys"]
        assert keys[0] == "observation/eef_pos"
        plan: deque = deque()

        def act(obs, t):
            sent = {"observation/eef_pos": obs["robot0_eef_pos"], **{k: obs[k] for k in keys[1:]}}  # float64
            chunk = policy.infer(sent)["actions"]  # every tick: the server sees every step of the history
            if not plan:
                plan.extend(chunk)
            return plan.popleft()

        remote = run_lift(env, act, seed, horizon)
    env.close()
    assert len(native[0]) == horizon  # a full episode (random weights do not lift the cube)
    assert native[2] == remote[2]
    np.testing.assert_allclose(remote[0], native[0], atol=1e-6, rtol=0)
    np.testing.assert_allclose(remote[1], native[1], atol=1e-9, rtol=0)
