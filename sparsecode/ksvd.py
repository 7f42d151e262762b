"""K-SVD dictionary learning (Aharon, Elad & Bruckstein 2006) as a scikit-learn estimator.

K-SVD learns a dictionary ``D`` (``n_components`` unit-norm atoms as rows) in which every sample
is a combination of at most ``n_nonzero_coefs`` atoms, minimising ``||X - Z D||_F^2`` subject to
``||z_i||_0 <= k``. It alternates

1. **sparse coding**: all samples at once with the core's batched OMP
   (:func:`sparsecode.core.omp`), and
2. **dictionary update**: for each atom ``j`` in turn, with the samples ``I`` whose code uses it
   (nonzero coefficient, of either sign), the best rank-1 approximation of the residual without
   that atom, ``E_j = X_I - Z_I D + z_{I,j} d_j``: ``d_j`` becomes the top right singular vector
   and ``z_{I,j}`` the top singular value times the top left singular vector (exact SVD of the
   small ``|I| x n_features`` matrix). ``approximate=True`` is the approximate K-SVD of
   Rubinstein, Zibulevsky & Elad (2008): one power-iteration step from the current codes,
   ``d_j = E_j^T z / ||E_j^T z||``, ``z = E_j d_j``.

Atoms used by no sample are replaced by the worst-represented samples (largest residual norm),
normalised.

Example
-------
>>> from sklearn.datasets import make_sparse_coded_signal
>>> from sparsecode.ksvd import KSVD
>>> X, D, _ = make_sparse_coded_signal(n_samples=200, n_components=12, n_features=8,
...                                    n_nonzero_coefs=2, random_state=0)
>>> ksvd = KSVD(n_components=12, n_nonzero_coefs=2, max_iter=5, random_state=0).fit(X)
>>> ksvd.components_.shape, ksvd.transform(X[:3]).shape
((12, 8), (3, 12))
>>> bool(ksvd.error_[-1] < ksvd.error_[0])
True
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.utils import check_random_state
from torch import Tensor

from ._arrays import to_output, to_tensor
from ._base import NONNEGATIVE, POSITIVE_INT, TRANSFORM_CONSTRAINTS, DictionaryTransformerMixin
from .core.solvers import LeastSquares, omp
from .core.sparse import SparseCodes

#: relative change of the objective below which fitting stops
_REL_TOL = 1e-6


class KSVD(DictionaryTransformerMixin, BaseEstimator):
    """K-SVD dictionary learning (Aharon, Elad & Bruckstein 2006).

    Minimises ``||X - Z D||_F^2 / n_samples`` over unit-norm atoms ``D`` (rows) and codes ``Z``
    with at most ``n_nonzero_coefs`` nonzeros per row, alternating batched OMP coding of all
    samples with the sequential K-SVD atom update (rank-1 SVD of each atom's residual restricted
    to the samples that use it; see the module docstring).

    Parameters
    ----------
    n_components : int, default=None
        Number of atoms. ``None``: ``dict_init.shape[0]`` if ``dict_init`` is given, else
        ``n_features`` (as scikit-learn's ``DictionaryLearning``).
    n_nonzero_coefs : int, default=None
        Sparsity ``k`` of the codes during fitting. ``None``: ``max(1, n_features // 10)``
        bounded by ``n_components`` (scikit-learn's OMP default); when ``tol`` is given instead,
        ``None`` means no cap other than ``min(n_components, n_features)``.
    tol : float, default=None
        If given, OMP also stops a sample once its squared residual norm is ``<= tol``.
    max_iter : int, default=10
        Number of coding / dictionary-update iterations. Fitting stops earlier when the
        objective changes by less than ``1e-6`` relative (and no atom was replaced).
    approximate : bool, default=False
        Approximate K-SVD (Rubinstein et al. 2008): one power-iteration step per atom instead of
        an exact SVD.
    dict_init : array of shape (n_components, n_features), default=None
        Initial dictionary (rows are normalised; zero rows are not allowed). ``None``: distinct
        random samples of ``X`` with nonzero norm (drawn with ``random_state``), normalised; if
        fewer than ``n_components`` samples are nonzero, the remaining atoms are random
        Gaussian directions.
    transform_algorithm, transform_n_nonzero_coefs, transform_alpha, transform_max_iter, \
positive_code, split_sign
        Coding in :meth:`transform` by :func:`sparsecode.sparse_encode` (see
        :class:`sparsecode._base.DictionaryTransformerMixin`). ``transform_n_nonzero_coefs=None``
        is ``sparse_encode``'s default ``min(max(n_features / 10, 1), n_components)``, *not*
        ``n_nonzero_coefs``; set it to match the fitting sparsity. ``positive_code=True`` raises a
        ``ValueError`` in :meth:`fit` (K-SVD codes with OMP, which has no positive variant, as in
        scikit-learn).
    random_state : int, RandomState instance or None, default=None
        Seed for the initial dictionary.
    device : str or torch.device, default="auto"
        Compute device; ``"auto"``: the tensor's device for torch input, else CUDA when present.
    verbose : bool, default=False
        Progress bar (tqdm) over iterations, showing the objective.

    Attributes
    ----------
    components_ : ndarray or Tensor of shape (n_components, n_features)
        Unit-norm atoms (numpy after numpy input, a tensor on the input's device after torch
        input; float32 input gives float32).
    error_ : list of float
        Objective ``||X - Z D||_F^2 / n_samples`` after each iteration (non-increasing).
    n_iter_ : int
        Iterations run.
    n_features_in_ : int
        Number of features seen in :meth:`fit`.

    Notes
    -----
    OMP is greedy, so plain K-SVD can increase the objective in a coding step. Here a sample
    keeps its previous code (still ``k``-sparse, and exact for the current dictionary after the
    update) when OMP's code for it has a larger residual; with this, and since each atom update
    is an exact (or, approximately, a block-coordinate) minimisation, ``error_`` never
    increases. The first iteration's codes are plain OMP codes.

    Examples
    --------
    >>> import numpy as np
    >>> from sparsecode.ksvd import KSVD
    >>> X = np.random.default_rng(0).standard_normal((100, 6))
    >>> ksvd = KSVD(n_components=8, n_nonzero_coefs=2, max_iter=3, random_state=0).fit(X)
    >>> np.allclose(np.linalg.norm(ksvd.components_, axis=1), 1.0), len(ksvd.error_)
    (True, 3)
    """

    _parameter_constraints: dict = {
        "n_components": [POSITIVE_INT, None],
        "n_nonzero_coefs": [POSITIVE_INT, None],
        "tol": [NONNEGATIVE, None],
        "max_iter": [POSITIVE_INT],
        "approximate": ["boolean"],
        "dict_init": ["array-like", None],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
        **TRANSFORM_CONSTRAINTS,
    }

    def __init__(
        self,
        n_components: int | None = None,
        *,
        n_nonzero_coefs: int | None = None,
        tol: float | None = None,
        max_iter: int = 10,
        approximate: bool = False,
        dict_init: Any = None,
        transform_algorithm: str = "omp",
        transform_n_nonzero_coefs: int | None = None,
        transform_alpha: float | None = None,
        transform_max_iter: int = 1000,
        positive_code: bool = False,
        split_sign: bool = False,
        random_state: Any = None,
        device: str | torch.device | None = "auto",
        verbose: bool = False,
    ):
        self.n_components = n_components
        self.n_nonzero_coefs = n_nonzero_coefs
        self.tol = tol
        self.max_iter = max_iter
        self.approximate = approximate
        self.dict_init = dict_init
        self.transform_algorithm = transform_algorithm
        self.transform_n_nonzero_coefs = transform_n_nonzero_coefs
        self.transform_alpha = transform_alpha
        self.transform_max_iter = transform_max_iter
        self.positive_code = positive_code
        self.split_sign = split_sign
        self.random_state = random_state
        self.device = device
        self.verbose = verbose

    # ----------------------------------------------------------------------------------------
    # checks and initialisation
    # ----------------------------------------------------------------------------------------

    def _check_params(self, n_samples: int, n_features: int) -> tuple[int, int | None]:
        """(n_components, k for OMP or None) after validating the hyperparameters."""
        self._validate_params()
        if self.positive_code:
            raise ValueError(
                "Positive constraint not supported for 'omp' coding method. "
                "(KSVD codes with OMP; positive_code=True is not available.)"
            )
        K = self.n_components
        if K is None:
            K = np.shape(self.dict_init)[0] if self.dict_init is not None else n_features
        K = int(K)
        if K < 1:
            raise ValueError("n_components must be >= 1 (dict_init has no atoms)")
        if self.dict_init is None and K > n_samples:
            raise ValueError(
                f"n_components={K} must be <= n_samples = {n_samples} to initialise the "
                "dictionary from data samples; pass dict_init or lower n_components"
            )
        k = self.n_nonzero_coefs
        if k is None:
            k = None if self.tol is not None else int(min(max(n_features // 10, 1), K))
        elif isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= K:
            raise ValueError(
                f"n_nonzero_coefs must be an integer in [1, n_components={K}], got {k!r}"
            )
        return K, k

    def _init_dictionary(self, X: Tensor, K: int) -> Tensor:
        n, p = X.shape
        if self.dict_init is not None:
            D = to_tensor(self.dict_init, "dict_init", device=X.device, dtype=X.dtype)
            if tuple(D.shape) != (K, p):
                raise ValueError(
                    f"dict_init has shape {tuple(D.shape)} but (n_components, n_features) is "
                    f"{(K, p)}"
                )
            norms = torch.linalg.vector_norm(D, dim=1)
            if bool((norms == 0).any()):
                rows = (norms == 0).nonzero().squeeze(1)[:5].tolist()
                raise ValueError(f"dict_init has zero-norm atoms (rows {rows})")
            return D / norms[:, None]
        rng = check_random_state(self.random_state)
        norms = torch.linalg.vector_norm(X, dim=1)
        nonzero = (norms > 0).nonzero().squeeze(1).cpu().numpy()
        pick = rng.choice(nonzero, size=min(K, nonzero.size), replace=False)
        pick_t = torch.as_tensor(pick, device=X.device, dtype=torch.long)
        D = X[pick_t] / norms[pick_t, None]
        if pick.size < K:  # too few nonzero samples: random directions for the rest
            G = torch.as_tensor(rng.standard_normal((K - pick.size, p)), dtype=X.dtype)
            G = G.to(X.device)
            D = torch.cat([D, G / torch.linalg.vector_norm(G, dim=1, keepdim=True)])
        return D

    # ----------------------------------------------------------------------------------------
    # the two steps
    # ----------------------------------------------------------------------------------------

    @staticmethod
    def _encode(X: Tensor, D: Tensor, k: int | None, tol: float | None) -> SparseCodes:
        """The coding step: batched OMP of every row of ``X`` against ``D``."""
        return omp(LeastSquares.from_data(X, D), n_nonzero_coefs=k, tol=tol).codes

    def _update_dictionary(self, R: Tensor, D: Tensor, codes: SparseCodes) -> None:
        """Sequential K-SVD atom update, in place on ``R`` (residual), ``D`` and ``codes``."""
        K = D.shape[0]
        width = codes.values.shape[1]
        flat_val = codes.values.view(-1)
        flat_idx = codes.indices.view(-1)
        pos = (flat_val != 0).nonzero().squeeze(1)
        atoms = flat_idx[pos]
        pos = pos[torch.argsort(atoms, stable=True)]  # slots grouped by atom
        counts = torch.bincount(atoms, minlength=K).tolist()
        start = 0
        for j, c in enumerate(counts):
            if c == 0:
                continue
            p = pos[start : start + c]
            start += c
            rows = p // width
            g = flat_val[p]
            d_old = D[j]
            E = R[rows] + g[:, None] * d_old[None, :]  # residual without atom j, rows I only
            if self.approximate:
                d = E.T @ g
                nrm = torch.linalg.vector_norm(d)
                d = torch.where(nrm > 0, d / nrm.clamp(min=torch.finfo(d.dtype).tiny), d_old)
                g = E @ d
            else:
                _, S, Vh = torch.linalg.svd(E, full_matrices=False)
                d = Vh[0]
                sign = torch.where(d @ d_old < 0, -1.0, 1.0).to(d.dtype)
                d = d * sign
                g = E @ d  # = sigma_1 * u_1 (up to the sign above)
            R[rows] = E - g[:, None] * d[None, :]
            flat_val[p] = g
            D[j] = d

    @staticmethod
    def _replace_unused(X: Tensor, R: Tensor, D: Tensor, codes: SparseCodes) -> int:
        """Replace atoms no sample uses by the worst-represented samples; return how many."""
        used = torch.zeros(D.shape[0], dtype=torch.bool, device=D.device)
        used[codes.indices[codes.values != 0]] = True
        unused = (~used).nonzero().squeeze(1)
        if unused.numel() == 0:
            return 0
        res = (R * R).sum(dim=1)
        top = torch.topk(res, min(unused.numel(), res.numel()))
        take = top.indices[top.values > 0]
        unused = unused[: take.numel()]
        D[unused] = X[take] / torch.linalg.vector_norm(X[take], dim=1, keepdim=True)
        return int(unused.numel())

    # ----------------------------------------------------------------------------------------
    # fit
    # ----------------------------------------------------------------------------------------

    def fit(self, X: Any, y: Any = None) -> KSVD:
        """Learn the dictionary from ``X`` of shape (n_samples, n_features); returns ``self``."""
        Xt, X_in = self._validate_input(X, reset=True)
        n, p = Xt.shape
        K, k = self._check_params(n, p)
        D = self._init_dictionary(Xt, K)

        bar = None
        if self.verbose:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.max_iter, desc="K-SVD", unit="it")
        errors: list[float] = []
        codes: SparseCodes | None = None
        R: Tensor | None = None
        for _ in range(self.max_iter):
            # (a) sparse coding; keep a sample's previous code where OMP does worse
            new = self._encode(Xt, D, k, self.tol)
            R_new = Xt - new.decode(D)
            if codes is not None:
                worse = (R_new * R_new).sum(1) > (R * R).sum(1)
                new = SparseCodes(
                    torch.where(worse[:, None], codes.values, new.values),
                    torch.where(worse[:, None], codes.indices, new.indices),
                    K,
                )
                R_new = torch.where(worse[:, None], R, R_new)
            codes, R = new, R_new
            # (b) dictionary update, atom by atom
            self._update_dictionary(R, D, codes)
            R = Xt - codes.decode(D)  # exact residual (no drift from the in-place updates)
            replaced = self._replace_unused(Xt, R, D, codes)
            err = float((R * R).sum()) / n
            errors.append(err)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(error=f"{err:.4g}", replaced=replaced)
            if len(errors) > 1 and not replaced and errors[-2] - err <= _REL_TOL * errors[-2]:
                break
        if bar is not None:
            bar.close()

        self.components_ = to_output(D, X_in)
        self.error_ = errors
        self.n_iter_ = len(errors)
        return self

    def fit_transform(self, X: Any, y: Any = None) -> Any:
        """``fit(X).transform(X)`` (codes from ``transform_algorithm``)."""
        return self.fit(X).transform(X)
