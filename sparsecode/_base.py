"""Shared scikit-learn plumbing of the dictionary estimators.

:class:`DictionaryTransformerMixin` gives an estimator with a dictionary (atoms as rows:
``components_``, or ``dictionary`` for :class:`~sparsecode.SparseCoder`) the ``transform`` /
``inverse_transform`` / feature names of scikit-learn's dictionary estimators, coding with
:func:`sparsecode.sparse_encode` and the ``transform_*`` parameters. Hyperparameters are
validated by scikit-learn's ``_parameter_constraints`` mechanism; :data:`TRANSFORM_CONSTRAINTS`
holds the ones of the ``transform_*`` parameters every estimator shares.
"""

from __future__ import annotations

from numbers import Integral, Real
from typing import Any

import numpy as np
import torch
from sklearn.base import ClassNamePrefixFeaturesOutMixin, TransformerMixin
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted, validate_data

from ._arrays import resolve_device, to_output, to_tensor
from .decomposition import ALGORITHMS, sparse_encode

POSITIVE_INT = Interval(Integral, 1, None, closed="left")
NONNEGATIVE_INT = Interval(Integral, 0, None, closed="left")
NONNEGATIVE = Interval(Real, 0, None, closed="left")
POSITIVE = Interval(Real, 0, None, closed="neither")
DEVICE = [str, torch.device, None]

#: Constraints of the coding parameters shared by every dictionary estimator.
TRANSFORM_CONSTRAINTS: dict[str, list] = {
    "transform_algorithm": [StrOptions(set(ALGORITHMS))],
    "transform_n_nonzero_coefs": [POSITIVE_INT, None],
    "transform_alpha": [NONNEGATIVE, None],
    "transform_max_iter": [NONNEGATIVE_INT],
    "positive_code": ["boolean"],
    "split_sign": ["boolean"],
    "device": DEVICE,
}


class DictionaryTransformerMixin(ClassNamePrefixFeaturesOutMixin, TransformerMixin):
    """``transform`` by sparse coding against the dictionary; ``inverse_transform`` decodes.

    Expects the attributes ``transform_algorithm``, ``transform_n_nonzero_coefs``,
    ``transform_alpha``, ``transform_max_iter``, ``positive_code``, ``split_sign`` (optional),
    ``transform_tol`` and ``transform_penalty_params`` (optional), ``device`` and, as fallback
    for ``transform_alpha``, ``alpha`` (as scikit-learn). The dictionary is ``components_`` (a
    numpy array after fitting numpy input, a tensor after torch input) unless
    :meth:`_atoms` says otherwise.
    """

    def _atoms(self) -> Any:
        """The dictionary to code against (after checking the estimator is fitted)."""
        check_is_fitted(self, "components_")
        return self.components_

    def _validate_input(self, X: Any, *, reset: bool) -> tuple[torch.Tensor, Any]:
        """(float tensor on the compute device, original input) with feature-count checks."""
        if not isinstance(X, torch.Tensor):
            X = validate_data(self, X, reset=reset, dtype=[np.float64, np.float32])
        elif reset:
            self.n_features_in_ = X.shape[1] if X.dim() == 2 else None
        dev = resolve_device(getattr(self, "device", "auto"), X)
        Xt = to_tensor(X, "X", device=dev)
        expected = getattr(self, "n_features_in_", None)
        if not reset and expected is not None and Xt.shape[1] != expected:
            raise ValueError(
                f"X has {Xt.shape[1]} features, but {type(self).__name__} is expecting "
                f"{self.n_features_in_} features as input"
            )
        return Xt, X

    def transform(self, X: Any) -> Any:
        """Sparse codes of ``X`` against the dictionary (``transform_algorithm``): numpy for
        numpy input, a tensor on the input's device for torch input."""
        atoms = self._atoms()
        Xt, X = self._validate_input(X, reset=False)
        alpha = self.transform_alpha
        if alpha is None and self.transform_algorithm not in ("omp", "ormp"):
            alpha = getattr(self, "alpha", None)
        code = sparse_encode(
            Xt,
            atoms,
            algorithm=self.transform_algorithm,
            n_nonzero_coefs=self.transform_n_nonzero_coefs,
            alpha=alpha,
            max_iter=self.transform_max_iter,
            positive=self.positive_code,
            tol=getattr(self, "transform_tol", 1e-6),
            penalty_params=getattr(self, "transform_penalty_params", None),
            device=Xt.device,
        )
        if getattr(self, "split_sign", False):
            code = torch.cat([code.clamp(min=0), (-code).clamp(min=0)], dim=1)
        return to_output(code, X)

    def inverse_transform(self, X: Any) -> Any:
        """Signals from codes: ``codes @ dictionary`` (undoing ``split_sign``)."""
        atoms = self._atoms()
        dev = resolve_device(getattr(self, "device", "auto"), X)
        D = to_tensor(atoms, "dictionary", device=dev)
        Z = to_tensor(X, "codes", device=dev, dtype=D.dtype)
        k = D.shape[0]
        split = getattr(self, "split_sign", False)
        width = 2 * k if split else k
        if Z.shape[1] != width:
            raise ValueError(
                f"codes must have {width} columns ({k} atoms{', split_sign' if split else ''}), "
                f"got shape {tuple(Z.shape)}"
            )
        if width != k:
            Z = Z[:, :k] - Z[:, k:]
        return to_output(Z @ D, X)

    @property
    def _n_features_out(self) -> int:
        return np.shape(self._atoms())[0] * (2 if getattr(self, "split_sign", False) else 1)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags
