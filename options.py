"""Command-line options generated from a configuration dataclass, so each option is declared once.

    @dataclass
    class TrainConfig:
        steps: int = option(10000, "optimizer steps (default %(default)s)")
        stats: str | None = option(None, "DoPr input statistics", choices=("batch", "ema"))

    add_options(parser, TrainConfig)          # --steps, --stats, each with its help text and type
    cfg = from_args(TrainConfig, args)        # the dataclass, from the parsed namespace

A field's flag is `--` + its name with dashes; its type comes from the annotation: `bool` is a switch
(`--bf16`, or `--no-progress` for a default of True), `bool | None` is `--x/--no-x`, `list[int]` and
`list[str]` are comma-separated, `X | None` takes an X. A field without `option()` metadata has no flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing

_MISSING = dataclasses.MISSING


class LazyChoices:
    """A list of allowed values that lives in a heavy module (e.g. the optimizer names next to the
    optimizers, which import torch): imported when first checked or shown, so `dopr --help` stays fast."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def _values(self) -> tuple:
        import importlib

        return tuple(getattr(importlib.import_module(self.module), self.name))

    def __contains__(self, value) -> bool:
        return value in self._values()

    def __iter__(self):
        return iter(self._values())

    def __repr__(self) -> str:
        return repr(self._values())


def option(default=_MISSING, help: str = "", *, flags: tuple[str, ...] = (), choices=None, nargs=None,
           const=None, default_factory=_MISSING):
    """A dataclass field that is also a command-line option. `flags` replaces the generated flag
    (first) and adds aliases; `nargs`/`const` are argparse's (e.g. `--resume` with an optional value)."""
    metadata = {"help": help, "flags": flags, "choices": choices, "nargs": nargs, "const": const}
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata={"option": metadata})
    return dataclasses.field(default=default, metadata={"option": metadata})


def reuse(cls, name: str, default=_MISSING):
    """Another dataclass's option (its help, flags and choices), here with its default or another one:
    a command that passes an option on declares it where it is used."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    meta = f.metadata["option"]
    kw = {k: meta[k] for k in ("flags", "choices", "nargs", "const")}
    if default is _MISSING and f.default_factory is not _MISSING:
        return option(help=meta["help"], default_factory=f.default_factory, **kw)
    return option(f.default if default is _MISSING else default, meta["help"], **kw)

def _field_type(hint) -> tuple[type, bool]:
    """(the base type, whether None is allowed) of an annotation like `int | None` or `list[int]`."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        return rest[0], len(rest) < len(args)
    return hint, False


def _comma_list(item_type):
    def parse(text: str) -> list:
        return [item_type(x.strip()) for x in text.split(",") if x.strip()]

    parse.__name__ = f"comma-separated {item_type.__name__}s"  # what argparse names in a type error
    return parse


def option_fields(cls, names=None) -> list[dataclasses.Field]:
    """The fields of `cls` that are options (all, or those named, in the given order)."""
    by_name = {f.name: f for f in dataclasses.fields(cls) if "option" in f.metadata}
    return list(by_name.values()) if names is None else [by_name[n] for n in names]


def add_options(parser: argparse.ArgumentParser, cls, names=None, *, defaults: dict | None = None,
                suppress_defaults: bool = False) -> None:
    """Add an argument for each option field of `cls` (or of those in `names`).

    defaults: other defaults than the dataclass's (the help's %(default)s shows them).
    suppress_defaults: an option not given is absent from the namespace, so a config file's value stands.
    """
    hints = typing.get_type_hints(cls)
    for f in option_fields(cls, names):
        meta = f.metadata["option"]
        default = (defaults or {}).get(f.name, f.default if f.default is not _MISSING else None)
        if f.default_factory is not _MISSING and f.name not in (defaults or {}):
            default = f.default_factory()
        flag = "--" + f.name.replace("_", "-")
        kw: dict = {"dest": f.name}
        base, optional = _field_type(hints[f.name])
        if base is bool and not optional:
            flags = meta["flags"] or ((f"--no-{flag[2:]}",) if default else (flag,))
            kw["action"] = "store_false" if default else "store_true"
        else:
            flags = meta["flags"] or (flag,)
            if base is bool:
                kw["action"] = argparse.BooleanOptionalAction
            elif typing.get_origin(base) is list:
                kw["type"] = _comma_list(typing.get_args(base)[0])
                if isinstance(default, list):  # shown as the user types it
                    default = ",".join(str(x) for x in default)
            else:
                kw["type"] = base
            for key in ("choices", "nargs", "const"):
                if meta[key] is not None:
                    kw[key] = meta[key]
            if isinstance(meta["choices"], LazyChoices):  # argparse lists choices in the usage line at once
                kw["metavar"] = f.name.upper()
        # the default written into the help here: with suppress_defaults argparse has none to show
        kw["help"] = meta["help"].replace("%(default)s", str(default))
        if f.default is _MISSING and f.default_factory is _MISSING:
            kw["required"] = True
        else:
            kw["default"] = argparse.SUPPRESS if suppress_defaults else default
        parser.add_argument(*flags, **kw)


def from_args(cls, args: argparse.Namespace, base=None, names=None):
    """`cls` from the parsed options; with `base`, only the options present in `args` replace base's values."""
    values = {f.name: getattr(args, f.name) for f in option_fields(cls, names) if hasattr(args, f.name)}
    return dataclasses.replace(base, **values) if base is not None else cls(**values)
