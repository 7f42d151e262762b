"""Shared scikit-learn plumbing for the estimators that learn a dictionary.

:class:`DictionaryTransformerMixin` gives an estimator with ``components_`` (atoms as rows) the
``transform`` / ``inverse_transform`` / feature names of scikit-learn's dictionary estimators,
coding with :func:`sparsecode.sparse_encode` and the ``transform_*`` parameters.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.base import ClassNamePrefixFeaturesOutMixin, TransformerMixin
from sklearn.utils.validation import check_is_fitted, validate_data

from ._arrays import resolve_device, to_output, to_tensor
from .decomposition import sparse_encode


class DictionaryTransformerMixin(ClassNamePrefixFeaturesOutMixin, TransformerMixin):
    """``transform`` by sparse coding against ``components_``; ``inverse_transform`` decodes.

    Expects the attributes ``transform_algorithm``, ``transform_n_nonzero_coefs``,
    ``transform_alpha``, ``transform_max_iter``, ``positive_code``, ``split_sign`` (optional),
    ``device`` and, as fallback for ``transform_alpha``, ``alpha`` (as scikit-learn).
    ``components_`` is a numpy array after fitting numpy input and a tensor after torch input.
    """

    def _validate_input(self, X: Any, *, reset: bool) -> tuple[torch.Tensor, Any]:
        """(float tensor on the compute device, original input) with feature-count checks."""
        if not isinstance(X, torch.Tensor):
            X = validate_data(self, X, reset=reset, dtype=[np.float64, np.float32])
        elif reset:
            self.n_features_in_ = X.shape[1] if X.dim() == 2 else None
        dev = resolve_device(getattr(self, "device", "auto"), X)
        Xt = to_tensor(X, "X", device=dev)
        if not reset and Xt.shape[1] != self.n_features_in_:
            raise ValueError(
                f"X has {Xt.shape[1]} features, but {type(self).__name__} is expecting "
                f"{self.n_features_in_} features as input"
            )
        return Xt, X

    def transform(self, X: Any) -> Any:
        """Sparse codes of ``X`` against ``components_`` (``transform_algorithm``)."""
        check_is_fitted(self, "components_")
        Xt, X = self._validate_input(X, reset=False)
        alpha = self.transform_alpha
        if alpha is None and self.transform_algorithm not in ("omp", "ormp"):
            alpha = getattr(self, "alpha", None)
        code = sparse_encode(
            Xt,
            self.components_,
            algorithm=self.transform_algorithm,
            n_nonzero_coefs=self.transform_n_nonzero_coefs,
            alpha=alpha,
            max_iter=self.transform_max_iter,
            positive=self.positive_code,
            device=Xt.device,
        )
        if getattr(self, "split_sign", False):
            code = torch.cat([code.clamp(min=0), (-code).clamp(min=0)], dim=1)
        return to_output(code, X)

    def inverse_transform(self, X: Any) -> Any:
        """Signals from codes: ``codes @ components_`` (undoing ``split_sign``)."""
        check_is_fitted(self, "components_")
        dev = resolve_device(getattr(self, "device", "auto"), X)
        D = to_tensor(self.components_, "components_", device=dev)
        Z = to_tensor(X, "codes", device=dev, dtype=D.dtype)
        k = D.shape[0]
        width = 2 * k if getattr(self, "split_sign", False) else k
        if Z.shape[1] != width:
            raise ValueError(f"codes must have {width} columns, got shape {tuple(Z.shape)}")
        if width != k:
            Z = Z[:, :k] - Z[:, k:]
        return to_output(Z @ D, X)

    @property
    def _n_features_out(self) -> int:
        return self.components_.shape[0] * (2 if getattr(self, "split_sign", False) else 1)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags
