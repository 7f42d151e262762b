"""Reliability of the classical estimators on edge inputs: finite results or a clear
``ValueError``, never NaN or torch internals (hypothesis fuzz with bounded examples)."""

import os

import numpy as np
import pytest
import torch

from sparsecode import DictionaryLearning, MiniBatchDictionaryLearning, SparseCoder, sparse_encode

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@pytest.mark.parametrize("cls", [DictionaryLearning, MiniBatchDictionaryLearning])
def test_one_feature_data_gives_finite_dictionaries(cls):
    X = np.random.default_rng(0).standard_normal((50, 1))
    est = cls(n_components=3, random_state=0).fit(X)
    assert np.isfinite(est.components_).all()
    assert np.isfinite(est.transform(X)).all()


@pytest.mark.parametrize("call", [
    lambda: SparseCoder(np.eye(4)).transform(torch.ones(2, 4, device="meta")),
    lambda: sparse_encode(np.ones((2, 4)), np.eye(4), device="meta"),
    lambda: MiniBatchDictionaryLearning(n_components=2).fit(torch.ones(5, 4, device="meta")),
])
def test_meta_tensors_are_a_clear_error(call):
    with pytest.raises(ValueError, match="meta"):
        call()


def test_a_1d_dictionary_is_a_clear_error():
    with pytest.raises(ValueError, match="2-D"):
        SparseCoder(np.ones(4)).transform(np.ones((2, 4)))


ALGORITHMS = ["omp", "lasso_lars", "lasso_cd", "lars", "threshold"]


@settings(max_examples=int(os.environ.get("SAE_FUZZ_EXAMPLES", "30")), deadline=None,
          derandomize=not os.environ.get("SAE_FUZZ_RANDOM"), database=None)
@given(n=st.integers(1, 12), d=st.integers(1, 6), k=st.integers(1, 5),
       scale=st.sampled_from([1e-30, 1e-6, 1.0, 1e6, 1e30]),
       algorithm=st.sampled_from(ALGORITHMS), dtype=st.sampled_from([np.float32, np.float64]),
       seed=st.integers(0, 3))
def test_fuzzed_estimators_give_finite_results_or_clear_errors(n, d, k, scale, algorithm,
                                                               dtype, seed):
    rng = np.random.default_rng(seed)
    X = (rng.standard_normal((n, d)) * scale).astype(dtype)
    D = rng.standard_normal((k, d)).astype(dtype)
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    kw = {"n_nonzero_coefs": min(k, d)} if algorithm in ("omp", "lars") else {"alpha": 0.1}
    try:
        Z = sparse_encode(X, D, algorithm=algorithm, **kw)
    except ValueError as e:
        assert "dictionary" not in str(e).lower() or "X" in str(e), e
    else:
        assert Z.shape == (n, k) and np.isfinite(Z).all()
    for cls in (DictionaryLearning, MiniBatchDictionaryLearning):
        try:
            est = cls(n_components=k, random_state=seed, max_iter=3).fit(X)
        except ValueError:
            continue
        assert np.isfinite(est.components_).all(), (cls.__name__, n, d, k, scale)
