"""Ground-truth recovery: how well a dictionary trained on synthetic data finds the features
that generated it (SynthSAEBench, ``sae_lens.synthetic``; docs/metrics.md, "Ground-truth
recovery").

Given samples ``x = c F`` (plus any offset or noise) with the true feature activations ``c
(N, n_features)`` and directions ``F (n_features, d)``:

* ``mcc``: the mean ``|cos|`` of the optimal one-to-one matching of decoder rows to true
  directions (Hungarian algorithm; O'Neill et al. 2025's mean correlation coefficient);
* ``uniqueness``: distinct true features among each latent's best match, over ``d_sae``;
* ``precision``, ``recall``, ``f1``, ``accuracy``: each latent as a detector of its best-matching
  true feature (fires vs that feature active), averaged over latents (0 where undefined);
* ``shrinkage``: mean ``||x_hat|| / ||x||`` (rows with ``||x|| > 1e-6``);
* ``explained_variance``: ``1 - FVU`` (mean-centred); ``true_l0``, ``sae_l0``,
  ``dead_latents`` (latents that never fire on the samples).

The same definitions as SAELens' ``eval_sae_on_synthetic_data`` (tested against its functions on
the same tensors), computed from the sparse code: the detector counts come from the
``(row, latent)`` pairs, so no ``(N, d_sae)`` boolean matrices are built.

>>> import torch
>>> from sae.io import from_dictionary
>>> F = torch.eye(4)
>>> c = torch.tensor([[1.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 0, 3.0]])
>>> r = recovery(from_dictionary(F, k=1, encoder="topk"), c @ F, c, F)
>>> r["mcc"], r["f1"], r["explained_variance"]
(1.0, 0.75, 1.0)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["recovery"]


def _cos(a: Tensor, b: Tensor) -> Tensor:
    a = a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)
    b = b / b.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return a @ b.T


def mcc(decoder: Tensor, features: Tensor) -> float:
    """Mean ``|cos|`` of the optimal one-to-one matching (Hungarian) of rows."""
    from scipy.optimize import linear_sum_assignment

    sim = _cos(decoder.double(), features.double()).abs()
    rows, cols = linear_sum_assignment((1 - sim).cpu().numpy())
    return float(sim[torch.as_tensor(rows), torch.as_tensor(cols)].mean())


def _check(sae: Any, x: Tensor, feature_acts: Tensor, features: Tensor) -> None:
    if x.dim() != 2 or feature_acts.dim() != 2 or features.dim() != 2:
        raise ValueError("x, feature_acts and features must be 2-D")
    if x.shape[0] != feature_acts.shape[0] or feature_acts.shape[1] != features.shape[0]:
        raise ValueError(f"x {tuple(x.shape)}, feature_acts {tuple(feature_acts.shape)} and "
                         f"features {tuple(features.shape)} do not match")
    if features.shape[1] != sae.W_dec.shape[1] or x.shape[1] != sae.cfg.d_in:
        raise ValueError(f"the synthetic model's width {features.shape[1]} differs from the "
                         f"SAE's (d_in={sae.cfg.d_in}, decoder width {sae.W_dec.shape[1]})")


@torch.no_grad()
def recovery(sae: Any, x: Tensor, feature_acts: Tensor, features: Tensor, *,
             batch_size: int = 8192) -> dict[str, float]:
    """Ground-truth recovery metrics of ``sae`` (see the module docstring) on samples ``x``
    generated from ``feature_acts`` and the true directions ``features``; ``sae`` is anything
    with ``encode_pairs`` / ``decode_pairs`` and ``W_dec`` (an SAE, or one seen through a
    pursuit encoder)."""
    _check(sae, x, feature_acts, features)
    was_training = getattr(sae, "training", False)
    if hasattr(sae, "eval"):
        sae.eval()
    D = sae.W_dec.detach().float()
    n_lat = D.shape[0]
    best = _cos(D.double(), features.double()).abs().argmax(dim=1).to(x.device)
    tp = torch.zeros(n_lat, dtype=torch.float64, device=x.device)
    fires = torch.zeros_like(tp)
    gt_count = torch.zeros(features.shape[0], dtype=torch.float64, device=x.device)
    err = shrink = 0.0
    n_valid = nnz = true_nnz = 0
    sum_x = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    sq = 0.0
    for a in range(0, x.shape[0], batch_size):
        xb, cb = x[a : a + batch_size], feature_acts[a : a + batch_size]
        rows, cols, vals = sae.encode_pairs(xb)
        on = vals != 0
        rows, cols = rows[on], cols[on]
        x_hat = sae.decode_pairs(rows, cols, vals[on], xb.shape[0]).to(xb.dtype)
        active = cb > 0
        gt_count += active.sum(dim=0).double()
        true_nnz += int((cb != 0).sum())
        nnz += rows.numel()
        fires += torch.bincount(cols, minlength=n_lat).double()
        hit = active[rows, best[cols]]
        tp += torch.bincount(cols[hit], minlength=n_lat).double()
        xd, hd = xb.double(), x_hat.double()
        err += float((xd - hd).pow(2).sum())
        sum_x += xd.sum(dim=0)
        sq += float(xd.pow(2).sum())
        norms = xd.norm(dim=1)
        ok = norms > 1e-6
        shrink += float((hd.norm(dim=1)[ok] / norms[ok]).sum())
        n_valid += int(ok.sum())
    if was_training:
        sae.train()
    n = x.shape[0]
    fp, fn = fires - tp, gt_count[best] - tp
    precision = torch.where(fires > 0, tp / fires.clamp_min(1), 0.0)
    recall = torch.where(tp + fn > 0, tp / (tp + fn).clamp_min(1), 0.0)
    f1 = torch.where(precision + recall > 0,
                     2 * precision * recall / (precision + recall).clamp_min(1e-300), 0.0)
    tot = sq / n - float((sum_x / n).pow(2).sum())
    return {
        "true_l0": true_nnz / n,
        "sae_l0": nnz / n,
        "dead_latents": int((fires == 0).sum()),
        "shrinkage": shrink / max(n_valid, 1),
        "explained_variance": 1.0 - (err / n) / tot if tot > 0 else 0.0,
        "mcc": mcc(D, features),
        "uniqueness": len(best.unique()) / n_lat if n_lat else 0.0,
        "precision": float(precision.mean()),
        "recall": float(recall.mean()),
        "f1": float(f1.mean()),
        "accuracy": float(((n - fp - fn) / n).mean()),
    }
