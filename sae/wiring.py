"""Where a dictionary reads and writes: its places (hook points) and per-place input scales.

One SAE module has three shapes (docs/sae.md, "Three shapes"):

===============  =======================================  ===================================
shape            reads                                     writes
===============  =======================================  ===================================
SAE              ``hook_name``                             the same place
transcoder       ``hook_name`` (e.g. an MLP's input)       ``hook_name_out`` (its output)
crosscoder       ``hook_names`` (L places, concatenated)   the same L places
===============  =======================================  ===================================

The places live in the SAE's metadata under SAELens' names (``hook_name``, ``hook_name_out``)
plus ``hook_names`` for a crosscoder. A place names a module's output, ``"model.layers.15.mlp"``,
or its input, ``"model.layers.15.mlp:input"`` (:mod:`sparsecode.hooks`).

Each place is scaled on its own so that its mean norm is ``sqrt(width)`` (layers of one model
differ in norm by orders of magnitude; a crosscoder would otherwise fit the loudest one): a
:class:`Scales` holds one factor per place read and per place written, and is folded into the
weights when the SAE is saved (:func:`sae.io.save_sae`).

>>> from sae.config import SAEConfig
>>> cfg = SAEConfig(d_in=8, d_sae=16, k=2, d_out=4, transcode=True,
...                 metadata={"hook_name": "mlp:input", "hook_name_out": "mlp"})
>>> reads(cfg), writes(cfg)
(['mlp:input'], ['mlp'])
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .config import SAEConfig

#: A place's scale factors: ``{"in": [one per place read], "out": [one per place written]}``.
Scales = dict[str, list[float]]


def reads(cfg: SAEConfig, default: str | None = None) -> list[str]:
    """The places an SAE reads, in the order of its input coordinates."""
    meta = cfg.metadata
    if cfg.places is not None:
        names = meta.get("hook_names")
        if not isinstance(names, list) or len(names) != len(cfg.places):
            raise ValueError(f"a crosscoder of {len(cfg.places)} places needs metadata "
                             f"'hook_names' listing them, got {names!r}")
        return list(names)
    name = meta.get("hook_name") or default
    if name is None:
        raise ValueError("the SAE names no hook point (metadata 'hook_name')")
    return [name]


def writes(cfg: SAEConfig, default: str | None = None) -> list[str]:
    """The places an SAE writes: another place for a transcoder, what it reads otherwise."""
    if cfg.transcode:
        out = cfg.metadata.get("hook_name_out")
        if not out:
            raise ValueError("a transcoder needs metadata 'hook_name_out' (the place it writes)")
        return [out]
    return reads(cfg, default)


def stack(batch: Mapping[str, Tensor], places: Sequence[str], factors: Sequence[float],
          device: Any = None) -> Tensor:
    """The scaled activations of ``places`` side by side: ``(N, sum of widths)`` float32."""
    parts = [batch[p].to(device, torch.float32) * f for p, f in zip(places, factors, strict=True)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def mean_norm_scale(x: Tensor) -> float:
    """``sqrt(width) / mean ||x||``: the factor that brings the mean row norm to
    ``sqrt(width)``."""
    return math.sqrt(x.shape[1]) / float(x.norm(dim=1).mean().clamp_min(1e-12))


def fit_scales(batch: Mapping[str, Tensor], read: Sequence[str], written: Sequence[str],
               normalize: bool) -> Scales:
    """One factor per place ``read`` and ``written``, from a first batch (all 1 without
    ``normalize``); a place both read and written gets one factor."""
    factor = {p: mean_norm_scale(batch[p].float()) if normalize else 1.0
              for p in dict.fromkeys([*read, *written])}
    return {"in": [factor[p] for p in read], "out": [factor[p] for p in written]}


def per_coordinate(factors: Sequence[float], widths: Sequence[int]) -> Tensor:
    """A factor per place repeated over the place's coordinates: ``(sum of widths,)``.

    >>> per_coordinate([2.0, 0.5], [1, 2]).tolist()
    [2.0, 0.5, 0.5]
    """
    return torch.cat([torch.full((w,), float(f), dtype=torch.float64)
                      for f, w in zip(factors, widths, strict=True)])


def widths_in(cfg: SAEConfig) -> list[int]:
    return list(cfg.places) if cfg.places is not None else [cfg.d_in]


def widths_out(cfg: SAEConfig) -> list[int]:
    return list(cfg.places) if cfg.places is not None else [cfg.d_out]


def expand_braces(pattern: str) -> list[str]:
    """Shell-style brace lists: ``"model.layers.{6,12}.mlp"`` -> the two paths.

    >>> expand_braces("model.layers.{6,12}")
    ['model.layers.6', 'model.layers.12']
    """
    start = pattern.find("{")
    if start < 0:
        return [pattern]
    end = pattern.find("}", start)
    if end < 0:
        raise ValueError(f"unclosed brace in {pattern!r}")
    head, tail = pattern[:start], pattern[end + 1:]
    return [head + choice + rest for choice in pattern[start + 1:end].split(",")
            for rest in expand_braces(tail)]


def places(cfg: Any, default: str, resolve: Any) -> tuple[list[str], list[str]]:
    """``(reads, writes)`` of the dictionaries a run trains, from a
    :class:`sae.config.PlacesConfig`; ``default`` is the SAE hook point and ``resolve`` turns a
    list of names or globs into places (:func:`sparsecode.hooks.resolve` for a model)."""
    from sparsecode.hooks import INPUT

    if cfg.transcode:
        (module,) = _one(resolve([cfg.transcode]), cfg.transcode)
        return [module + INPUT], [module]
    if cfg.hookpoint_in:
        (read,) = _one(resolve([cfg.hookpoint_in]), cfg.hookpoint_in)
        (write,) = _one(resolve([cfg.hookpoint_out]), cfg.hookpoint_out)
        return [read], [write]
    if cfg.crosscode:
        found = resolve(expand_braces(cfg.crosscode))
        if len(found) < 2:
            raise ValueError(f"--crosscode {cfg.crosscode!r} names {found}: a crosscoder reads "
                             "two or more places")
        return found, found
    return [default], [default]


def _one(found: list[str], name: str) -> list[str]:
    if len(found) != 1:
        raise ValueError(f"{name!r} names {len(found)} places ({found[:4]}); name one")
    return found


def shape_fields(reads_: list[str], writes_: list[str], widths: Mapping[str, int]
                 ) -> dict[str, Any]:
    """The :class:`SAEConfig` shape fields and place metadata of dictionaries reading
    ``reads_`` and writing ``writes_`` (``widths``: each place's width)."""
    if reads_ == writes_ and len(reads_) == 1:
        return {"d_in": widths[reads_[0]], "metadata": {"hook_name": reads_[0]}}
    if reads_ == writes_:
        return {"d_in": sum(widths[p] for p in reads_), "places": [widths[p] for p in reads_],
                "metadata": {"hook_names": list(reads_)}}
    (read,), (write,) = reads_, writes_
    return {"d_in": widths[read], "d_out": widths[write], "transcode": True,
            "metadata": {"hook_name": read, "hook_name_out": write}}
