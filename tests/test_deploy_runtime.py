"""Wire protocol and the controller-side runner: timing of the action queue, ensembling, resets."""

import subprocess
import sys

import numpy as np
import pytest

from dopr.deploy.protocol import ProtocolError, packb, unpackb
from dopr.deploy.runtime import PolicyRunner, TemporalEnsembler


# ---------------------------------------------------------------------------------------------- protocol
def test_protocol_round_trips_nested_arrays_and_scalars():
    msg = {
        "obs": {"pos": np.arange(6, dtype=np.float32).reshape(2, 3), "img": np.full((2, 4, 4, 3), 7, np.uint8)},
        "flags": np.array([True, False]),
        "scale": np.float32(0.25),
        "f64": np.float64(0.1),  # a subclass of float: msgpack sends it as a plain double
        "n": 3,
        "name": "lift",
        "empty": np.zeros((0, 5), np.int64),
        "strided": np.arange(12, dtype=np.float64).reshape(3, 4)[:, ::2],  # non-contiguous view
    }
    out = unpackb(packb(msg))
    for key in ("flags", "empty", "strided"):
        assert out[key].dtype == msg[key].dtype and out[key].shape == msg[key].shape
        np.testing.assert_array_equal(out[key], msg[key])
    for key in ("pos", "img"):
        assert out["obs"][key].dtype == msg["obs"][key].dtype
        np.testing.assert_array_equal(out["obs"][key], msg["obs"][key])
    assert out["scale"] == 0.25 and out["scale"].dtype == np.float32
    assert out["f64"] == 0.1
    assert out["n"] == 3 and out["name"] == "lift"
    out["obs"]["pos"][0, 0] = -1  # decoded arrays are writable copies, not views of the message
    assert out["obs"]["pos"][0, 0] == -1


@pytest.mark.parametrize(
    "payload, match",
    [
        (b"\xc1\x00garbage", "not a valid msgpack"),
        (b"", "not a valid msgpack"),
        ("a text frame", "binary message"),
        (packb({"a": {b"__ndarray__": True, b"data": b"abc", b"dtype": "<f4", b"shape": [2]}}), "needs 8 bytes, got 3"),
        (packb({"a": {b"__ndarray__": True, b"data": b"12345678", b"dtype": "|O", b"shape": [1]}}), "cannot be sent"),
        (packb({"a": {b"__ndarray__": True, b"dtype": "<f4"}}), "malformed array"),
    ],
)
def test_protocol_rejects_malformed_input(payload, match):
    with pytest.raises(ProtocolError, match=match):
        unpackb(payload)


def test_protocol_refuses_to_send_object_arrays():
    with pytest.raises(ProtocolError, match="cannot be sent"):
        packb({"x": np.array([{"a": 1}], dtype=object)})


# ---------------------------------------------------------------------------------------------- runner
class RecordingPredictor:
    """Chunk k (the k-th call, from 0) has rows 100 * k + i; records the history it was given."""

    def __init__(self, n_action_steps: int):
        self.ta = n_action_steps
        self.calls: list[np.ndarray] = []

    def __call__(self, obs):
        self.calls.append(obs["x"].copy())
        k = len(self.calls) - 1
        return (100.0 * k + np.arange(self.ta, dtype=np.float32))[:, None]


def test_runner_receding_horizon_timing_history_and_reset():
    predictor = RecordingPredictor(n_action_steps=3)
    runner = PolicyRunner(predictor, ["x"], n_obs_steps=2, obs_dtypes={"x": "float32"})
    actions = [float(runner.act({"x": np.array([t], np.float64), "ignored": 0})[0]) for t in range(7)]
    # one new chunk when the queue runs out: at ticks 0, 3, 6
    assert actions == [0, 1, 2, 100, 101, 102, 200]
    assert len(predictor.calls) == 3
    # the history is the last To observations; the first tick repeats the first observation
    np.testing.assert_array_equal(predictor.calls[0], [[0], [0]])
    np.testing.assert_array_equal(predictor.calls[1], [[2], [3]])
    np.testing.assert_array_equal(predictor.calls[2], [[5], [6]])
    assert predictor.calls[0].dtype == np.float32  # cast to the declared dtype
    # reset drops the queued actions (201, 202) and the history
    runner.reset()
    assert float(runner.act({"x": np.array([50.0])})[0]) == 300
    np.testing.assert_array_equal(predictor.calls[3], [[50], [50]])


def test_runner_temporal_ensembling_hand_checked():
    predictor = RecordingPredictor(n_action_steps=3)
    runner = PolicyRunner(predictor, ["x"], n_obs_steps=1, ensemble_decay=0.5)
    got = [float(runner.act({"x": np.array([t], np.float32)})[0]) for t in range(4)]
    assert len(predictor.calls) == 4  # a chunk every tick
    # tick t blends row t-s of every chunk s still covering t, weights exp(-0.5 j), j=0 the oldest:
    # t=1: (1*1 + 100*e^-0.5) / (1 + e^-0.5);  t=2: (2 + 101 e^-0.5 + 200 e^-1) / (1 + e^-0.5 + e^-1)
    np.testing.assert_allclose(got, [0.0, 38.3765262110164, 69.30448988484916, 169.30448988484918], rtol=1e-12)
    runner.reset()  # forgets the chunks: the next action is the new chunk's first row alone
    assert float(runner.act({"x": np.array([0], np.float32)})[0]) == 400


def test_ensembler_without_decay_is_the_plain_mean_and_large_decay_keeps_the_oldest():
    flat = TemporalEnsembler(0.0)
    oldest = TemporalEnsembler(50.0)
    chunks = [np.array([[1.0], [2.0]]), np.array([[5.0], [9.0]])]
    for c in chunks:
        a_flat, a_old = flat.update(c), oldest.update(c)
    assert a_flat[0] == pytest.approx((2.0 + 5.0) / 2)
    assert a_old[0] == pytest.approx(2.0)


def test_runner_names_missing_observation_keys():
    runner = PolicyRunner(RecordingPredictor(2), ["x", "y"], n_obs_steps=1)
    with pytest.raises(KeyError, match=r"\['y'\]"):
        runner.act({"x": np.zeros(1)})


def test_controller_side_modules_do_not_import_the_training_stack():
    code = (
        "import sys, dopr.deploy.runtime, dopr.deploy.client, dopr.deploy.server\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'mujoco', 'robosuite')\n"
        "         or m.startswith(('dopr.policies', 'dopr.envs', 'dopr.data', 'dopr.eval', 'dopr.optim'))]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
