"""Data flows one way (DESIGN.md): a stage imports only the stages before it, and nothing imports scripts/.

Read from the source (every import statement, also those inside functions), so a lazy import that runs
only on some path is caught too. The controller-side deploy modules' import cost is checked at run time
in test_deploy_runtime.py.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# top-level helpers every stage may use; they import no stage
SHARED = {"atomic", "folder_lock", "lazy", "options", "temporal_ensemble", "ray_cluster"}
# stage -> the stages it may import
ALLOWED = {
    "data": set(),
    "envs": {"data"},
    "policies": set(),
    "optim": {"policies"},
    "train": {"data", "policies", "optim"},
    "eval": {"data", "envs", "policies", "train"},
    "deploy": {"policies"},  # export and serving: no training code
}


def dopr_imports(path: Path) -> set[str]:
    """The dopr.<name> modules `path` imports (absolute imports; the project uses no relative ones across stages)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else [])
        found |= {n.split(".")[1] for n in names if n.startswith("dopr.") and n.count(".") >= 1}
    return found


def violations(stage: str) -> list[str]:
    allowed = ALLOWED[stage] | SHARED | {stage}
    return [f"{p.relative_to(ROOT)} imports dopr.{name}"
            for p in sorted((ROOT / stage).rglob("*.py")) for name in sorted(dopr_imports(p) - allowed)]


@pytest.mark.parametrize("stage", list(ALLOWED))
def test_stage_imports_only_earlier_stages(stage):
    assert violations(stage) == []


@pytest.mark.parametrize("helper", sorted(SHARED))
def test_shared_helpers_import_no_stage(helper):
    assert dopr_imports(ROOT / f"{helper}.py") <= SHARED


def test_nothing_outside_scripts_imports_scripts():
    # the package's own files: top-level helpers and every stage (not a virtualenv inside the checkout)
    files = sorted(ROOT.glob("*.py")) + [p for stage in ALLOWED for p in sorted((ROOT / stage).rglob("*.py"))]
    offenders = [str(p.relative_to(ROOT)) for p in files
                 if "scripts" in dopr_imports(p) and p.name != "__main__.py"]
    assert offenders == []


def test_the_check_sees_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from dopr.eval.evaluator import evaluate_checkpoint\n")
    assert dopr_imports(bad) == {"eval"}


@pytest.mark.parametrize("package", ["dopr.data", "dopr.train", "dopr.eval"])
def test_lazy_exports_name_the_modules_that_define_them(package):
    import importlib

    pkg = importlib.import_module(package)
    for name, module in pkg._EXPORTS.items():
        assert getattr(pkg, name) is getattr(importlib.import_module(module), name), (package, name)
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        getattr(pkg, "nonexistent")
