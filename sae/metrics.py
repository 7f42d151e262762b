"""SAE quality metrics; each formula is written out in docs/metrics.md.

All metrics are computed on activations as the SAE sees them (after any input scaling the
trainer applies); FVU, cosine, L0 and the latent fractions do not depend on that scale.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: A latent firing on more than this fraction of tokens counts as dense.
DENSE_THRESHOLD = 0.1


def mse(x: Tensor, x_hat: Tensor) -> float:
    """Mean over tokens of the squared error summed over features."""
    return float((x - x_hat).pow(2).sum(dim=-1).mean())


def fvu(x: Tensor, x_hat: Tensor) -> float:
    """Fraction of variance unexplained: ``sum ||x - x_hat||^2 / sum ||x - mean(x)||^2``
    (mean-centred, so a constant offset is not credited as explained variance).

    >>> x = torch.randn(100, 4)
    >>> fvu(x, x), round(fvu(x, x.mean(0).expand_as(x)), 6)
    (0.0, 1.0)
    """
    num = (x - x_hat).pow(2).sum()
    den = (x - x.mean(dim=0)).pow(2).sum()
    return float(num / den.clamp_min(1e-30))


def cosine(x: Tensor, x_hat: Tensor) -> float:
    """Mean over tokens of the cosine between ``x`` and ``x_hat``."""
    return float(torch.nn.functional.cosine_similarity(x, x_hat, dim=-1).mean())


def l0(z: Tensor) -> float:
    """Mean number of nonzero latents per token."""
    return float((z != 0).sum(dim=-1).float().mean())


def density(z: Tensor) -> Tensor:
    """Per-latent fraction of tokens on which it is nonzero."""
    return (z != 0).float().mean(dim=0)


def density_histogram(dens: Tensor, bins: int = 20, low: float = -8.0) -> dict[str, list[float]]:
    """Histogram of ``log10(density)`` over ``[low, 0]``; dead latents (density 0) are counted
    separately under ``dead``."""
    dead = int((dens == 0).sum())
    logd = dens[dens > 0].double().log10().clamp(min=low)
    counts = torch.histc(logd, bins=bins, min=low, max=0.0) if logd.numel() else torch.zeros(bins)
    edges = torch.linspace(low, 0.0, bins + 1)
    return {"edges": edges.tolist(), "counts": counts.tolist(), "dead": [dead]}


@torch.no_grad()
def evaluate(sae, x: Tensor, batch_size: int = 8192) -> dict[str, float]:
    """Activation metrics of ``sae`` (inference behaviour) on held-out activations ``x``.

    Returns ``mse``, ``fvu``, ``explained_variance`` (= 1 - fvu), ``cosine``, ``l0``,
    ``dead_fraction`` (latents that never fire on ``x``), ``dense_fraction`` (latents firing on
    more than 10% of tokens) and ``n_tokens``.
    """
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"expected a non-empty (N, d_in) tensor, got shape {tuple(x.shape)}")
    was_training = sae.training
    sae.eval()
    err = torch.zeros((), dtype=torch.float64)
    cos = torch.zeros((), dtype=torch.float64)
    nnz = torch.zeros((), dtype=torch.float64)
    counts = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    mean = x.double().mean(dim=0)
    var = (x.double() - mean).pow(2).sum()
    for start in range(0, x.shape[0], batch_size):
        xb = x[start : start + batch_size]
        z = sae.encode(xb)
        x_hat = sae.decode(z)
        err += (xb - x_hat).double().pow(2).sum()
        cos += torch.nn.functional.cosine_similarity(xb, x_hat, dim=-1).double().sum()
        active = z != 0
        nnz += active.sum()
        counts += active.sum(dim=0).double()
    if was_training:
        sae.train()
    n = x.shape[0]
    dens = counts / n
    f = float(err / var.clamp_min(1e-30))
    return {
        "mse": float(err / n),
        "fvu": f,
        "explained_variance": 1.0 - f,
        "cosine": float(cos / n),
        "l0": float(nnz / n),
        "dead_fraction": float((dens == 0).double().mean()),
        "dense_fraction": float((dens > DENSE_THRESHOLD).double().mean()),
        "n_tokens": n,
    }


def log_density(dens: Tensor) -> Tensor:
    """``log10`` feature density with dead latents at ``-inf`` replaced by -10 (SAELens'
    ``sparsity.safetensors`` convention stores log10 density)."""
    return torch.where(dens > 0, dens.clamp_min(1e-30).log10(), torch.full_like(dens, -10.0))


__all__ = [
    "DENSE_THRESHOLD",
    "cosine",
    "density",
    "density_histogram",
    "evaluate",
    "fvu",
    "l0",
    "log_density",
    "mse",
]
