"""What to sparsify and how: input groups, their scores, and the core operator each one applies.

A *group* is one activation read by one or more ``nn.Linear`` layers: the input shared by
``q_proj``, ``k_proj`` and ``v_proj``, the one shared by ``gate_proj`` and ``up_proj``, the
input of ``o_proj``, of ``down_proj``. Every Linear reading it skips the same weight columns, so
the group has one rule. A rule keeps an entry ``x_i`` when its score is high enough:

* ``"magnitude"`` (TEAL, Liu et al. 2024): score ``|x_i|``, one threshold per group;
* ``"wina"`` (WINA, Chen et al. 2025): score ``|x_i| * ||W[:, i]||``, the column norms of the
  group's stacked weights, so inputs that meet large weights count for more;
* ``"cats"`` (CATS, Lee et al. 2024): inside a gated MLP the ``down_proj`` input
  ``act(gate(x)) * up(x)`` is sparsified through the gate: ``|act(gate(x))|`` is thresholded
  at the activation function's output (zeros there make ``down_proj``'s input zero); the other
  groups are thresholded by magnitude;
* ``"topk"``: the ``k`` largest ``|x_i|`` of each token, the exact-budget variant.

Any rule can act in a rotated basis (LaRoSA, Liu et al. 2025): with ``rotation`` ``Q`` (the
principal directions of the group's calibration inputs, :func:`principal_rotation`) the rule
sparsifies ``z = x Q`` and the Linears read ``W Q`` (exactly ``W x = (W Q)(Q^T x)``). A gated
MLP's input is concentrated on few directions, so far fewer coordinates carry its energy; the
price is one ``width x width`` product per token (docs/activation_sparsity.md weighs the two).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..core.operators import Jump, Projection, TopK

__all__ = ["METHODS", "Group", "column_norms", "find_groups", "gated_mlp", "mlp_inputs",
           "principal_rotation", "stacked_weight"]

METHODS = ("magnitude", "wina", "cats", "topk")


@dataclass
class Group:
    """One sparsified activation: the Linears that read it (``linears``), or, for CATS, the
    activation function whose output gates ``down_proj`` (``act`` set, ``linears`` =
    ``[down_proj]``). ``threshold`` (on the score) or ``k`` is the calibrated rule."""

    linears: list[str]
    width: int
    params: int  # weights of the Linears reading this activation (what skipping saves)
    act: str | None = None
    scale: Tensor | None = None  # per-feature score weight (WINA); None: 1
    rotation: Tensor | None = None  # (width, width) orthogonal: the rule acts on x @ rotation
    threshold: float | None = None
    k: int | None = None
    sparsity: float = 0.0  # the target this group was calibrated for
    extra: dict[str, Any] = field(default_factory=dict)

    def lift(self, x: Tensor) -> Tensor:
        """The coordinates the rule sparsifies: ``x @ rotation`` (``x`` without one)."""
        if self.rotation is None:
            return x
        return x @ self.rotation.to(device=x.device, dtype=x.dtype)

    def lower(self, z: Tensor) -> Tensor:
        """The input whose coordinates are ``z`` (the inverse of :meth:`lift`)."""
        if self.rotation is None:
            return z
        return z @ self.rotation.to(device=z.device, dtype=z.dtype).T

    @property
    def name(self) -> str:
        """Where the rule applies: the activation function (CATS) or the first Linear."""
        return self.act if self.act is not None else self.linears[0]

    def operator(self) -> Projection | None:
        """The core projection applying this group's rule (None: nothing to drop)."""
        if self.k is not None:
            return TopK(self.k) if self.k < self.width else None
        if self.threshold is None or self.threshold <= 0:
            return None
        if self.scale is None:
            return Jump(float(self.threshold), positive=False)
        tiny = torch.finfo(torch.float32).tiny
        return Jump(self.threshold / self.scale.clamp(min=tiny), positive=False)

    def coords(self, x: Tensor, op: Projection | None = None) -> Tensor:
        """The sparse vector the Linears read: the rule applied to :meth:`lift` ``(x)``;
        ``op``: :meth:`operator`, passed when the caller keeps it."""
        op = self.operator() if op is None else op
        z = self.lift(x)
        return z if op is None else op.project(z)

    def apply(self, x: Tensor, op: Projection | None = None) -> Tensor:
        """``x`` with this rule applied, as an input of the unchanged Linears."""
        return self.lower(self.coords(x, op))

    def watch(self, modules: dict[str, nn.Module], fn: Callable[[Tensor], None]):
        """Register a hook passing the activation this rule applies to (before the rule: hooks
        registered before :meth:`ActivationSparsity.attach` run first) to ``fn``; returns the
        handle. ``modules``: the model's ``dict(named_modules())``."""
        if self.act is not None:
            return modules[self.act].register_forward_hook(lambda m, a, out: fn(out))
        return modules[self.linears[0]].register_forward_pre_hook(lambda m, a: fn(a[0]))

    def score(self, x: Tensor) -> Tensor:
        """The score the rule thresholds, per coordinate of ``x (..., width)``."""
        s = self.lift(x.detach().float()).abs()
        return s if self.scale is None else s * self.scale.to(s.device)


