"""Feature splitting on the first-letter task (Chanin et al. 2024; SAEBench's k-sparse probing,
docs/metrics.md "Feature splitting").

An l1-penalised 26-way probe on the latents of the training words ranks the latents of each
letter (largest positive weight first). For ``k = 1 .. max_k`` a logistic regression on the top
``k`` latents is fitted (scikit-learn, balanced classes) and scored by F1 on the test words. A
letter's *main latents* are the top ``k`` for the largest ``k`` reached while each step raises F1
by more than ``f1_jump`` (0.03) over the previous best: more than one main latent means the
letter's feature is split over several latents.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import Tensor

from .first_letter import LETTERS, MIN_PROBE_F1, PROBE_BATCH, FirstLetterData, probe_f1
from .probes import fit_logistic, fit_multi_probe

__all__ = ["KSparse", "k_sparse_probing", "split_features", "splitting"]


@dataclass
class KSparse:
    """k-sparse probing results: ``feats[j][k-1]`` the latents of letter ``j``'s probe of size
    ``k``, ``f1 (26, max_k)`` their test F1, ``main[j]`` the letter's main latents."""

    feats: list[list[list[int]]]
    f1: np.ndarray
    main: list[list[int]]


def split_features(f1_by_k: Sequence[float], feats_by_k: Sequence[list[int]],
                   f1_jump: float = 0.03) -> list[int]:
    """The main latents: the latents of the largest ``k`` whose F1 beat the previous best by
    more than ``f1_jump`` at every step from ``k = 1`` (SAEBench's rule).

    >>> split_features([0.5, 0.7, 0.71], [[3], [3, 8], [3, 8, 1]])
    [3, 8]
    """
    best, main = -100.0, []
    for f1, feats in zip(f1_by_k, feats_by_k, strict=True):
        if f1 <= best + f1_jump:
            break
        best, main = f1, list(feats)
    return main


def k_sparse_probing(z_train: Tensor, labels_train: Tensor, z_test: Tensor, labels_test: Tensor,
                     *, max_k: int = 10, l1: float = 0.01, f1_jump: float = 0.03,
                     seed: int = 42) -> KSparse:
    """k-sparse probes of each letter on latents (``z_*``: ``(n, d_sae)``); see the module."""
    from sklearn.metrics import f1_score

    W, _ = fit_multi_probe(z_train, labels_train, len(LETTERS), l1=l1, batch_size=PROBE_BATCH,
                           seed=seed)
    ytr, yte = labels_train.numpy(), labels_test.numpy()
    feats, f1 = [], np.zeros((len(LETTERS), max_k))
    for j in range(len(LETTERS)):
        order = W[j].topk(max_k).indices
        feats.append([order[:k].tolist() for k in range(1, max_k + 1)])
        for k in range(1, max_k + 1):
            cols = order[:k]
            clf = fit_logistic(z_train[:, cols], ytr == j, max_iter=500, class_weight="balanced")
            score = z_test[:, cols].numpy() @ clf.coef_[0] + clf.intercept_[0]
            f1[j, k - 1] = f1_score(yte == j, score > 0, zero_division=0.0)
    main = [split_features(f1[j], feats[j], f1_jump) for j in range(len(LETTERS))]
    return KSparse(feats, f1, main)


def letters_present(data: FirstLetterData, min_probe_f1: float = MIN_PROBE_F1) -> list[int]:
    """The letters whose activation probe reaches test F1 > ``min_probe_f1``: the model
    represents them, so the dictionary is judged on them (SAEBench's ``min_GT_probe_f1``)."""
    return [j for j, f in enumerate(probe_f1(data)) if f > min_probe_f1]


def splitting(ks: KSparse, data: FirstLetterData, min_probe_f1: float = MIN_PROBE_F1
              ) -> dict[str, Any]:
    """Metrics and per-letter details of feature splitting over the letters present."""
    present = letters_present(data, min_probe_f1)
    pf1 = probe_f1(data)
    details = [{"first_letter": LETTERS[j], "num_split_features": len(ks.main[j]),
                "split_features": ks.main[j], "probe_f1": float(pf1[j]),
                "f1_sparse_sae": [float(v) for v in ks.f1[j]]} for j in present]
    n = [d["num_split_features"] for d in details]
    return {"metrics": {"mean": {"mean_num_split_features": float(np.mean(n)) if n else None,
                                 "std_dev_num_split_features": _std(n),
                                 "mean_f1_sparse_sae_1": float(np.mean(ks.f1[present, 0]))
                                 if present else None}},
            "details": details}


def _std(values: Sequence[float]) -> float | None:
    return float(np.std(values, ddof=1)) if len(values) > 1 else None

