"""Global allocation from the loss: how much each activation's sparsity costs, estimated from
one backward pass, then spent where it is cheapest across the whole model.

Zeroing the entries ``x_i`` of an activation below a threshold changes the next-token loss by
about ``-sum_i g_i x_i`` (``g = dL/dx``); its expected square, ``sum_i (g_i x_i)^2`` summed over
tokens (the diagonal, per-token Fisher estimate that OBD-style pruning uses for weights), is
the cost. One forward and backward pass over the calibration text gives, for every group and
every sparsity level ``0.05, 0.10, ..., 0.95``, the summed ``(g_i x_i)^2`` of the entries that
level drops (entries binned by their score against the level's threshold): a cost curve per
group. :func:`global_levels` then raises, one 0.05 step at a time, the group whose next step
adds the least cost per weight column skipped, over all blocks at once, until the
parameter-weighted sparsity reaches the target (the last step cut to land on it). Unlike the
block-wise greedy search (:mod:`sparsecode.activations.calibrate`) blocks may differ in
sparsity, and no block forward is re-run per trial.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..lm import device_of
from .rules import Group

__all__ = ["LEVELS", "global_levels", "loss_curves"]

#: The sparsity levels of the cost curves.
LEVELS = [round(0.05 * i, 2) for i in range(1, 20)]


def loss_curves(model: nn.Module, groups: list[Group], batches: list[Tensor],
                threshold: Callable[[Group, float], float]) -> dict[str, Tensor]:
    """``{group name: cost (len(LEVELS) + 1,)}``, cost[0] = 0 and cost[l] the summed
    ``(g_i x_i)^2`` of the entries dropped at ``LEVELS[l - 1]`` (thresholds from
    ``threshold(group, level)``), over one backward pass of the next-token loss per batch."""
    mods = dict(model.named_modules())
    bounds = {g.name: torch.tensor([threshold(g, s) for s in LEVELS]) for g in groups}
    bins = {g.name: torch.zeros(len(LEVELS) + 1, dtype=torch.float64) for g in groups}

    def watch(g: Group):
        def keep(x: Tensor) -> None:
            if not x.requires_grad:
                return

            def add(grad: Tensor) -> None:  # returns None: the gradient flows on unchanged
                score = g.score(x).reshape(-1).cpu()
                # the coordinates and their gradient (an orthogonal lift maps both alike)
                z, dz = g.lift(x.detach().float()), g.lift(grad.detach().float())
                cost = (dz * z).pow(2).reshape(-1).cpu()
                where = torch.bucketize(score, bounds[g.name])  # dropped from level where + 1
                bins[g.name].index_add_(0, where, cost.double())
            x.register_hook(add)

        return g.watch(mods, keep)

    handles = [watch(g) for g in groups]
    handles.append(model.get_input_embeddings().register_forward_hook(
        lambda m, a, out: out.requires_grad_()))
    try:
        with torch.enable_grad():
            for ids in batches:
                ids = ids.to(device_of(model))
                logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
                torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                    reduction="sum").backward()
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat([torch.zeros(1, dtype=torch.float64), b[:-1].cumsum(0)])
            for n, b in bins.items()}


def global_levels(curves: dict[str, Tensor], groups: list[Group], target: float
                  ) -> dict[str, float]:
    """Per-group sparsity reaching the parameter-weighted ``target`` at the least summed cost
    (greedy on the marginal cost per weight column, see the module docstring)."""
    step = {g.name: 0 for g in groups}
    total = sum(g.params for g in groups)
    reached = 0.0
    while reached < target * total - 1e-9:
        best = None
        for g in groups:
            l = step[g.name]
            if l >= len(LEVELS):
                continue
            c = curves[g.name]
            gain = g.params * (LEVELS[l] - (LEVELS[l - 1] if l else 0.0))
            cost = float(c[l + 1] - c[l]) / gain
            if best is None or cost < best[0]:
                best = (cost, g, gain)
        if best is None:
            break
        _, g, gain = best
        step[g.name] += 1
        reached += gain
    levels = {g.name: LEVELS[step[g.name] - 1] if step[g.name] else 0.0 for g in groups}
    if reached > target * total and best is not None:  # cut the last raise
        g = best[1]
        levels[g.name] -= (reached - target * total) / g.params
    return levels