def gated_mlp(module: nn.Module) -> bool:
    """Whether ``module`` is a gated MLP: ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``
    with ``act_fn`` a module (LLaMA, Mistral, Qwen, SmolLM2, Gemma in transformers)."""
    return all(isinstance(getattr(module, n, None), nn.Module)
               for n in ("gate_proj", "up_proj", "down_proj", "act_fn"))


def find_groups(model: nn.Module, names: list[str], inputs: dict[str, Tensor], method: str
                ) -> list[Group]:
    """Group the Linears ``names`` by the activation they read (``inputs``: each one's input,
    from one forward: the same tensor object means a shared input), in model order. For
    ``"cats"`` a gated MLP's ``down_proj`` group becomes its ``act_fn`` group."""
    mods = dict(model.named_modules())
    groups: list[Group] = []
    owner: dict[int, Group] = {}
    for name in names:
        lin = mods[name]
        key = id(inputs[name]) if name in inputs else id(lin)
        if key in owner:
            g = owner[key]
            g.linears.append(name)
            g.params += lin.weight.numel()
            continue
        g = Group([name], lin.in_features, lin.weight.numel())
        owner[key] = g
        groups.append(g)
    if method == "cats":
        n_cats = 0
        for g in groups:
            parent, _, leaf = g.linears[0].rpartition(".")
            if len(g.linears) == 1 and leaf == "down_proj" and gated_mlp(mods.get(parent)):
                g.act = f"{parent}.act_fn"
                n_cats += 1
        if not n_cats:
            raise ValueError(
                "method 'cats' thresholds the gate of a gated MLP (gate_proj, up_proj, "
                "down_proj and an act_fn module), but none of the selected layers is the "
                f"down_proj of one in {type(model).__name__}; use 'magnitude' or 'wina'"
            )
    return groups


def stacked_weight(model: nn.Module, group: Group) -> Tensor:
    """The weights of the group's Linears stacked ``(sum of out_features, width)``, times the
    rotation when there is one: the columns its coordinates read."""
    mods = dict(model.named_modules())
    W = torch.cat([mods[n].weight.detach() for n in group.linears])
    return W if group.rotation is None else W @ group.rotation.to(W)


def column_norms(model: nn.Module, group: Group) -> Tensor:
    """WINA's score weights: the norm of each column of :func:`stacked_weight`."""
    return torch.linalg.vector_norm(stacked_weight(model, group).float(), dim=0)


def mlp_inputs(model: nn.Module, groups: list[Group]) -> list[Group]:
    """The groups that are the input of a gated MLP (read by its ``gate_proj``)."""
    mods = dict(model.named_modules())
    out = []
    for g in groups:
        for name in g.linears:
            parent, _, leaf = name.rpartition(".")
            if leaf == "gate_proj" and g.act is None and gated_mlp(mods.get(parent)):
                out.append(g)
                break
    return out


def principal_rotation(gram: Tensor) -> Tensor:
    """The eigenvectors of a Gram ``sum x x^T`` as columns, largest eigenvalue first (PCA
    without centering, as LaRoSA): the orthogonal basis concentrating the inputs' energy."""
    _, vecs = torch.linalg.eigh(gram.double())
    return vecs.flip(1).float().contiguous()
