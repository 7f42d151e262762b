"""``SparseCoder``: sparse coding against a fixed dictionary as a scikit-learn transformer."""

from __future__ import annotations

from numbers import Integral
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.utils.validation import validate_data

from ._base import NONNEGATIVE, TRANSFORM_CONSTRAINTS, DictionaryTransformerMixin


class SparseCoder(DictionaryTransformerMixin, BaseEstimator):
    """Sparse coding against a fixed dictionary (drop-in for scikit-learn's ``SparseCoder``).

    Each row of ``X`` is encoded as a sparse combination of the rows (atoms) of ``dictionary`` by
    :func:`~sparsecode.sparse_encode`; see it for the algorithms. ``transform_alpha`` for
    ``'omp'`` is the squared residual tolerance (honoured here; scikit-learn ignores it).
    ``split_sign`` returns ``[max(z, 0), max(-z, 0)]`` side by side, as in scikit-learn.
    ``transform`` / ``inverse_transform`` are the dictionary estimators' own
    (:class:`~sparsecode._base.DictionaryTransformerMixin`); no fit is needed.

    >>> import numpy as np
    >>> from sparsecode import SparseCoder
    >>> coder = SparseCoder(np.eye(3), transform_algorithm="threshold", transform_alpha=1.0)
    >>> coder.transform(np.array([[3.0, 0.5, -2.0]]))
    array([[ 2.,  0., -1.]])
    """

    _parameter_constraints: dict = {
        "dictionary": ["array-like"],
        **TRANSFORM_CONSTRAINTS,
        "n_jobs": [Integral, None],
        "transform_tol": [NONNEGATIVE],
        "transform_penalty_params": [dict, None],
    }

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
        """Only validates the parameters and ``X`` (the dictionary is fixed); returns ``self``."""
        self._validate_params()
        if not isinstance(X, torch.Tensor):
            validate_data(self, X, reset=True)
        else:
            self.n_features_in_ = X.shape[1]
        self._check_dictionary()
        return self

    def _atoms(self) -> Any:
        self._validate_params()  # stateless: the parameters may change between transforms
        return self.dictionary

    def _check_dictionary(self) -> None:
        n_feat = np.shape(self.dictionary)[1]
        if getattr(self, "n_features_in_", n_feat) != n_feat:
            raise ValueError(
                f"X has {self.n_features_in_} features but the dictionary's atoms have {n_feat}"
            )

    @property
    def n_components_(self) -> int:
        return np.shape(self.dictionary)[0]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.requires_fit = False
        return tags
