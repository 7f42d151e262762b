"""Penalties and projections: the one place where sparsity is imposed.

Every sparse method in the toolkit is a proximal-gradient step ``z <- prox(z - step * grad, step)``
(see ``docs/architecture.md``). This module holds the ``prox`` of each penalty and the projection
onto each constraint set, batched over rows (the last dimension indexes atoms / latents).

Conventions
-----------
* ``prox(z, step)`` returns ``argmin_u 0.5 * ||u - z||^2 + step * penalty(u)`` row by row.
  ``step`` is a float or a tensor broadcastable against ``z`` (e.g. one step per row, ``(B, 1)``).
* ``value(z)`` returns the penalty of each row, shape ``z.shape[:-1]``.
* A :class:`Projection` is the indicator of a set: ``prox(z, step) == project(z)`` for every
  step and ``value`` is 0 on the set and ``inf`` outside it.
* ``positive=True`` adds the constraint ``u >= 0`` (nonnegative codes, ReLU-style SAEs).

Operators
---------
Separable penalties: :class:`L1`, :class:`L0`, :class:`Lq` (``0 < q < 1``), :class:`MCP`,
:class:`SCAD`, :class:`CEL0`. Group penalty: :class:`GroupL21` (all in
:mod:`sparsecode.core.penalties`). Projections: :class:`TopK`, :class:`BatchTopK`,
:class:`FeatureChoice`, :class:`NM`, :class:`Support` (a fixed mask) and the JumpReLU
activation :class:`Jump` (in :mod:`sparsecode.core.projections`, with ``encode``: the projection
as one encoder step without the dense pre-activations). Build one by name with
:func:`make_operator` (names in :data:`OPERATORS`).

The nonconvex proxes are exact for every step: where a textbook closed form needs a bound on the
step (MCP ``step < gamma``, SCAD ``step < gamma - 1``, CEL0 ``step * a_i^2 < 1``) the other
regime is derived and handled too (see each class).

Example
-------
>>> import torch
>>> from sparsecode.core.operators import L1, TopK
>>> z = torch.tensor([[3.0, -0.5, 1.0]])
>>> L1(alpha=1.0).prox(z, step=1.0)
tensor([[2., -0., 0.]])
>>> TopK(k=1).project(z)
tensor([[3., 0., 0.]])
"""

from __future__ import annotations

from .penalties import CEL0, L0, L1, MCP, SCAD, GroupL21, Lq, Operator, Step
from .projections import NM, BatchTopK, FeatureChoice, Jump, Projection, Support, TopK

__all__ = [
    "CEL0", "L0", "L1", "MCP", "NM", "OPERATORS", "SCAD", "BatchTopK", "FeatureChoice",
    "GroupL21", "Jump", "Lq", "Operator", "Projection", "Step", "Support", "TopK",
    "make_operator",
]


OPERATORS: dict[str, type[Operator]] = {
    "l1": L1,
    "l0": L0,
    "lq": Lq,
    "mcp": MCP,
    "scad": SCAD,
    "cel0": CEL0,
    "group_l21": GroupL21,
    "topk": TopK,
    "batch_topk": BatchTopK,
    "feature_choice": FeatureChoice,
    "nm": NM,
    "jump": Jump,
}


def make_operator(name: str, **params: object) -> Operator:
    """Build an operator by name, e.g. ``make_operator("mcp", alpha=0.1, gamma=3.0)``.

    Names: ``l1, l0, lq, mcp, scad, cel0, group_l21, topk, batch_topk, feature_choice, nm,
    jump``.
    """
    key = name.lower() if isinstance(name, str) else name
    if key not in OPERATORS:
        raise ValueError(
            f"unknown operator {name!r}; known operators: {', '.join(sorted(OPERATORS))}"
        )
    return OPERATORS[key](**params)
