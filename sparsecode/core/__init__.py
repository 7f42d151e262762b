"""The shared solver core: penalty/projection operators, batched solvers, sparse codes.

Torch only (no scikit-learn, no transformers); runs on any device, float32 or float64.
"""

from . import operators
from .solvers import (
    LeastSquares,
    SolverResult,
    admm,
    fista,
    iht,
    ista,
    lars,
    lasso,
    lipschitz,
    mp,
    nnomp,
    omp,
)
from .sparse import SparseCodes

__all__ = [
    "operators",
    "LeastSquares",
    "SolverResult",
    "SparseCodes",
    "admm",
    "fista",
    "iht",
    "ista",
    "lars",
    "lasso",
    "lipschitz",
    "mp",
    "nnomp",
    "omp",
]
