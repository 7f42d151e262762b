"""Feature absorption on the first-letter task (Chanin et al. 2024, "A is for Absorption";
SAEBench's ``absorption_first_letter``, docs/metrics.md "Feature absorption").

For each letter the model represents (activation probe F1 > 0.6) and each test word of that
letter on which the probe fires, with ``p`` the unit probe direction, ``a = y . p`` the
activation's projection on it, and each latent's projection ``z_i cos(p, d_i)`` (``d_i`` its
decoder row):

* **absorption fraction**: ``m`` = the summed projection of the letter's main latents
  (:mod:`sae.evals.splitting`); the absorbers are the other latents with ``cos >= 0.1`` and a
  positive projection, ``A`` the sum of the largest three. The fraction is 0 when ``m >= a`` or
  ``A / a < 0.4``, 1 when ``m <= 0``, else ``min(A, a - m) / (min(A, a - m) + m)``;
* **full absorption**: no main latent fires, yet the latent with the largest projection has
  ``cos >= 0.025``, ``a >= 0`` and carries at least 0.4 of ``a``.

Per letter, both are averaged over the probe's true positives; the scores are their means over
letters. The probe, main latents and activations are those of
:func:`sae.evals.first_letter.first_letter_data` (the test prompts are reused rather than drawn
afresh as SAEBench does).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from .first_letter import LETTERS, MIN_PROBE_F1, FirstLetterData, probe_scores
from .splitting import KSparse, _std, letters_present

__all__ = ["absorption", "word_absorption"]

EPS = 1e-8


def word_absorption(
    y: Tensor,
    z: Tensor,
    probe: Tensor,
    W_dec: Tensor,
    main: list[int],
    *,
    fraction_cos: float = 0.1,
    full_cos: float = 0.025,
    proportion: float = 0.4,
    max_absorbers: int = 3,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(fraction, full, top_latent)`` for each row: the absorption fraction, whether it is
    full absorption, and the latent with the largest probe projection (see the module).

    ``y (n, d)`` activations, ``z (n, d_sae)`` latents, ``probe (d,)`` direction, ``W_dec
    (d_sae, d)`` decoder rows, ``main`` the letter's main latents.

    An SAE whose only latent on the probe direction is a main latent absorbs nothing:

    >>> W = torch.eye(3)
    >>> y, z = torch.tensor([[2.0, 0, 0]]), torch.tensor([[2.0, 0, 0]])
    >>> word_absorption(y, z, torch.tensor([1.0, 0, 0]), W, main=[0])[0].tolist()
    [0.0]
    """
    p = probe.float() / probe.float().norm()
    cos = torch.nn.functional.cosine_similarity(p[None], W_dec.float(), dim=-1)
    proj = z.float() * cos
    a = y.float() @ p
    main_t = torch.as_tensor(main, dtype=torch.long)
    m = proj[:, main_t].sum(1)
    absorber = (cos >= fraction_cos) & (proj > 0)
    absorber[:, main_t] = False
    top = torch.where(absorber, proj, torch.zeros(())).topk(
        min(max_absorbers, proj.shape[1]), dim=1).values.sum(1)
    share = torch.minimum(top, a - m)
    fraction = (share / (share + m)).clamp(0, 1)
    fraction = torch.where(m <= 0, torch.ones(()), fraction)
    fraction = torch.where((m >= a) | (top / a < proportion), torch.zeros(()), fraction)
    best = proj.argmax(dim=1)
    best_proj = proj.gather(1, best[:, None])[:, 0]
    full = ((z[:, main_t] < EPS).all(1) & (cos[best] >= full_cos) & (a >= 0)
            & (best_proj / a >= proportion))
    return fraction, full, best


def absorption(sae: Any, ks: KSparse, data: FirstLetterData, z_test: Tensor,
               min_probe_f1: float = MIN_PROBE_F1) -> dict[str, Any]:
    """SAEBench's absorption metrics (``mean`` category) and per-letter details for ``sae``,
    from its k-sparse probing ``ks`` and test latents ``z_test``; ``absorbers`` counts, per
    latent, the words it fully absorbed (what the feature browser shows)."""
    W, _ = data.probe
    scores = probe_scores(data)
    labels = data.labels["test"]
    W_dec = sae.W_dec.detach().float().cpu()
    details, absorbers = [], {}
    for j in letters_present(data, min_probe_f1):
        rows = ((labels == j) & (scores[:, j] > 0)).nonzero()[:, 0]
        if rows.numel() == 0:
            continue
        frac, full, best = word_absorption(data.y["test"][rows], z_test[rows], W[j], W_dec,
                                           ks.main[j])
        for latent in best[full].tolist():
            absorbers.setdefault(latent, {}).setdefault(LETTERS[j], 0)
            absorbers[latent][LETTERS[j]] += 1
        n = rows.numel()
        details.append({
            "first_letter": LETTERS[j], "mean_absorption_fraction": float(frac.sum()) / n,
            "full_absorption_rate": float(full.sum()) / n, "num_full_absorption": int(full.sum()),
            "num_probe_true_positives": n, "num_split_features": len(ks.main[j]),
            "main_latents": ks.main[j]})
    keys = {"absorption_fraction_score": "mean_absorption_fraction",
            "full_absorption_score": "full_absorption_rate",
            "num_split_features": "num_split_features"}
    mean = {}
    for name, key in keys.items():
        values = [d[key] for d in details]
        mean[f"mean_{name}"] = float(np.mean(values)) if values else None
        mean[f"std_dev_{name}"] = _std(values)
    return {"metrics": {"mean": mean}, "details": details,
            "absorbers": {str(k): v for k, v in sorted(absorbers.items())}}
