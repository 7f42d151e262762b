"""Attaching calibrated rules to a model: hooks that zero the dropped inputs, saving, loading.

:class:`ActivationSparsity` holds one :class:`~sparsecode.activations.rules.Group` per
sparsified activation. :meth:`ActivationSparsity.attach` registers a forward pre-hook on every
Linear of a group (its input is projected by the group's core operator; Linears sharing one
input tensor compute the projection once) or, for CATS, a forward hook on the gated MLP's
activation function. The hooks are removable (:meth:`ActivationSparsity.remove`) and
:meth:`ActivationSparsity.attached` removes them on exit, also when the body raises.
:meth:`ActivationSparsity.save` writes a small JSON of thresholds (WINA's column norms are not
stored: :func:`load` recomputes them from the model's weights); rotated rules also write their
rotations to a safetensors file beside it, named in the JSON with its SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..hooks import resolve
from .rules import METHODS, Group, column_norms

__all__ = ["ActivationSparsity", "load"]

FORMAT = "sparsecode.activations/1"
#: The keys :meth:`ActivationSparsity.to_dict` writes itself; any others are ``info``.
_KEYS = ("format", "method", "allocation", "target", "sparsity", "achieved_sparsity", "groups",
         "rotations")


@dataclass
class ActivationSparsity:
    """Calibrated activation-sparsity rules for one model (see the module docstring).

    ``achieved`` (group name -> fraction of zero entries on held-out text) and ``perplexity``
    are filled in by :func:`~sparsecode.activations.sparsify_activations` when it measures them.
    """

    method: str
    allocation: str
    target: float
    groups: list[Group]
    achieved: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    _handles: list = field(default_factory=list, repr=False)

    @property
    def sparsity(self) -> float:
        """Target sparsity averaged over the weights that read each activation: the fraction of
        weight columns a sparse-input Linear skips."""
        total = sum(g.params for g in self.groups)
        return sum(g.sparsity * g.params for g in self.groups) / total if total else 0.0

    @property
    def achieved_sparsity(self) -> float | None:
        """:attr:`sparsity` measured on held-out text (None until measured)."""
        if not self.achieved:
            return None
        total = sum(g.params for g in self.groups)
        return sum(self.achieved[g.name] * g.params for g in self.groups) / total

    def attach(self, model: nn.Module) -> ActivationSparsity:
        """Register the hooks on ``model`` (removing any this object had attached)."""
        self.remove()
        mods = dict(model.named_modules())
        for g in self.groups:
            op = g.operator()
            if op is None:
                continue
            if g.act is not None:
                self._handles.append(mods[g.act].register_forward_hook(_output_hook(op)))
                continue
            shared = _Shared(g, op)
            for name in g.linears:
                self._handles.append(mods[name].register_forward_pre_hook(shared))
        return self

    def remove(self) -> None:
        """Remove the hooks (the model is dense again)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @contextmanager
    def attached(self, model: nn.Module) -> Iterator[ActivationSparsity]:
        """The hooks on ``model`` inside a ``with`` block, removed on exit and on error."""
        self.attach(model)
        try:
            yield self
        finally:
            self.remove()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description (thresholds, not column norms or rotations)."""
        groups = [{"linears": g.linears, "act": g.act, "width": g.width, "params": g.params,
                   "sparsity": g.sparsity, "threshold": g.threshold, "k": g.k,
                   "rotated": g.rotation is not None,
                   "achieved": self.achieved.get(g.name)} for g in self.groups]
        return {"format": FORMAT, "method": self.method, "allocation": self.allocation,
                "target": self.target, "sparsity": self.sparsity,
                "achieved_sparsity": self.achieved_sparsity, **self.info, "groups": groups}

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as JSON to ``path``; :func:`load` re-attaches it."""
        from .._files import atomic_write

        path = Path(path)
        data = self.to_dict()
        rotations = {g.name: g.rotation.contiguous() for g in self.groups
                     if g.rotation is not None}
        if rotations:
            from safetensors.torch import save as save_tensors

            blob = save_tensors(rotations)
            side = path.with_suffix(".rotations.safetensors")
            atomic_write(side, blob)
            data["rotations"] = {"file": side.name, "sha256": hashlib.sha256(blob).hexdigest()}
        atomic_write(path, json.dumps(data, indent=1) + "\n")
        return path

    def __repr__(self) -> str:
        got = self.achieved_sparsity
        return (f"ActivationSparsity(method={self.method!r}, allocation={self.allocation!r}, "
                f"groups={len(self.groups)}, sparsity={self.sparsity:.3f}"
                + (f", achieved={got:.3f}" if got is not None else "") + ")")


