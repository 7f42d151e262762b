"""Command-line flags generated from configuration dataclasses.

Each field of a configuration dataclass is one flag: ``--field-name`` (or ``metadata["flag"]``),
its type, its default and its help (``metadata["help"]``) come from the field, so a setting has
one default in one place and every setting a library user has is reachable from the command
line (as in sparsify, whose config dataclasses are also its CLI). Field metadata:

* ``help``: the help text (``%`` must be written ``%%``);
* ``flag``: the flag's name when it is not the field's;
* ``cli=False``: not a flag (set by the program, e.g. an input width read from the data);
* ``choices``: allowed values;
* ``sweep=True``: a comma-separated list of values, one run each (kept as the text).

>>> import argparse
>>> from dataclasses import dataclass, field
>>> @dataclass
... class Cfg:
...     k: int = field(default=32, metadata=meta("active latents"))
...     lr: float | None = field(default=None, metadata=meta("learning rate"))
...     fast: bool = field(default=True, metadata=meta("take the fast path"))
>>> p = argparse.ArgumentParser()
>>> add_flags(p, Cfg)
>>> Cfg(**values(Cfg, p.parse_args(["--k", "8", "--no-fast"])))
Cfg(k=8, lr=None, fast=False)
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Iterable
from typing import Any

__all__ = ["add_flags", "meta", "values"]


def meta(help: str, **extra: Any) -> dict[str, Any]:
    """Field metadata for :func:`add_flags` (see the module docstring)."""
    return {"help": help, **extra}


def _base_type(hint: Any) -> Any:
    """``X`` of ``X | None`` / ``Optional[X]``; the hint itself otherwise."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from e


def _flag_kwargs(f: dataclasses.Field, hint: Any, default: Any) -> dict[str, Any]:
    base = _base_type(hint)
    kw: dict[str, Any] = {"default": default}
    help_text = f.metadata.get("help", "")
    if f.metadata.get("sweep"):
        kw["type"] = str
        kw["default"] = None if default is None else str(default)
    elif base is bool:
        kw["action"] = argparse.BooleanOptionalAction
    elif typing.get_origin(base) is list:
        kw["type"] = _int_list
    elif base in (int, float, str):
        kw["type"] = base
    if "choices" in f.metadata:
        kw["choices"] = list(f.metadata["choices"])
    shown = "" if default is None or base is bool else f" (default: {default})"
    kw["help"] = help_text + shown
    return kw


def add_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    only: Iterable[str] | None = None,
    skip: Iterable[str] = (),
    defaults: dict[str, Any] | None = None,
) -> None:
    """Add a flag for every field of dataclass ``cls`` (``only`` those / not those in ``skip``;
    ``defaults`` replaces a field's default for this parser, e.g. ``None`` for "recorded in the
    saved model")."""
    hints = typing.get_type_hints(cls)
    only = None if only is None else set(only)
    skip, defaults = set(skip), defaults or {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli") is False or f.name in skip or (only and f.name not in only):
            continue
        if f.name in defaults:
            default = defaults[f.name]
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        name = f.metadata.get("flag", f.name).replace("_", "-")
        if default is dataclasses.MISSING:  # a field without a default is a required flag
            kw = _flag_kwargs(f, hints[f.name], None)
            parser.add_argument(f"--{name}", dest=f.name, required=True,
                                **{k: v for k, v in kw.items() if k != "default"})
        else:
            parser.add_argument(f"--{name}", dest=f.name,
                                **_flag_kwargs(f, hints[f.name], default))


def values(cls: type, args: argparse.Namespace, **overrides: Any) -> dict[str, Any]:
    """The fields of ``cls`` found in ``args`` (as :func:`add_flags` named them), with
    ``overrides`` on top: ``cls(**values(cls, args))`` builds the configuration."""
    out = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    out.update(overrides)
    return out
