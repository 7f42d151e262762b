"""Linear probes shared by the evals (SAEBench's definitions, docs/metrics.md).

* :func:`fit_multi_probe`: one-vs-rest logistic probes trained together by Adam (the
  first-letter probe on activations, and with an l1 weight the sparse probe that ranks latents
  for k-sparse probing), as SAEBench's absorption eval trains them;
* :func:`fit_logistic`: scikit-learn's ``LogisticRegression`` (SAEBench's k-sparse and
  sparse-probing classifiers);
* :func:`top_k_mean_diff`: the ``k`` features whose class means differ most (Gurnee et al.
  2023's selection, SAEBench's sparse probing).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["fit_logistic", "fit_multi_probe", "top_k_mean_diff"]


def fit_multi_probe(
    x: Tensor,
    labels: Tensor,
    n_probes: int,
    *,
    l1: float = 0.0,
    weight_decay: float = 1e-6,
    epochs: int = 50,
    lr: float = 0.01,
    end_lr: float = 1e-5,
    batch_size: int = 4096,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Weights ``(n_probes, d)`` and biases ``(n_probes,)`` of one-vs-rest logistic probes.

    Probe ``j`` separates ``labels == j`` from the rest: binary cross-entropy with the positives
    weighted by ``n_neg / n_pos``, plus ``l1`` times the mean over probes of ``sum |w|``; Adam
    with ``weight_decay``, the learning rate decaying exponentially from ``lr`` to ``end_lr`` over
    ``epochs`` epochs of shuffled minibatches (SAEBench's ``train_multi_probe``). Weights start
    at zero, the shuffle is seeded: the same inputs give the same probe.

    >>> x = torch.tensor([[1.0, 0], [0, 1.0], [2.0, 0], [0, 2.0]])
    >>> W, b = fit_multi_probe(x, torch.tensor([0, 1, 0, 1]), 2)
    >>> bool(W[0, 0] > 0 > W[0, 1]) and bool(W[1, 1] > 0 > W[1, 0])
    True
    """
    if x.dim() != 2 or labels.shape != (x.shape[0],):
        raise ValueError(f"x must be (n, d) and labels (n,), got {tuple(x.shape)}, "
                         f"{tuple(labels.shape)}")
    x = x.float()
    target = torch.nn.functional.one_hot(labels.long(), n_probes).float()
    n_pos = target.sum(0)
    pos_weight = (x.shape[0] - n_pos) / n_pos.clamp_min(1)
    W = torch.zeros(n_probes, x.shape[1], requires_grad=True)
    b = torch.zeros(n_probes, requires_grad=True)
    opt = torch.optim.Adam([W, b], lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.ExponentialLR(
        opt, gamma=math.exp(math.log(end_lr / lr) / epochs))
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    gen = torch.Generator().manual_seed(seed)
    with torch.enable_grad():
        for _ in range(epochs):
            for idx in torch.randperm(x.shape[0], generator=gen).split(batch_size):
                opt.zero_grad()
                loss = loss_fn(x[idx] @ W.T + b, target[idx])
                if l1:
                    loss = loss + l1 * W.abs().sum(dim=-1).mean()
                loss.backward()
                opt.step()
            sched.step()
    return W.detach(), b.detach()


def fit_logistic(x: Tensor | np.ndarray, y: Tensor | np.ndarray, **settings: Any):
    """A fitted scikit-learn ``LogisticRegression`` (float32 features; ``settings`` are its
    parameters, e.g. ``max_iter=500, class_weight="balanced"``)."""
    from sklearn.linear_model import LogisticRegression

    x = x.numpy() if isinstance(x, Tensor) else np.asarray(x)
    y = y.numpy() if isinstance(y, Tensor) else np.asarray(y)
    return LogisticRegression(**settings).fit(x.astype(np.float32), y)


def top_k_mean_diff(x: Tensor, positive: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` columns of ``x`` whose mean over the ``positive`` rows differs most
    (in absolute value) from their mean over the other rows, largest difference first.

    >>> x = torch.tensor([[0.0, 5, 1], [0, 0, 1], [1, 5, 0], [1, 0, 0]])
    >>> top_k_mean_diff(x, torch.tensor([True, False, True, False]), 1).tolist()
    [1]
    """
    pos = positive.bool()
    diff = (x[pos].float().mean(0) - x[~pos].float().mean(0)).abs()
    return torch.argsort(diff, descending=True, stable=True)[:k]