class _Shared:
    """Pre-hook applying a group's rule to a Linear's input; Linears fed the same tensor reuse
    the result."""

    def __init__(self, group: Group, op):
        self.group, self.op = group, op
        self._last: tuple[Tensor, Tensor] | None = None

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        if self._last is None or self._last[0] is not x:
            self._last = (x, self.group.apply(x, self.op))
        return (self._last[1], *args[1:])


def _output_hook(op):
    def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        return op.project(output)

    return hook


def load(path: str | Path, model: nn.Module, attach: bool = True) -> ActivationSparsity:
    """Read rules saved by :meth:`ActivationSparsity.save` for ``model`` (the same
    architecture) and attach them unless ``attach=False``. Raises ``ValueError`` naming the file
    when it is not such a file or does not fit the model (missing modules, other widths).

    >>> import tempfile, torch, transformers
    >>> from sparsecode.activations import sparsify_activations
    >>> cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
    ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
    >>> model = transformers.LlamaForCausalLM(cfg).eval()
    >>> rules = sparsify_activations(model, torch.randint(0, 64, (4, 16)), sparsity=0.5,
    ...                              allocation="uniform")
    >>> path = rules.save(tempfile.mkdtemp() + "/rules.json"); rules.remove()
    >>> again = load(path, model)  # attached again
    >>> [g.threshold for g in again.groups] == [g.threshold for g in rules.groups]
    True
    >>> again.remove()
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read activation-sparsity rules from {path}: {err}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path} is not an activation-sparsity file (format {FORMAT!r})")
    method = data.get("method")
    if method not in METHODS:
        raise ValueError(f"{path}: unknown method {method!r}; known: {', '.join(METHODS)}")
    mods = dict(model.named_modules())
    groups = []
    for entry in data.get("groups", []):
        names = entry["linears"]
        resolve(model, names)  # HookPointError with close matches when one is missing
        width = mods[names[0]].in_features
        if width != entry["width"]:
            raise ValueError(f"{path}: {names[0]} reads {width} features in this model, "
                             f"{entry['width']} in the saved rules")
        thr, k = entry.get("threshold"), entry.get("k")
        if thr is not None and not (isinstance(thr, (int, float)) and math.isfinite(thr)
                                    and thr >= 0):
            raise ValueError(f"{path}: threshold of {names[0]} must be a finite number >= 0, "
                             f"got {thr!r}")
        if k is not None and not (isinstance(k, int) and 0 < k <= width):
            raise ValueError(f"{path}: k of {names[0]} must be an integer in [1, {width}], "
                             f"got {k!r}")
        g = Group(list(names), width, entry["params"], act=entry.get("act"), threshold=thr, k=k,
                  sparsity=float(entry["sparsity"]))
        groups.append(g)
    rotated = [g for g, e in zip(groups, data["groups"], strict=True) if e.get("rotated")]
    if rotated:
        tensors = _read_rotations(path, data.get("rotations"))
        for g in rotated:
            Q = tensors.get(g.name)
            if Q is None or tuple(Q.shape) != (g.width, g.width):
                raise ValueError(f"{path}: no {g.width} x {g.width} rotation for {g.name} in "
                                 "its rotations file")
            g.rotation = Q
    if method == "wina":  # column norms from the weights, as at calibration
        for g in groups:
            g.scale = column_norms(model, g)
    achieved = {g.name: v for g, e in zip(groups, data["groups"], strict=True)
                if (v := e.get("achieved")) is not None}
    info = {k: v for k, v in data.items() if k not in _KEYS}
    out = ActivationSparsity(method, data.get("allocation", "uniform"), float(data["target"]),
                             groups, achieved, info)
    return out.attach(model) if attach else out


def _read_rotations(path: Path, entry: Any) -> dict[str, Tensor]:
    """The rotations saved beside ``path``, checked against the SHA-256 the JSON names."""
    from safetensors.torch import load as load_tensors

    if not (isinstance(entry, dict) and isinstance(entry.get("file"), str)):
        raise ValueError(f"{path}: rotated rules but no 'rotations' file named")
    side = path.parent / Path(entry["file"]).name
    try:
        blob = side.read_bytes()
    except OSError as err:
        raise ValueError(f"{path}: cannot read its rotations {side}: {err}") from None
    if hashlib.sha256(blob).hexdigest() != entry.get("sha256"):
        raise ValueError(f"{side} does not match its checksum in {path}")
    return load_tensors(blob)
