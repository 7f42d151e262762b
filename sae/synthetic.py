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


def _codes(n_samples: int, n_features: int, l0: float, g: torch.Generator) -> Tensor:
    active = torch.rand(n_samples, n_features, generator=g) < l0 / n_features
    return active * (0.5 + torch.rand(n_samples, n_features, generator=g))


def _unit_rows(n: int, d: int, g: torch.Generator) -> Tensor:
    F = torch.randn(n, d, generator=g)
    return F / F.norm(dim=1, keepdim=True)


def planted_transcoder(n_samples: int, d_in: int, d_out: int, n_features: int, l0: float, *,
                       seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A known sparse map from an input to an output place: ``x = c F_in``, ``y = c F_out``
    with the sparse positive codes ``c`` of :func:`planted_features`. Returns ``x``, ``y``
    and the unit directions ``F_in (n_features, d_in)``, ``F_out (n_features, d_out)``: a
    transcoder that works has the ``F_out`` as decoder rows.

    >>> x, y, F_in, F_out = planted_transcoder(10, 8, 6, 20, l0=2)
    >>> x.shape, y.shape, F_out.shape
    (torch.Size([10, 8]), torch.Size([10, 6]), torch.Size([20, 6]))
    """
    g = torch.Generator().manual_seed(seed)
    F_in, F_out = _unit_rows(n_features, d_in, g), _unit_rows(n_features, d_out, g)
    c = _codes(n_samples, n_features, l0, g)
    return c @ F_in, c @ F_out, F_in, F_out


def planted_crosscoder(n_samples: int, widths: list[int], n_features: int, l0: float, *,
                       seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Features that live in a subset of places: feature ``i`` writes a unit direction into
    each place of its random non-empty subset (zero elsewhere). Returns the activations
    ``(n_samples, sum(widths))`` (places side by side), the features ``(n_features,
    sum(widths))`` and the mask ``(n_features, n_places)`` of where each lives.

    >>> x, F, lives = planted_crosscoder(10, [4, 6], 12, l0=2)
    >>> x.shape, F.shape, bool(lives.any(dim=1).all())
    (torch.Size([10, 10]), torch.Size([12, 10]), True)
    """
    g = torch.Generator().manual_seed(seed)
    lives = torch.rand(n_features, len(widths), generator=g) < 0.5
    lives[torch.arange(n_features), torch.randint(len(widths), (n_features,), generator=g)] = True
    F = torch.cat([_unit_rows(n_features, w, g) * lives[:, i:i + 1]
                   for i, w in enumerate(widths)], dim=1)
    c = _codes(n_samples, n_features, l0, g)
    return c @ F, F, lives
