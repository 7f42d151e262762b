"""Synthetic activations with planted sparse features, for tests and sanity checks.

``x = sum_i c_i f_i (+ noise)`` where a few of ``n_features`` unit directions ``f_i`` are active
per sample with positive magnitudes: an SAE that works recovers the ``f_i`` as decoder rows.
"""

from __future__ import annotations

import torch
from torch import Tensor


def planted_features(
    n_samples: int,
    d_in: int,
    n_features: int,
    l0: float,
    *,
    noise: float = 0.0,
    zipf_exponent: float = 0.0,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Samples ``(n_samples, d_in)`` and the true feature directions ``(n_features, d_in)``.

    Each feature fires independently with probability ``p_i`` (all equal to
    ``l0 / n_features`` when ``zipf_exponent == 0``, else proportional to
    ``rank^-zipf_exponent``, scaled to the same mean L0), with magnitude uniform in
    ``[0.5, 1.5]``.

    >>> X, F = planted_features(100, 16, 32, l0=3, seed=0)
    >>> X.shape, F.shape
    (torch.Size([100, 16]), torch.Size([32, 16]))
    """
    g = torch.Generator().manual_seed(seed)
    F = torch.randn(n_features, d_in, generator=g)
    F /= F.norm(dim=1, keepdim=True)
    w = torch.arange(1, n_features + 1, dtype=torch.float64).pow(-zipf_exponent)
    p = (l0 * w / w.sum()).clamp(max=1.0).float()
    active = torch.rand(n_samples, n_features, generator=g) < p
    mags = 0.5 + torch.rand(n_samples, n_features, generator=g)
    X = (active * mags) @ F
    if noise:
        X += noise * torch.randn(n_samples, d_in, generator=g)
    return X, F


def max_cosine(true: Tensor, learned: Tensor) -> Tensor:
    """For each true direction, the largest cosine with any learned direction (rows)."""
    a = true / true.norm(dim=1, keepdim=True)
    b = learned / learned.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (a @ b.T).max(dim=1).values
