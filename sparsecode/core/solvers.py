"""Batched sparse-coding solvers: ISTA/FISTA, IHT, exact Lasso, LARS, OMP / ORMP, ADMM.

All solvers minimise, for every row ``x`` of a batch at once,

    F(z) = 0.5 * ||x - z D||^2 + penalty(z)          (atoms are the rows of D)

where ``penalty`` is an operator of :mod:`sparsecode.core.operators`. The smooth part is a
:class:`LeastSquares` problem, given either by the data ``(X, D)`` or only through the Gram matrix
``G = D D^T`` and the correlations ``C = X D^T`` (what layer-wise pruning has). Work is split into
row chunks so memory stays bounded (``progress=True`` shows a progress bar over them), rows that
have converged drop out of the batch, and every solver returns per-row iteration counts.

The solvers live in :mod:`.problem` (the problem), :mod:`.proximal` (FISTA, ISTA, IHT),
:mod:`.lars` (LARS, exact Lasso), :mod:`.pursuit` (MP, OMP, ORMP, non-negative OMP,
support least squares) and :mod:`.admm` (ADMM under a projection, the pruning solver); this
module gathers them.

Example
-------
>>> import torch
>>> from sparsecode.core.operators import L1
>>> from sparsecode.core.solvers import LeastSquares, fista
>>> D = torch.eye(3, dtype=torch.float64)
>>> X = torch.tensor([[3.0, 0.5, -2.0]], dtype=torch.float64)
>>> fista(LeastSquares.from_data(X, D), L1(1.0)).codes.round(decimals=6)
tensor([[ 2.,  0., -1.]], dtype=torch.float64)
"""

from __future__ import annotations

from .admm import ShiftedGram, admm
from .lars import lars, lasso
from .problem import CHUNK_BYTES, OMP_CHUNK_BYTES, LeastSquares, SolverResult, lipschitz
from .proximal import fista, fista_momentum, iht, ista
from .pursuit import mp, nnomp, omp, support_lstsq

__all__ = [
    "CHUNK_BYTES",
    "OMP_CHUNK_BYTES",
    "LeastSquares",
    "ShiftedGram",
    "SolverResult",
    "admm",
    "fista",
    "fista_momentum",
    "iht",
    "ista",
    "lars",
    "lasso",
    "lipschitz",
    "mp",
    "nnomp",
    "omp",
    "support_lstsq",
]
