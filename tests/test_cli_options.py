"""The command lines generated from the configuration dataclasses (options.py) accept what users type:
every documented command line, every option alias, and each experiment config file."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from dopr.options import from_args
from dopr.scripts.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


COMMAND = re.compile(r"(?:^|&&\s*|;\s*|\bdo\s+)(dopr (?:collect|train|eval|experiment)\b[^#;&]*)")


def documented_command_lines() -> list[str]:
    """The `dopr collect|train|eval|experiment ...` command lines of README.md and docs/ (a line that starts
    with one, or runs one after `do`, `;` or `&&`), comments dropped and the recipes' shell variables filled."""
    lines = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        common = ""
        for line in doc.read_text().splitlines():
            line = line.strip()
            if line.startswith('common="'):
                common = line.split('"')[1]
            for match in COMMAND.finditer(line.replace("$common", common).replace("$g", "0.1")):
                command = match.group(1).strip()
                if "<" not in command and "--help" not in command:  # placeholders and help are not runs
                    lines.append(command)
    return lines


def test_every_documented_command_line_parses():
    commands = documented_command_lines()
    assert len(commands) >= 8, commands  # the README's pipeline and the results' recipes
    parser = build_parser()
    for command in commands:
        args = parser.parse_args(shlex.split(command)[1:])
        assert args.func is not None, command


def test_train_aliases_and_typed_values():
    from dopr.train.config import TrainConfig

    args = build_parser().parse_args(
        ["train", "--data", "d.zarr", "--label", "dopr-adamw:damping=0.3", "--To", "3", "--Tp", "12", "--Ta", "4",
         "--inference-steps", "5", "--no-progress", "--no-cache-images", "--resume", "--obs-keys", "a,b",
         "--down-dims", "8,16", "--optim", "muon", "--bf16", "--lr", "1e-3"])
    cfg = from_args(TrainConfig, args)
    assert (cfg.configuration, cfg.n_obs_steps, cfg.horizon, cfg.n_action_steps) == ("dopr-adamw:damping=0.3", 3, 12, 4)
    assert (cfg.num_inference_steps, cfg.progress, cfg.cache_images, cfg.resume) == (5, False, False, "latest")
    assert (cfg.obs_keys, cfg.down_dims, cfg.optim, cfg.bf16, cfg.lr) == (["a", "b"], [8, 16], "muon", True, 1e-3)
    defaults = from_args(TrainConfig, build_parser().parse_args(["train", "--data", "d.zarr"]))
    assert defaults == TrainConfig(data="d.zarr")  # the command line's defaults are the dataclass's


def test_unknown_choices_are_refused(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--data", "d", "--policy", "transformer"])
    assert "invalid choice: 'transformer'" in capsys.readouterr().err


@pytest.mark.parametrize("config", sorted((ROOT / "docs").rglob("*.toml")), ids=lambda p: p.name)
def test_experiment_config_files_load_and_flags_override_them(config):
    from dopr.eval.experiment import ExperimentConfig
    from dopr.scripts.experiment import config_from_args

    from_file = ExperimentConfig.from_file(str(config))
    args = build_parser().parse_args(["experiment", "--config", str(config), "--seeds", "7", "--steps", "11"])
    cfg = config_from_args(args)
    assert cfg.seeds == 7 and set(cfg.steps.values()) == {11} and set(cfg.steps) == set(from_file.steps)
    assert (cfg.tasks, cfg.optims, cfg.out) == (from_file.tasks, from_file.optims, from_file.out)
