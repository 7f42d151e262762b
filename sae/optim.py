"""The optimiser and learning-rate schedule of SAE training (the recipe of docs/sae.md).

Adam with a learning rate scaled by the SAE's width, a linear warm-up and a linear decay to zero
over the last part of the run.
"""

from __future__ import annotations

import math

import torch

from .models import SAE


def base_lr(sae: SAE, lr: float | None = None) -> float:
    """``lr`` when given, else ``1.5e-3 / sqrt(d_sae / 2^14)`` (wider SAEs take smaller steps)."""
    if lr is not None:
        return lr
    return 1.5e-3 / math.sqrt(sae.cfg.d_sae / 2**14)


def adam(sae: SAE, lr: float, betas: tuple[float, float]) -> torch.optim.Adam:
    """Adam over the SAE's parameters, the fused implementation where torch has one (CPU and
    CUDA): one kernel per step instead of a dozen passes over the weights (20 -> 4.5 ms per step
    for a 576 x 9216 SAE on 2 CPU cores), the same update rule."""
    params = list(sae.parameters())
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.Adam(params, lr=lr, betas=betas, fused=fused or None)


def default_warmup(n_steps: int) -> int:
    """Warm-up steps when none are given: 5% of the run, at most 1000."""
    return min(1000, max(1, n_steps // 20))


def schedule(step: int, n_steps: int, warmup: int, decay_fraction: float) -> float:
    """LR multiplier: linear warm-up over ``warmup`` steps, linear decay to 0 at the end.

    >>> [round(schedule(s, 10, 2, 0.5), 2) for s in (0, 1, 5, 9)]
    [0.5, 1.0, 1.0, 0.2]
    """
    m = min(1.0, (step + 1) / max(warmup, 1))
    decay_start = int(n_steps * (1 - decay_fraction))
    if decay_fraction > 0 and step >= decay_start:
        m *= max(0.0, (n_steps - step) / max(n_steps - decay_start, 1))
    return m
