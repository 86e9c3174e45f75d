"""`dopr export`: exported TorchScript/ONNX files act like the checkpoint (same noise) within 1e-5."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from dopr.deploy.export import export_checkpoint, noise_like_generator
from dopr.deploy.runtime import ExportedModel, PolicyRunner
from dopr.policies import PolicyConfig, build_policy, load_policy, save_checkpoint

TOL = 1e-5
OBS_SHAPES = {"robot0_eef_pos": [3], "object": [6]}
SMALL = dict(action_dim=4, n_obs_steps=2, horizon=8, n_action_steps=4, mlp_hidden_dim=32, down_dims=[16, 32],
             timestep_embed_dim=16, n_groups=4)
KINDS = {
    "mlp": dict(kind="mlp"),
    "mlp-image": dict(kind="mlp", image_feature_dim=8, image_channels=[4, 8]),  # a uint8 camera input too
    "diffusion-ddpm": dict(kind="diffusion", sampler="ddpm", num_inference_steps=5),
    "diffusion-ddim": dict(kind="diffusion", sampler="ddim", num_inference_steps=4),
    "diffusion-ddim-sample": dict(kind="diffusion", sampler="ddim", num_inference_steps=3, prediction_type="sample"),
    "flow": dict(kind="flow", num_inference_steps=4),
}
# per-sample shape of the noise input: DDPM draws the initial sample plus one variance noise per step
# with t > 0 (5 steps: 4 of them); DDIM (eta = 0) and flow draw only the initial sample
NOISE_SHAPES = {"mlp": None, "mlp-image": None, "diffusion-ddpm": [5, 8, 4], "diffusion-ddim": [1, 8, 4],
                "diffusion-ddim-sample": [1, 8, 4], "flow": [1, 8, 4]}
SUFFIX = {"torchscript": ".pt", "onnx": ".onnx"}


def _stats(rng, dims):
    """Non-trivial statistics so that the normalization inside the file matters."""
    return {k: {"min": rng.uniform(-3, -1, d), "max": rng.uniform(1, 4, d), "mean": rng.normal(0, 1, d),
                "std": rng.uniform(0.5, 2, d)} for k, d in dims.items()}


def make_checkpoint(folder, name, rng):
    shapes = dict(OBS_SHAPES)
    if name == "mlp-image":
        shapes["agentview_image"] = [20, 20, 3]
    cfg = PolicyConfig(obs_shapes=shapes, **SMALL, **KINDS[name])
    torch.manual_seed(0)
    policy = build_policy(cfg, _stats(rng, {"robot0_eef_pos": 3, "object": 6, "action": cfg.action_dim}))
    # EMA weights differ from the raw ones, so loading the wrong file shows up as a mismatch
    ema = build_policy(cfg)
    ema.load_state_dict(policy.state_dict())
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return save_checkpoint(folder / name, policy, ema_policy=ema,
                           meta={"step": 7, "task": "lift", "control_freq": 20.0})


def random_obs(config, batch, rng):
    obs = {}
    for key, shape in config.obs_shapes.items():
        size = (batch, config.n_obs_steps, *shape)
        if key in config.image_keys:
            obs[key] = rng.integers(0, 256, size).astype(np.uint8)
        else:
            obs[key] = (2 * rng.standard_normal(size)).astype(np.float32)
    return obs


def reference_actions(policy, obs, seed):
    """The checkpoint's own actions, with the sampling noise drawn from a seeded generator."""
    with torch.no_grad():
        return policy.predict_action({k: torch.from_numpy(v) for k, v in obs.items()},
                                     generator=torch.Generator().manual_seed(seed)).numpy()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpts")
    rng = np.random.default_rng(0)
    return {name: make_checkpoint(folder, name, rng) for name in KINDS}


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
@pytest.mark.parametrize("name", list(KINDS))
def test_exported_file_matches_checkpoint(checkpoints, tmp_path, name, fmt):
    torch.set_num_threads(1)
    ckpt = checkpoints[name]
    path = export_checkpoint(ckpt, tmp_path / f"policy{SUFFIX[fmt]}", fmt)
    model = ExportedModel(path, num_threads=1)
    policy = load_policy(ckpt)  # EMA weights, as export uses by default
    cfg = policy.config
    meta = model.meta
    assert meta["obs_keys"] == list(cfg.obs_shapes) and meta["action_dim"] == cfg.action_dim
    assert (meta["n_obs_steps"], meta["horizon"], meta["n_action_steps"]) == (2, 8, 4)
    assert meta["task"] == "lift" and meta["control_freq"] == 20.0 and meta["format"] == fmt
    assert model.noise_shape == NOISE_SHAPES[name]
    rng = np.random.default_rng(1)
    errors = []
    for batch, seed in [(1, 3), (5, 4)]:  # the batch size is free in the exported graph
        obs = random_obs(cfg, batch, rng)
        expected = reference_actions(policy, obs, seed)
        noise = None
        if model.noise_shape is not None:
            noise = noise_like_generator(model.noise_shape, batch, torch.Generator().manual_seed(seed)).numpy()
        got = model(obs, noise)
        assert got.shape == (batch, cfg.n_action_steps, cfg.action_dim) and got.dtype == np.float32
        errors.append(np.abs(got - expected).max())
    print(f"parity {name} {fmt}: max abs error {max(errors):.2e}")  # shown with -s
    assert max(errors) < TOL, f"{name} {fmt}: max abs error {max(errors):.2e}"
    if model.noise_shape is not None:
        # the noise is an input that matters: other noise, other actions
        other = model(obs, np.zeros_like(noise))
        assert np.abs(other - expected).max() > 1e-3


