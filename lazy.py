"""Package namespaces that import their names on first use.

A spawned simulator worker imports dopr.envs.worker_pool, and every stage imports dopr.atomic;
importing a package runs its __init__ first, so an __init__ that imported torch or zarr eagerly would
make each of them pay for it. `require` imports an optional extra's module (wandb, pyarrow, ...) where it is
used, or says which extra to install.
"""

from __future__ import annotations

import importlib


def lazy_exports(package: str, exports: dict[str, str]):
    """A module-level __getattr__ for `package` that imports exports[name] when `name` is first used."""

    def __getattr__(name: str):
        if name in exports:
            return getattr(importlib.import_module(exports[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__


def require(module: str, extra: str, needed_for: str):
    """Import an optional extra's module, or exit with one line naming the install command of the extra."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError:
        raise SystemExit(f"{needed_for} needs {module.split('.')[0]}, an optional extra: "
                         f'pip install -e ".[{extra}]"') from None
