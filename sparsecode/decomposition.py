"""Sparse coding against a fixed dictionary, scikit-learn style, over the batched solver core.

:func:`sparse_encode` (here) and :class:`~sparsecode.SparseCoder` (:mod:`sparsecode.coder`)
are drop-in replacements for scikit-learn's functions of the same name: same parameters, same
objective scaling (``0.5 * ||x - z D||^2 + alpha * ||z||_1`` per sample, atoms are the rows of
``D``), same results, computed for all samples at once by :mod:`sparsecode.core`. New
algorithm names expose the rest of the core (FISTA/ISTA, IHT, top-k, nonconvex penalties).

Example
-------
>>> import numpy as np
>>> from sparsecode import sparse_encode
>>> D = np.eye(4)
>>> sparse_encode(np.array([[3.0, 0.5, -2.0, 0.0]]), D, algorithm="omp", n_nonzero_coefs=2)
array([[ 3.,  0., -2.,  0.]])
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ._arrays import check_dictionary, resolve_device, to_output, to_tensor
from .core import operators as ops
from .core.solvers import LeastSquares, fista, iht, lars, lasso, omp

#: scikit-learn's algorithm names (same problems, same scaling).
SKLEARN_ALGORITHMS = ("lasso_lars", "lasso_cd", "lars", "omp", "threshold")
#: Penalties solved by (monotone) FISTA: the algorithm name is the penalty name.
PENALTY_ALGORITHMS = ("l0", "lq", "mcp", "scad", "cel0")
#: All algorithm names accepted by :func:`sparse_encode`.
ALGORITHMS = SKLEARN_ALGORITHMS + ("ormp", "fista", "ista", "iht", "topk") + PENALTY_ALGORITHMS
_USES_K = ("omp", "ormp", "lars", "iht", "topk")


def sparse_encode(
    X: Any,
    dictionary: Any,
    *,
    gram: Any = None,
    cov: Any = None,
    algorithm: str = "lasso_lars",
    n_nonzero_coefs: int | None = None,
    alpha: float | None = None,
    copy_cov: bool = True,
    init: Any = None,
    max_iter: int = 1000,
    n_jobs: int | None = None,
    check_input: bool = True,
    verbose: int = 0,
    positive: bool = False,
    tol: float = 1e-6,
    penalty_params: dict | None = None,
    device: str | torch.device | None = "auto",
    chunk_size: int | None = None,
) -> Any:
    """Sparse codes ``Z`` with ``X ~= Z @ dictionary``, one problem per row of ``X``.

    Parameters follow :func:`sklearn.decomposition.sparse_encode`:

    * ``algorithm``: ``'lasso_lars'``, ``'lasso_cd'`` (both: exact Lasso by batched homotopy,
      ``0.5||x - zD||^2 + alpha||z||_1``), ``'lars'`` (least-angle regression with
      ``n_nonzero_coefs`` atoms), ``'omp'`` (orthogonal matching pursuit), ``'threshold'``
      (soft threshold of ``X D^T`` at ``alpha``); and, beyond scikit-learn, ``'ormp'``
      (order-recursive matching pursuit, SPAMS' ``omp``; parameters as ``'omp'``), ``'fista'``
      / ``'ista'`` (Lasso by proximal gradient to relative tolerance ``tol``), ``'iht'`` (iterative
      hard thresholding onto ``n_nonzero_coefs``-sparse codes), ``'topk'`` (keep the
      ``n_nonzero_coefs`` largest correlations, the TopK-SAE encoder for a fixed dictionary) and
      the nonconvex penalties ``'l0'``, ``'lq'``, ``'mcp'``, ``'scad'``, ``'cel0'`` (weight
      ``alpha``, extra parameters such as ``q`` or ``gamma`` in ``penalty_params``), solved by
      monotone FISTA (``'lq'`` defaults to ``q = 1/2``).
    * ``n_nonzero_coefs``: for omp/ormp/lars/iht/topk; default ``min(max(n_features / 10, 1),
      n_components)`` as in scikit-learn.
    * ``alpha``: the l1 (or penalty) weight; the threshold for ``'threshold'``; for ``'omp'``
      (and ``'ormp'``) the squared residual norm to reach, which overrides ``n_nonzero_coefs``
      (as scikit-learn documents, but unlike scikit-learn's code, which ignores it). Default 1.
    * ``positive``: nonnegative codes (not for ``'omp'``, ``'ormp'``, ``'lars'``).
    * ``gram`` (``D D^T``) and ``cov`` (``D X^T``, shape ``(n_components, n_samples)``) may be
      precomputed; ``init`` warm-starts the iterative algorithms.
    * ``verbose``: a progress bar over row chunks (tqdm).
    * ``device``: ``"auto"`` runs on CUDA when present (numpy input) or on the tensor's device.
      ``n_jobs`` is accepted for compatibility; parallelism comes from torch threads.

    Returns an array of shape ``(n_samples, n_components)``: numpy for numpy input, a tensor on
    the input's device for torch input. float32 input gives float32 codes.

    >>> import numpy as np
    >>> from sparsecode import sparse_encode
    >>> rng = np.random.default_rng(0)
    >>> D = rng.standard_normal((20, 8)); D /= np.linalg.norm(D, axis=1, keepdims=True)
    >>> X = 2.0 * D[[3]] - D[[7]]
    >>> Z = sparse_encode(X, D, algorithm="omp", n_nonzero_coefs=2)
    >>> np.flatnonzero(Z), Z[0, [3, 7]].round(6)
    (array([3, 7]), array([ 2., -1.]))
    """
    del copy_cov, n_jobs, check_input  # accepted for scikit-learn compatibility
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    dev = resolve_device(device, X)
    Xt = to_tensor(X, "X", device=dev)
    Dt = to_tensor(dictionary, "dictionary", device=dev, dtype=Xt.dtype)
    n_samples, n_features = Xt.shape
    n_components = Dt.shape[0]
    check_dictionary(Dt, Xt)
    if positive and algorithm in ("omp", "ormp", "lars"):
        raise ValueError(f"Positive constraint not supported for '{algorithm}' coding method.")
    k = _n_nonzero(n_nonzero_coefs, n_features, n_components) if algorithm in _USES_K else None
    if alpha is not None and not (np.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")

    problem = _problem(Xt, Dt, gram, cov, dev)
    init_t = None if init is None else to_tensor(init, "init", device=dev, dtype=Xt.dtype)
    if init_t is not None and init_t.shape != (n_samples, n_components):
        raise ValueError(
            f"init must have shape {(n_samples, n_components)}, got {tuple(init_t.shape)}"
        )
    codes = encode(
        problem, algorithm, n_nonzero_coefs=k, alpha=alpha,
        positive=positive, max_iter=max_iter, tol=tol, penalty_params=penalty_params,
        init=init_t, chunk_size=chunk_size, progress=bool(verbose),
    )
    return to_output(codes, X)


def _n_nonzero(n_nonzero_coefs: int | None, n_features: int, n_components: int) -> int:
    """The atoms per code: given, or scikit-learn's ``min(max(n_features / 10, 1), K)``."""
    k = n_nonzero_coefs
    if k is None:
        k = int(min(max(n_features / 10, 1), n_components))
    if isinstance(k, bool) or int(k) != k or not 1 <= k <= n_components:
        raise ValueError(
            f"n_nonzero_coefs must be an integer in [1, n_components={n_components}], "
            f"got {n_nonzero_coefs!r}"
        )
    return int(k)


def encode(
    problem: LeastSquares,
    algorithm: str,
    *,
    n_nonzero_coefs: int | None = None,
    alpha: float | None = None,
    positive: bool = False,
    max_iter: int = 1000,
    tol: float = 1e-6,
    penalty_params: dict | None = None,
    init: torch.Tensor | None = None,
    chunk_size: int | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Dense codes for an already-validated problem: the dispatch behind :func:`sparse_encode`.

    The estimators that learn dictionaries call this directly (their atoms may be zero while
    learning, which :func:`sparse_encode` rejects).
    """
    a = 1.0 if alpha is None else float(alpha)
    k = n_nonzero_coefs
    bar = dict(chunk_size=chunk_size, progress=progress)
    if algorithm in ("lasso_lars", "lasso_cd"):
        return lasso(problem, a, positive=positive, max_iter=max_iter, tol=tol, **bar).codes
    if algorithm == "lars":
        return lars(problem, n_nonzero_coefs=k, lasso=False, max_iter=max_iter, **bar).codes
    if algorithm in ("omp", "ormp"):
        res = omp(problem, n_nonzero_coefs=None if alpha is not None else k,
                  tol=None if alpha is None else a, selection=algorithm, **bar)
        return res.codes.to_dense()
    if algorithm == "threshold":
        return ops.L1(a, positive=positive).prox(problem.cov, 1.0)
    if algorithm == "topk":
        return ops.TopK(k, positive=positive).project(problem.cov)
    kw = dict(max_iter=max_iter, tol=tol, init=init, **bar)
    if algorithm == "iht":
        return iht(problem, ops.TopK(k, positive=positive), **kw).codes
    if algorithm in ("fista", "ista"):
        penalty = ops.L1(a, positive=positive)
        return fista(problem, penalty, fast=algorithm == "fista", **kw).codes
    params = dict(penalty_params or {})
    if algorithm == "cel0":
        params.setdefault("norms", problem.gram.diagonal().clamp(min=0).sqrt())
    if algorithm == "lq":
        params.setdefault("q", 0.5)
    try:
        penalty = ops.make_operator(algorithm, alpha=a, positive=positive, **params)
    except TypeError as err:
        raise ValueError(
            f"penalty_params {penalty_params!r} do not fit algorithm {algorithm!r}: {err}"
        ) from None
    return fista(problem, penalty, **kw).codes


def _problem(X: torch.Tensor, D: torch.Tensor, gram: Any, cov: Any, dev) -> LeastSquares:
    G = None
    if gram is not None:
        G = to_tensor(gram, "gram", device=dev, dtype=X.dtype)
        if G.shape != (D.shape[0], D.shape[0]):
            raise ValueError(f"gram must have shape {(D.shape[0],) * 2}, got {tuple(G.shape)}")
    problem = LeastSquares.from_data(X, D, gram=G)
    if cov is not None:
        C = to_tensor(cov, "cov", device=dev, dtype=X.dtype)
        if C.shape != (D.shape[0], X.shape[0]):
            raise ValueError(
                f"cov must have shape (n_components, n_samples) = {(D.shape[0], X.shape[0])}, "
                f"got {tuple(C.shape)}"
            )
        problem._cov = C.T
    return problem