def test_cli_export_with_fewer_steps_and_raw_weights(checkpoints, tmp_path):
    from dopr.scripts.cli import main

    out = tmp_path / "flow2.onnx"
    assert main(["export", str(checkpoints["flow"]), "--format", "onnx", "--out", str(out), "--steps", "2",
                 "--no-ema"]) == 0
    model = ExportedModel(out)
    assert model.meta["num_inference_steps"] == 2
    policy = load_policy(checkpoints["flow"], ema=False)
    policy.config.num_inference_steps = 2
    obs = random_obs(policy.config, 2, np.random.default_rng(2))
    noise = noise_like_generator(model.noise_shape, 2, torch.Generator().manual_seed(9)).numpy()
    np.testing.assert_allclose(model(obs, noise), reference_actions(policy, obs, 9), atol=TOL, rtol=0)


def test_runner_runs_an_onnx_file_without_torch(checkpoints, tmp_path):
    """The controller side needs onnxruntime and numpy only; actions match the checkpoint's."""
    path = export_checkpoint(checkpoints["mlp"], tmp_path / "mlp.onnx", "onnx")
    policy = load_policy(checkpoints["mlp"])
    rng = np.random.default_rng(5)
    steps = [{k: (2 * rng.standard_normal(s)).astype(np.float32) for k, s in OBS_SHAPES.items()} for _ in range(6)]
    # expected: receding horizon by hand, from the checkpoint itself (To = 2, Ta = 4: chunks at ticks 0 and 4)
    expected = []
    for t0 in (0, 4):
        hist = {k: np.stack([steps[max(t0 - 1, 0)][k], steps[t0][k]])[None] for k in OBS_SHAPES}
        expected.extend(reference_actions(policy, hist, 0)[0])
    expected = np.stack(expected[:6])
    code = (
        "import sys, json, numpy as np\n"
        "from dopr.deploy.runtime import PolicyRunner\n"
        "steps = [{k: np.array(v, np.float32) for k, v in s.items()} for s in json.loads(sys.stdin.read())]\n"
        f"runner = PolicyRunner.from_file({str(path)!r}, num_threads=1)\n"
        "acts = [runner.act(s).tolist() for s in steps]\n"
        "assert 'torch' not in sys.modules\n"
        "print(json.dumps(acts))\n"
    )
    payload = json.dumps([{k: v.tolist() for k, v in s.items()} for s in steps])
    res = subprocess.run([sys.executable, "-c", code], input=payload, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    np.testing.assert_allclose(np.array(json.loads(res.stdout)), expected, atol=TOL, rtol=0)


def test_export_refuses_a_folder_that_is_not_a_checkpoint(tmp_path):
    from dopr.policies import CheckpointError

    with pytest.raises(CheckpointError, match="config.json"):
        export_checkpoint(tmp_path, tmp_path / "x.pt", "torchscript")
    assert not (tmp_path / "x.pt").exists()


def test_exported_file_without_metadata_is_refused(tmp_path):
    path = tmp_path / "plain.pt"
    torch.jit.save(torch.jit.trace(torch.nn.Linear(2, 2), torch.zeros(1, 2)), str(path))
    with pytest.raises(ValueError, match="dopr_meta.json"):
        PolicyRunner.from_file(path)


@pytest.mark.parametrize("suffix, kind", [(".pt", "TorchScript"), (".onnx", "ONNX")])
def test_corrupt_exported_file_is_refused_naming_it(tmp_path, suffix, kind):
    path = tmp_path / f"broken{suffix}"
    path.write_bytes(b"\x00not a model")
    with pytest.raises(ValueError, match=rf"broken{suffix}: not a .*{kind}"):
        PolicyRunner.from_file(path)


def test_default_export_names_differ_across_runs_and_never_overwrite_silently(checkpoints, tmp_path, capsys):
    import shutil

    from dopr.scripts.cli import main

    finals = []
    for run in ("lift-mlp-adamw-s0", "lift-mlp-dopr-adamw-s0"):  # every run has a ckpt-final
        finals.append(tmp_path / "runs" / run / "ckpt-final")
        shutil.copytree(checkpoints["mlp"], finals[-1])
    for ckpt in finals:
        assert main(["export", str(ckpt)]) == 0
    written = [ckpt / "export" / f"{ckpt.parent.name}-ckpt-final.pt" for ckpt in finals]
    assert all(p.is_file() for p in written) and written[0].read_bytes() != b""
    assert main(["export", str(finals[0]), "--no-ema"]) == 0  # other weights, another name
    assert (finals[0] / "export" / "lift-mlp-adamw-s0-ckpt-final-raw.pt").is_file()
    capsys.readouterr()
    before = written[0].stat().st_mtime_ns
    assert main(["export", str(finals[0])]) == 2
    assert capsys.readouterr().err == (f"dopr export: error: {written[0]} exists; pass --overwrite to replace it, "
                                       "or --out another file\n")
    assert written[0].stat().st_mtime_ns == before
    assert main(["export", str(finals[0]), "--overwrite"]) == 0 and written[0].stat().st_mtime_ns != before
    ExportedModel(written[0])  # still a loadable file
