"""Loss terms of the SAE architectures: reconstruction, sparsity penalties, auxiliary-loss
helpers.

Conventions (see docs/metrics.md): ``mse`` is the squared error summed over the ``d_in``
features and averaged over tokens (SAELens' training MSE); auxiliary reconstruction losses are
normalised by the residual's total variance (OpenAI's AuxK), so their coefficient does not depend
on the activation scale.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .models import SAE, Code


def mse(x: Tensor, x_hat: Tensor) -> Tensor:
    """``mean_tokens sum_features (x - x_hat)^2``."""
    return (x - x_hat).pow(2).sum(dim=-1).mean()


def normalized_mse(target: Tensor, estimate: Tensor, group: Any = None) -> Tensor:
    """``sum ||target - estimate||^2 / sum ||target - mean(target)||^2`` over the batch.

    The AuxK / aux_zipf loss: how much of the residual the auxiliary latents explain. With a
    process ``group`` (data parallel), ``target`` must carry no gradient; the denominator is
    the whole global batch's and the result is scaled so that the ranks' average equals the
    loss on the concatenated batch."""
    if group is None:
        denom = (target - target.mean(dim=0)).pow(2).sum().clamp_min(1e-12)
        return (target - estimate).pow(2).sum() / denom
    import torch.distributed as dist

    t = target.detach().double()
    stats = torch.cat([t.sum(dim=0), t.pow(2).sum().reshape(1),
                       t.new_tensor([t.shape[0]])])
    dist.all_reduce(stats, group=group)
    s1, s2, n = stats[:-2], stats[-2], stats[-1]
    denom = (s2 - s1.pow(2).sum() / n).clamp_min(1e-12).to(target.dtype)
    return (target - estimate).pow(2).sum() * dist.get_world_size(group) / denom


def l1_penalty(sae: SAE, code: Code, scale: float) -> dict[str, Tensor]:
    """ReLU SAE: ``l1_coefficient * sum_j z_j ||W_dec[j]|| / N`` (Anthropic's April 2024 update:
    the L1 weighted by decoder norms, which are then left free; a crosscoder's norm is the sum
    of its per-place norms, :meth:`sae.models.SAE.decoder_norms`)."""
    dn = code.at(sae.decoder_norms())
    return {"l1": sae.cfg.l1_coefficient * scale * (code.values * dn).sum() / code.n_rows}


def l0_penalty(sae: SAE, code: Code, scale: float) -> dict[str, Tensor]:
    """JumpReLU SAE (Rajamanoharan et al. 2024): the L0 per token through the activation's
    straight-through estimator (``step``), or ``sum tanh(c z ||W_dec||)`` (``tanh``); the
    ``quadratic`` mode penalises ``(L0 / target_l0 - 1)^2`` (SAELens' L0 targeting)."""
    cfg, N = sae.cfg, code.n_rows
    if cfg.jumprelu_mode == "tanh":
        dn = code.at(sae.decoder_norms())
        l0 = torch.tanh(cfg.tanh_scale * code.values * dn).sum() / N
    else:
        l0 = sae.activation.indicator(code.pre, code.cols).sum() / N
    if cfg.jumprelu_mode == "quadratic":
        return {"l0_loss": cfg.l0_coefficient * scale * (l0 / cfg.target_l0 - 1).pow(2)}
    return {"l0_loss": cfg.l0_coefficient * scale * l0}


#: Sparsity penalty name (the architecture table's ``penalty``) -> its loss terms.
PENALTIES: dict[str, Callable[[SAE, Code, float], dict[str, Tensor]]] = {
    "l1": l1_penalty,
    "l0": l0_penalty,
}


def zipf_targets(n: int, mean_l0: float, exponent: float = 1.0) -> Tensor:
    """Target firing rate of the latent of frequency rank ``r = 1..n``: ``c / r^exponent``
    with ``c`` chosen so that the rates sum to ``mean_l0`` (the expected active latents per
    token), each capped at 1.

    >>> zipf_targets(4, 2.0).sum().item()
    2.0
    """
    r = torch.arange(1, n + 1, dtype=torch.float64)
    w = r.pow(-exponent)
    return (mean_l0 * w / w.sum()).clamp(max=1.0).float()


def underuse(freq: Tensor, mean_l0: float, exponent: float = 1.0) -> Tensor:
    """Shortfall of each latent against its Zipf target, in ``[0, 1]``:
    ``u_j = max(0, 1 - freq_j / target(rank_j))`` where ``rank_j`` is latent ``j``'s rank by
    firing rate. Dead latents get 1, latents at or above their target get 0.

    >>> underuse(torch.tensor([0.5, 0.0, 0.25]), mean_l0=0.75).tolist()
    [0.0, 1.0, 0.0]
    """
    order = torch.argsort(freq, descending=True, stable=True)
    target = torch.empty_like(freq)
    target[order] = zipf_targets(freq.numel(), mean_l0, exponent).to(freq)
    return (1 - freq / target.clamp_min(1e-12)).clamp(0.0, 1.0)


def log_uniform_cuts(n_cuts: int, width: int, generator: torch.Generator | None) -> list[int]:
    """``n_cuts`` distinct prefix lengths in ``[1, width)``, log-uniform, sorted (random
    Matryoshka prefixes: short prefixes are sampled as often as long ones on a log scale)."""
    if width < 2 or n_cuts < 1:
        return []
    u = torch.rand(n_cuts, generator=generator, dtype=torch.float64)
    cuts = torch.exp(u * math.log(width - 1)).floor().long().clamp(1, width - 1)
    return sorted(set(cuts.tolist()))
