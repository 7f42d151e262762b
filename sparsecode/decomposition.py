"""scikit-learn estimators and functions over the batched solver core.

:func:`sparse_encode` and :class:`SparseCoder` are drop-in replacements for scikit-learn's
functions of the same name: same parameters, same objective scaling
(``0.5 * ||x - z D||^2 + alpha * ||z||_1`` per sample, atoms are the rows of ``D``), same
results, computed for all samples at once by :mod:`sparsecode.core`. New algorithm names expose
the rest of the core (FISTA/ISTA, IHT, top-k, nonconvex penalties).

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
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin
from sklearn.utils.validation import check_is_fitted, validate_data

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
    if algorithm in _USES_K:
        k = n_nonzero_coefs
        if k is None:
            k = int(min(max(n_features / 10, 1), n_components))
        if isinstance(k, bool) or int(k) != k or not 1 <= k <= n_components:
            raise ValueError(
                f"n_nonzero_coefs must be an integer in [1, n_components={n_components}], "
                f"got {n_nonzero_coefs!r}"
            )
        k = int(k)
    if alpha is not None and not (np.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")

    problem = _problem(Xt, Dt, gram, cov, dev)
    init_t = None if init is None else to_tensor(init, "init", device=dev, dtype=Xt.dtype)
    if init_t is not None and init_t.shape != (n_samples, n_components):
        raise ValueError(
            f"init must have shape {(n_samples, n_components)}, got {tuple(init_t.shape)}"
        )
    codes = encode(
        problem, algorithm, n_nonzero_coefs=k if algorithm in _USES_K else None, alpha=alpha,
        positive=positive, max_iter=max_iter, tol=tol, penalty_params=penalty_params,
        init=init_t, chunk_size=chunk_size, progress=bool(verbose),
    )
    return to_output(codes, X)


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


class SparseCoder(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    """Sparse coding against a fixed dictionary (drop-in for scikit-learn's ``SparseCoder``).

    Each row of ``X`` is encoded as a sparse combination of the rows (atoms) of ``dictionary`` by
    :func:`sparse_encode`; see it for the algorithms. ``transform_alpha`` for ``'omp'`` is the
    squared residual tolerance (honoured here; scikit-learn ignores it). ``split_sign`` returns
    ``[max(z, 0), max(-z, 0)]`` side by side, as in scikit-learn.

    >>> import numpy as np
    >>> from sparsecode import SparseCoder
    >>> coder = SparseCoder(np.eye(3), transform_algorithm="threshold", transform_alpha=1.0)
    >>> coder.transform(np.array([[3.0, 0.5, -2.0]]))
    array([[ 2.,  0., -1.]])
    """

    def __init__(
        self,
        dictionary: Any,
        *,
        transform_algorithm: str = "omp",
        transform_n_nonzero_coefs: int | None = None,
        transform_alpha: float | None = None,
        split_sign: bool = False,
        n_jobs: int | None = None,
        positive_code: bool = False,
        transform_max_iter: int = 1000,
        transform_tol: float = 1e-6,
        transform_penalty_params: dict | None = None,
        device: str | None = "auto",
    ):
        self.dictionary = dictionary
        self.transform_algorithm = transform_algorithm
        self.transform_n_nonzero_coefs = transform_n_nonzero_coefs
        self.transform_alpha = transform_alpha
        self.split_sign = split_sign
        self.n_jobs = n_jobs
        self.positive_code = positive_code
        self.transform_max_iter = transform_max_iter
        self.transform_tol = transform_tol
        self.transform_penalty_params = transform_penalty_params
        self.device = device

    def fit(self, X: Any, y: Any = None) -> SparseCoder:
        """Only validates ``X`` (the dictionary is fixed); returns ``self``."""
        if not isinstance(X, torch.Tensor):
            validate_data(self, X, reset=True)
        else:
            self.n_features_in_ = X.shape[1]
        self._check_dictionary()
        return self

    def _check_dictionary(self) -> None:
        d = self.dictionary
        n_feat = d.shape[1] if hasattr(d, "shape") else np.asarray(d).shape[1]
        if getattr(self, "n_features_in_", n_feat) != n_feat:
            raise ValueError(
                f"X has {self.n_features_in_} features but the dictionary's atoms have {n_feat}"
            )

    def transform(self, X: Any) -> Any:
        """Encode ``X`` (n_samples, n_features) -> codes (n_samples, n_components)."""
        check_is_fitted(self)
        if not isinstance(X, torch.Tensor):
            X = validate_data(self, X, reset=False, dtype=[np.float64, np.float32])
        code = sparse_encode(
            X,
            self.dictionary,
            algorithm=self.transform_algorithm,
            n_nonzero_coefs=self.transform_n_nonzero_coefs,
            alpha=self.transform_alpha,
            max_iter=self.transform_max_iter,
            positive=self.positive_code,
            tol=self.transform_tol,
            penalty_params=self.transform_penalty_params,
            device=self.device,
        )
        if self.split_sign:
            lib = torch if isinstance(code, torch.Tensor) else np
            code = lib.concatenate([lib.maximum(code, 0 * code), lib.maximum(-code, 0 * code)], 1)
        return code

    def inverse_transform(self, X: Any) -> Any:
        """Reconstruct signals from codes: ``codes @ dictionary`` (undoing ``split_sign``)."""
        check_is_fitted(self)
        D = self.dictionary
        if isinstance(X, torch.Tensor):
            D = torch.as_tensor(D, dtype=X.dtype, device=X.device)
        else:
            X = np.asarray(X)
            D = np.asarray(D, dtype=X.dtype if X.dtype in (np.float32, np.float64) else None)
        k = D.shape[0]
        width = 2 * k if self.split_sign else k
        if X.ndim != 2 or X.shape[1] != width:
            raise ValueError(
                f"codes must be 2-D with {width} columns ({k} atoms"
                f"{', split_sign' if self.split_sign else ''}), got shape {tuple(X.shape)}"
            )
        if self.split_sign:
            X = X[:, :k] - X[:, k:]
        return X @ D

    @property
    def n_components_(self) -> int:
        return self.dictionary.shape[0]

    @property
    def _n_features_out(self) -> int:
        """Output width, for ``get_feature_names_out`` (doubled by ``split_sign``)."""
        return self.n_components_ * (2 if self.split_sign else 1)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.requires_fit = False
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags
