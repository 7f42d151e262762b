"""Tests for sparsecode.decomposition: parity of ``sparse_encode`` / ``SparseCoder`` with
scikit-learn on random and real data, optimality of the new algorithms, the scikit-learn estimator
contract, numpy/torch input handling, input validation and property tests."""

from __future__ import annotations

import inspect
import warnings

import numpy as np
import pytest
import torch
from conftest import unit_rows
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.base import clone
from sklearn.datasets import load_digits
from sklearn.decomposition import SparseCoder as SkSparseCoder
from sklearn.decomposition import sparse_encode as sk_sparse_encode
from sklearn.linear_model import LogisticRegression, orthogonal_mp_gram
from sklearn.model_selection import GridSearchCV, train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.utils._test_common.instance_generator import PER_ESTIMATOR_CHECK_PARAMS
from sklearn.utils.estimator_checks import (
    check_transformer_data_not_an_array,
    check_transformer_general,
    check_transformers_unfitted,
    estimator_checks_generator,
)

from sparsecode import ALGORITHMS, SparseCoder, sparse_encode
from sparsecode.core.operators import make_operator
from sparsecode.datasets import image_patches, overcomplete_dct

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
NONCONVEX = [("l0", {}), ("lq", {"q": 0.5}), ("mcp", {}), ("scad", {}), ("cel0", {})]


# --------------------------------------------------------------------------------------------
# data and helpers
# --------------------------------------------------------------------------------------------


def _random_problem():
    rng = np.random.default_rng(0)
    D = unit_rows(rng.standard_normal((60, 20)))
    X = rng.standard_normal((50, 20))
    return X, D


_CACHE: dict[str, tuple[np.ndarray, np.ndarray]] = {}


def _problem(name):
    if name not in _CACHE:
        if name == "random":
            _CACHE[name] = _random_problem()
        else:
            _CACHE[name] = (image_patches(n_patches=300), overcomplete_dct(8, 256))
    X, D = _CACHE[name]
    return X.copy(), D.copy()


DATASETS = ["random", "dct"]


def sk_encode(X, D, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sk_sparse_encode(X, D, **kw)


def lasso_obj(X, D, Z, alpha):
    """Per-row ``0.5 ||x - z D||^2 + alpha ||z||_1``."""
    R = X - Z @ D
    return 0.5 * (R * R).sum(1) + alpha * np.abs(Z).sum(1)


def sq_resid(X, D, Z):
    R = X - Z @ D
    return (R * R).sum(1)


def nnz(Z):
    return (np.asarray(Z) != 0).sum(1)


def ref_lar(x, D, k):
    """Textbook least-angle regression (Efron et al. 2004) for one signal, design ``D.T``.

    Stops when a ``(k+1)``-th atom would enter, or at the least-squares end of the path.
    """
    A = D.T
    n_feat, K = A.shape
    beta = np.zeros(K)
    active = [int(np.argmax(np.abs(A.T @ x)))]
    while True:
        c = A.T @ (x - A @ beta)
        C = np.abs(c[active]).max()
        w = np.linalg.solve(A[:, active].T @ A[:, active], np.sign(c[active]))
        a = A.T @ (A[:, active] @ w)
        best, j_new = C, None  # gamma = C reaches the least-squares fit on the active set
        if len(active) < min(n_feat, K):
            for j in set(range(K)) - set(active):
                for g in ((C - c[j]) / (1 - a[j]), (C + c[j]) / (1 + a[j])):
                    if 1e-12 < g < best:
                        best, j_new = g, j
        beta[active] += best * w
        if j_new is None or len(active) >= k:
            return beta
        active.append(j_new)


# --------------------------------------------------------------------------------------------
# 1. parity with scikit-learn
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("data", DATASETS)
@pytest.mark.parametrize("k", [1, 3, 8])
def test_omp_matches_sklearn(data, k):
    X, D = _problem(data)
    Z = sparse_encode(X, D, algorithm="omp", n_nonzero_coefs=k)
    ref = sk_encode(X, D, algorithm="omp", n_nonzero_coefs=k)
    assert Z.dtype == np.float64 and Z.shape == ref.shape
    np.testing.assert_array_equal(Z != 0, ref != 0)
    np.testing.assert_allclose(Z, ref, rtol=0, atol=1e-10)
    assert (nnz(Z) == k).all()


@pytest.mark.parametrize("data", DATASETS)
@pytest.mark.parametrize("tol", [0.5, 0.05, 1e-3])
def test_omp_residual_tolerance_matches_orthogonal_mp_gram(data, tol):
    X, D = _problem(data)
    Z = sparse_encode(X, D, algorithm="omp", alpha=tol, n_nonzero_coefs=1)  # alpha overrides k
    sq_norms = (X * X).sum(1)
    G = D @ D.T
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = orthogonal_mp_gram(G, D @ X.T, tol=tol, norms_squared=sq_norms).T
    # Documented difference (core.solvers.omp): scikit-learn selects one atom even when
    # ||x||^2 <= tol already; we return the zero code there.
    done = sq_norms <= tol
    np.testing.assert_allclose(Z[~done], ref[~done], rtol=0, atol=1e-10)
    assert not Z[done].any()
    # the tolerance is met, unless the row used every atom it could
    r = sq_resid(X, D, Z)
    full = nnz(Z) == min(D.shape)
    assert ((r <= tol * (1 + 1e-9)) | full).all()
    assert (nnz(Z) > 1).any()  # n_nonzero_coefs=1 was overridden


@pytest.mark.parametrize("data", DATASETS)
@pytest.mark.parametrize("algorithm", ["lasso_lars", "lasso_cd"])
@pytest.mark.parametrize("alpha", [0.05, 0.5])
@pytest.mark.parametrize("positive", [False, True])
def test_lasso_matches_sklearn_objective(data, algorithm, alpha, positive):
    X, D = _problem(data)
    Z = sparse_encode(X, D, algorithm=algorithm, alpha=alpha, positive=positive)
    ref = sk_encode(X, D, algorithm="lasso_lars", alpha=alpha, positive=positive)
    ours, theirs = lasso_obj(X, D, Z, alpha).mean(), lasso_obj(X, D, ref, alpha).mean()
    assert abs(ours - theirs) <= 1e-6 * theirs
    if positive:
        assert (Z >= 0).all()
    else:
        assert (Z < 0).any()
    # independent check: the KKT conditions of the Lasso hold for every row
    corr = (X - Z @ D) @ D.T
    on = Z != 0
    np.testing.assert_allclose(corr[on], alpha * np.sign(Z[on]), rtol=0, atol=1e-8)
    off = corr[~on] if positive else np.abs(corr[~on])
    assert (off <= alpha + 1e-8).all()


def test_lars_matches_sklearn_on_random_dictionary():
    X, D = _problem("random")
    Z = sparse_encode(X, D, algorithm="lars", n_nonzero_coefs=5)
    ref = sk_encode(X, D, algorithm="lars", n_nonzero_coefs=5)
    np.testing.assert_allclose(Z, ref, rtol=0, atol=1e-8)
    assert (nnz(Z) == 5).all()


def test_lars_on_dct_at_least_as_good_as_sklearn():
    # degenerate ties on the DCT dictionary make scikit-learn stop early on some rows
    X, D = _problem("dct")
    Z = sparse_encode(X, D, algorithm="lars", n_nonzero_coefs=5)
    ref = sk_encode(X, D, algorithm="lars", n_nonzero_coefs=5)
    assert (nnz(Z) <= 5).all()
    assert (sq_resid(X, D, Z) <= sq_resid(X, D, ref) + 1e-9).all()


@pytest.mark.parametrize("seed, k", [(1, 6), (9, 7), (16, 7)])
def test_lars_matches_textbook_lar(seed, k):
    # small overcomplete problems where scikit-learn's Lars stops one atom early on some rows
    rng = np.random.default_rng(seed)
    n, f, K = rng.integers(1, 21), rng.integers(2, 13), rng.integers(2, 31)
    D = unit_rows(rng.standard_normal((K, f)))
    X = rng.standard_normal((n, f))
    Z = sparse_encode(X, D, algorithm="lars", n_nonzero_coefs=k)
    ref = np.array([ref_lar(x, D, k) for x in X])
    np.testing.assert_allclose(Z, ref, rtol=0, atol=1e-9)


@pytest.mark.parametrize("data", DATASETS)
@pytest.mark.parametrize("alpha", [None, 0.1, 1.0])
@pytest.mark.parametrize("positive", [False, True])
def test_threshold_matches_sklearn(data, alpha, positive):
    X, D = _problem(data)
    Z = sparse_encode(X, D, algorithm="threshold", alpha=alpha, positive=positive)
    ref = sk_encode(X, D, algorithm="threshold", alpha=alpha, positive=positive)
    np.testing.assert_allclose(Z, ref, rtol=0, atol=1e-12)
    assert Z.any()


@pytest.mark.parametrize("data, algorithm", [("random", "omp"), ("dct", "omp"), ("random", "lars")])
def test_default_n_nonzero_coefs_matches_sklearn(data, algorithm):
    X, D = _problem(data)
    Z = sparse_encode(X, D, algorithm=algorithm)
    ref = sk_encode(X, D, algorithm=algorithm)
    expected = int(min(max(D.shape[1] / 10, 1), D.shape[0]))
    np.testing.assert_array_equal(nnz(Z), nnz(ref))
    assert (nnz(Z) == expected).all()
    for alg in ("topk", "iht"):
        assert (nnz(sparse_encode(X, D, algorithm=alg)) == expected).all()


def test_default_algorithm_is_lasso_lars_with_alpha_one():
    X, D = _problem("random")
    Z = sparse_encode(X, D)
    ref = sk_encode(X, D)
    np.testing.assert_allclose(Z, ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    "algorithm, kw",
    [
        ("omp", {"n_nonzero_coefs": 5}),
        ("omp", {"alpha": 0.1}),
        ("lasso_lars", {"alpha": 0.1}),
        ("lars", {"n_nonzero_coefs": 5}),
        ("threshold", {"alpha": 0.1}),
        ("fista", {"alpha": 0.1}),
        ("iht", {"n_nonzero_coefs": 5}),
        ("topk", {"n_nonzero_coefs": 5}),
        ("mcp", {"alpha": 0.1}),
    ],
)
def test_precomputed_gram_cov_and_chunking_give_same_codes(algorithm, kw):
    X, D = _problem("random")
    Z = sparse_encode(X, D, algorithm=algorithm, **kw)
    with_gram = sparse_encode(X, D, algorithm=algorithm, gram=D @ D.T, cov=D @ X.T, **kw)
    chunked = sparse_encode(X, D, algorithm=algorithm, chunk_size=7, **kw)
    np.testing.assert_allclose(with_gram, Z, rtol=0, atol=1e-10)
    np.testing.assert_allclose(chunked, Z, rtol=0, atol=1e-10)


def test_sparse_coder_matches_sklearn_sparse_coder():
    X, D = _problem("random")
    for kw in (
        {"transform_algorithm": "omp", "transform_n_nonzero_coefs": 4, "split_sign": True},
        {"transform_algorithm": "lasso_lars", "transform_alpha": 0.2},
        {"transform_algorithm": "threshold", "transform_alpha": 0.3, "positive_code": True},
    ):
        ours = SparseCoder(D, **kw).fit_transform(X)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = SkSparseCoder(D, **kw).fit_transform(X)
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-10)


# --------------------------------------------------------------------------------------------
# 2. algorithms beyond scikit-learn
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["fista", "ista"])
@pytest.mark.parametrize("alpha", [0.1, 0.5])
def test_proximal_gradient_reaches_lasso_objective(algorithm, alpha):
    # (ISTA's O(1/t) rate needs ~50k iterations for 1e-5 at alpha=0.05 on this problem)
    X, D = _problem("random")
    Z = sparse_encode(X, D, algorithm=algorithm, alpha=alpha, tol=1e-10, max_iter=20000)
    ref = sk_encode(X, D, algorithm="lasso_lars", alpha=alpha)
    ours, theirs = lasso_obj(X, D, Z, alpha).mean(), lasso_obj(X, D, ref, alpha).mean()
    assert theirs * (1 - 1e-9) <= ours <= theirs * (1 + 1e-5)


@pytest.mark.parametrize("positive", [False, True])
def test_fista_positive_reaches_lasso_objective(positive):
    X, D = _problem("random")
    Z = sparse_encode(
        X, D, algorithm="fista", alpha=0.2, tol=1e-10, max_iter=20000, positive=positive
    )
    ref = sk_encode(X, D, algorithm="lasso_lars", alpha=0.2, positive=positive)
    ours, theirs = lasso_obj(X, D, Z, 0.2).mean(), lasso_obj(X, D, ref, 0.2).mean()
    assert abs(ours - theirs) <= 1e-5 * theirs
    if positive:
        assert (Z >= 0).all()


@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("positive", [False, True])
def test_topk_keeps_k_largest_correlations(k, positive):
    X, D = _problem("random")
    Z = sparse_encode(X, D, algorithm="topk", n_nonzero_coefs=k, positive=positive)
    C = X @ D.T
    expected = np.zeros_like(C)
    for i, c in enumerate(C):
        order = np.argsort(-(c if positive else np.abs(c)), kind="stable")[:k]
        expected[i, order] = np.maximum(c[order], 0) if positive else c[order]
    np.testing.assert_allclose(Z, expected, rtol=0, atol=1e-12)
    assert (nnz(Z) <= k).all()
    if not positive:
        assert (nnz(Z) == k).all()


@pytest.mark.parametrize("k", [1, 3, 8])
def test_iht_beats_plain_topk(k):
    X, D = _problem("random")
    Z = sparse_encode(X, D, algorithm="iht", n_nonzero_coefs=k)
    Zt = sparse_encode(X, D, algorithm="topk", n_nonzero_coefs=k)
    assert (nnz(Z) <= k).all()
    r, rt = sq_resid(X, D, Z), sq_resid(X, D, Zt)
    assert (r <= rt + 1e-8 * (1 + rt)).all()
    if k > 1:
        assert r.mean() < rt.mean()


def test_iht_warm_start_from_init():
    X, D = _problem("random")
    Z0 = sparse_encode(X, D, algorithm="omp", n_nonzero_coefs=4)
    Z = sparse_encode(X, D, algorithm="iht", n_nonzero_coefs=4, init=Z0, max_iter=50)
    # IHT is monotone: starting from the OMP codes, it cannot end worse
    assert (sq_resid(X, D, Z) <= sq_resid(X, D, Z0) + 1e-9).all()


@pytest.mark.parametrize("name, params", NONCONVEX)
@pytest.mark.parametrize("alpha", [0.05, 0.5])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_nonconvex_penalties_beat_zero(name, params, alpha, dtype):
    X, D = _problem("random")
    X, D = X.astype(dtype), D.astype(dtype)
    Z = sparse_encode(X, D, algorithm=name, alpha=alpha, penalty_params=params)
    assert Z.shape == (X.shape[0], D.shape[0]) and Z.dtype == dtype
    assert np.isfinite(Z).all()
    op = make_operator(name, alpha=alpha, **params)
    Z64, X64, D64 = (a.astype(np.float64) for a in (Z, X, D))
    F = 0.5 * sq_resid(X64, D64, Z64) + op.value(torch.from_numpy(Z64)).numpy()
    F0 = 0.5 * (X64 * X64).sum(1)
    assert (F <= F0 * (1 + 1e-5)).all()
    assert F.mean() < F0.mean()


# --------------------------------------------------------------------------------------------
# 3. SparseCoder as a scikit-learn estimator
# --------------------------------------------------------------------------------------------

# scikit-learn runs its common checks on SparseCoder with per-check dictionaries (the dictionary
# fixes n_features); we run the same checks with the same per-check parameters.
_SK_CHECK_PARAMS = PER_ESTIMATOR_CHECK_PARAMS[SkSparseCoder]
_ESTIMATOR_CHECKS = list(
    estimator_checks_generator(
        SparseCoder(dictionary=np.random.RandomState(0).normal(size=(5, 3))), legacy=True
    )
)


def _check_name(check):
    return getattr(check, "__name__", None) or check.func.__name__


@pytest.mark.parametrize(
    "estimator, check",
    _ESTIMATOR_CHECKS,
    ids=[f"{_check_name(c)}-{i}" for i, (_, c) in enumerate(_ESTIMATOR_CHECKS)],
)
def test_sklearn_estimator_checks(estimator, check):
    params = _SK_CHECK_PARAMS.get(_check_name(check))
    if params is not None:
        estimator = clone(estimator).set_params(**params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        check(estimator)


@pytest.mark.parametrize("readonly_memmap", [False, True])
def test_sparse_coder_common_transformer(readonly_memmap):
    # as scikit-learn's test_sparse_coder_common_transformer
    init_dict = np.random.RandomState(777).rand(40, 3)
    sc = SparseCoder(init_dict)
    check_transformer_data_not_an_array(sc.__class__.__name__, sc)
    check_transformer_general(sc.__class__.__name__, sc, readonly_memmap=readonly_memmap)
    check_transformers_unfitted(sc.__class__.__name__, sc)


def test_sparse_coder_n_features_in_and_mismatch():
    d = np.array([[1, 2, 3], [1, 2, 3]])
    sc = SparseCoder(d).fit(np.array([[1, 2, 3]]))
    assert sc.n_features_in_ == 3 and sc.n_components_ == 2
    with pytest.raises(ValueError, match=r"4 features.*3"):
        SparseCoder(d).fit(np.ones((2, 4)))
    with pytest.raises(ValueError, match="features"):
        sc.transform(np.ones((2, 4)))


def test_get_params_lists_every_init_parameter_and_sklearn_ones():
    D = unit_rows(np.random.default_rng(0).standard_normal((6, 4)))
    coder = SparseCoder(D)
    init_params = set(inspect.signature(SparseCoder.__init__).parameters) - {"self"}
    assert set(coder.get_params()) == init_params
    sk_params = SkSparseCoder(D).get_params()
    ours = coder.get_params()
    for name, value in sk_params.items():  # drop-in: same names and defaults
        assert name in ours
        if name != "dictionary":
            assert ours[name] == value, name


def test_clone_keeps_params():
    X, D = _problem("random")
    coder = SparseCoder(
        D,
        transform_algorithm="mcp",
        transform_alpha=0.3,
        split_sign=True,
        positive_code=False,
        transform_max_iter=77,
        transform_tol=1e-5,
        transform_penalty_params={"gamma": 4.0},
        device="cpu",
    )
    cloned = clone(coder)
    assert cloned is not coder
    p, q = coder.get_params(), cloned.get_params()
    assert p.keys() == q.keys()
    for key in p:
        if key == "dictionary":
            np.testing.assert_array_equal(p[key], q[key])
            assert q[key] is not p[key]
        else:
            assert p[key] == q[key], key
    np.testing.assert_array_equal(cloned.transform(X[:5]), coder.transform(X[:5]))


@pytest.mark.parametrize("split_sign", [False, True])
@pytest.mark.parametrize("as_torch", [False, True])
def test_inverse_transform_reconstructs(split_sign, as_torch):
    X, D = _problem("random")
    coder = SparseCoder(D, transform_algorithm="omp", transform_alpha=1e-12, split_sign=split_sign)
    Xin = torch.from_numpy(X) if as_torch else X
    code = coder.fit_transform(Xin)
    assert code.shape == (X.shape[0], D.shape[0] * (2 if split_sign else 1))
    Xr = coder.inverse_transform(code)
    assert isinstance(Xr, torch.Tensor) == as_torch
    np.testing.assert_allclose(np.asarray(Xr), X, rtol=0, atol=1e-5)
    if split_sign:
        c = np.asarray(code)
        assert (c >= 0).all()
        k = D.shape[0]
        assert not (c[:, :k] * c[:, k:]).any()  # one of the two halves is zero
    # sparse codes: inverse_transform is exactly codes @ dictionary (scikit-learn's result)
    coder.set_params(transform_alpha=None, transform_n_nonzero_coefs=3)
    code = np.asarray(coder.transform(Xin))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sk = SkSparseCoder(D, split_sign=split_sign).fit(X)
    np.testing.assert_allclose(
        np.asarray(coder.inverse_transform(code)), sk.inverse_transform(code), rtol=0, atol=1e-12
    )


@pytest.mark.parametrize("as_torch", [False, True])
def test_inverse_transform_wrong_width_split_sign(as_torch):
    D = unit_rows(np.random.default_rng(0).standard_normal((12, 6)))
    coder = SparseCoder(D, split_sign=True).fit(np.ones((2, 6)))
    code = np.ones((5, 25))
    code = torch.from_numpy(code) if as_torch else code
    with pytest.raises(ValueError, match=r"24"):  # 2 * 12 columns expected
        coder.inverse_transform(code)


def test_get_feature_names_out_like_sklearn():
    X, D = _problem("random")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = SkSparseCoder(D).fit(X).get_feature_names_out()
    np.testing.assert_array_equal(SparseCoder(D).fit(X).get_feature_names_out(), expected)


def _digits():
    X, y = load_digits(return_X_y=True)
    X = X / 16.0
    return train_test_split(X, y, test_size=0.3, random_state=0, stratify=y)


def test_pipeline_with_logistic_regression_on_digits():
    Xtr, Xte, ytr, yte = _digits()
    D = unit_rows(Xtr[:100])
    pipe = make_pipeline(
        SparseCoder(D, transform_algorithm="omp", transform_n_nonzero_coefs=8, split_sign=True),
        LogisticRegression(max_iter=1000),
    )
    pipe.fit(Xtr, ytr)
    assert pipe.score(Xte, yte) > 0.8
    codes = pipe[0].transform(Xte)
    assert codes.shape == (len(Xte), 200)
    assert (nnz(codes) <= 8).all()


def test_grid_search_over_n_nonzero_coefs():
    Xtr, _, ytr, _ = _digits()
    Xtr, ytr = Xtr[:450], ytr[:450]
    D = unit_rows(Xtr[:100])
    grid = GridSearchCV(
        make_pipeline(SparseCoder(D, split_sign=True), LogisticRegression(max_iter=500)),
        {"sparsecoder__transform_n_nonzero_coefs": [1, 3, 6]},
        cv=3,
    )
    grid.fit(Xtr, ytr)
    scores = grid.cv_results_["mean_test_score"]
    assert np.isfinite(scores).all() and len(set(scores)) == 3  # the parameter reached the coder
    best_k = grid.best_params_["sparsecoder__transform_n_nonzero_coefs"]
    assert grid.best_estimator_[0].transform_n_nonzero_coefs == best_k
    assert (nnz(grid.best_estimator_[0].transform(Xtr)) == best_k).all()


# --------------------------------------------------------------------------------------------
# 4. numpy / torch in and out
# --------------------------------------------------------------------------------------------


def _kw(algorithm):
    if algorithm in ("omp", "lars", "iht", "topk"):
        return {"n_nonzero_coefs": 3}
    kw = {"alpha": 0.2}
    if algorithm == "lq":
        kw["penalty_params"] = {"q": 0.5}
    return kw


def _small():
    rng = np.random.default_rng(3)
    D = unit_rows(rng.standard_normal((16, 6)))
    X = rng.standard_normal((7, 6))
    return X, D


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize(
    "in_dtype, out_dtype",
    [(np.float32, np.float32), (np.float64, np.float64), (np.int64, np.float64)],
)
def test_numpy_in_numpy_out(algorithm, in_dtype, out_dtype):
    X, D = _small()
    Xc = (10 * X).astype(in_dtype) if in_dtype == np.int64 else X.astype(in_dtype)
    Z = sparse_encode(Xc, D, algorithm=algorithm, **_kw(algorithm))
    assert isinstance(Z, np.ndarray)
    assert Z.dtype == out_dtype and Z.shape == (7, 16)
    assert np.isfinite(Z).all() and Z.any()
    if in_dtype == np.float32:  # float32 codes agree with float64 ones (convex problems)
        Z64 = sparse_encode(X, D, algorithm=algorithm, **_kw(algorithm))
        if algorithm in ("omp", "lars", "threshold", "topk", "lasso_lars", "lasso_cd", "fista"):
            np.testing.assert_allclose(Z, Z64, rtol=0, atol=1e-3)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("device", DEVICES)
def test_torch_in_torch_out(algorithm, dtype, device):
    X, D = _small()
    Xt = torch.from_numpy(X).to(device=device, dtype=dtype)
    Zt = sparse_encode(Xt, torch.from_numpy(D).to(device), algorithm=algorithm, **_kw(algorithm))
    assert isinstance(Zt, torch.Tensor)
    assert Zt.dtype == dtype and Zt.device == Xt.device and Zt.shape == (7, 16)
    Zn = sparse_encode(
        X.astype(np.float32 if dtype == torch.float32 else np.float64),
        D,
        algorithm=algorithm,
        device=device,
        **_kw(algorithm),
    )
    atol = 1e-10 if dtype == torch.float64 else 1e-5
    np.testing.assert_allclose(Zt.cpu().numpy(), Zn, rtol=0, atol=atol)


def test_sparse_coder_torch_in_torch_out():
    X, D = _small()
    coder = SparseCoder(D, transform_n_nonzero_coefs=2, split_sign=True).fit(X)
    Zt = coder.transform(torch.from_numpy(X).float())
    assert isinstance(Zt, torch.Tensor) and Zt.dtype == torch.float32
    np.testing.assert_allclose(Zt.numpy(), coder.transform(X.astype(np.float32)), atol=1e-6)


# --------------------------------------------------------------------------------------------
# 5. input validation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", ["X", "dictionary"])
@pytest.mark.parametrize("as_torch", [False, True])
def test_non_finite_input_rejected(bad, where, as_torch):
    X, D = _small()
    (X if where == "X" else D)[2, 3] = bad
    if as_torch:
        X, D = torch.from_numpy(X), torch.from_numpy(D)
    with pytest.raises(ValueError, match=rf"{where} contains NaN or inf.*\(2, 3\)"):
        sparse_encode(X, D, algorithm="omp")


def test_shape_mismatch_names_both_shapes():
    X, D = _small()
    with pytest.raises(ValueError, match=r"5 features.*6.*\(7, 5\).*\(16, 6\)"):
        sparse_encode(X[:, :5], D)


def test_zero_norm_atom_rejected():
    X, D = _small()
    D[4] = 0.0
    with pytest.raises(ValueError, match=r"zero-norm atoms.*4"):
        sparse_encode(X, D, algorithm="lasso_lars")


@pytest.mark.parametrize("algorithm", ["omp", "lars", "iht", "topk"])
@pytest.mark.parametrize("k", [0, -1, 17, 2.5])
def test_bad_n_nonzero_coefs_rejected(algorithm, k):
    X, D = _small()
    with pytest.raises(ValueError, match=r"n_nonzero_coefs.*\[1, n_components=16\]"):
        sparse_encode(X, D, algorithm=algorithm, n_nonzero_coefs=k)


@pytest.mark.parametrize(
    "algorithm", ["omp", "lasso_lars", "lasso_cd", "threshold", "fista", "ista", "l0", "mcp"]
)
@pytest.mark.parametrize("alpha", [-0.1, np.nan, np.inf])
def test_bad_alpha_rejected(algorithm, alpha):
    X, D = _small()
    with pytest.raises(ValueError, match=r"alpha must be a finite number >= 0"):
        sparse_encode(X, D, algorithm=algorithm, alpha=alpha)


def test_empty_and_1d_input_rejected():
    X, D = _small()
    with pytest.raises(ValueError, match=r"X is empty.*\(0, 6\)"):
        sparse_encode(X[:0], D)
    with pytest.raises(ValueError, match=r"X must be 2-D.*\(6,\)"):
        sparse_encode(X[0], D)
    with pytest.raises(ValueError, match=r"dictionary must be 2-D"):
        sparse_encode(X, D[0])
    with pytest.raises(ValueError, match=r"0 sample"):
        SparseCoder(D).fit_transform(X[:0])


def test_unknown_algorithm_lists_known_ones():
    X, D = _small()
    with pytest.raises(ValueError, match="algorithm must be one of") as info:
        sparse_encode(X, D, algorithm="lasso_foo")
    for name in ALGORITHMS:
        assert repr(name) in str(info.value)
    with pytest.raises(ValueError, match="'lasso_foo'"):
        SparseCoder(D, transform_algorithm="lasso_foo").fit_transform(X)


@pytest.mark.parametrize("algorithm", ["omp", "lars"])
def test_positive_not_supported_for_omp_lars(algorithm):
    X, D = _small()
    with pytest.raises(ValueError, match=f"Positive constraint not supported for '{algorithm}'"):
        sparse_encode(X, D, algorithm=algorithm, positive=True)


def test_bad_gram_cov_init_shapes_rejected():
    X, D = _small()
    with pytest.raises(ValueError, match=r"gram must have shape \(16, 16\)"):
        sparse_encode(X, D, gram=np.eye(5))
    with pytest.raises(ValueError, match=r"cov must have shape.*\(16, 7\)"):
        sparse_encode(X, D, cov=X @ D.T)  # transposed
    with pytest.raises(ValueError, match=r"init must have shape \(7, 16\)"):
        sparse_encode(X, D, algorithm="fista", init=np.zeros((16, 7)))


# --------------------------------------------------------------------------------------------
# 6. property tests
# --------------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    n_samples=st.integers(1, 20),
    n_features=st.integers(2, 12),
    n_atoms=st.integers(2, 30),
    dtype=st.sampled_from([np.float32, np.float64]),
    algorithm=st.sampled_from(["omp", "lasso_lars", "threshold", "topk"]),
    k=st.integers(1, 30),
    alpha=st.sampled_from([0.0, 0.01, 0.3, 2.0]),
    duplicate_atom=st.booleans(),
    zero_row=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_property_shapes_dtypes_sparsity(
    n_samples, n_features, n_atoms, dtype, algorithm, k, alpha, duplicate_atom, zero_row, seed
):
    rng = np.random.default_rng(seed)
    D = rng.standard_normal((n_atoms, n_features))
    if duplicate_atom:
        D[-1] = -2.0 * D[0]  # linearly dependent atoms
    X = rng.standard_normal((n_samples, n_features))
    if zero_row:
        X[0] = 0.0
    X, D = X.astype(dtype), D.astype(dtype)
    k = min(k, n_atoms)
    if algorithm in ("omp", "topk"):
        Z = sparse_encode(X, D, algorithm=algorithm, n_nonzero_coefs=k)
    else:
        Z = sparse_encode(X, D, algorithm=algorithm, alpha=alpha)
    assert isinstance(Z, np.ndarray)
    assert Z.shape == (n_samples, n_atoms)
    assert Z.dtype == dtype
    assert np.isfinite(Z).all()
    if algorithm in ("omp", "topk"):
        assert (nnz(Z) <= k).all()
    if zero_row:
        assert not Z[0].any()


def test_lq_defaults_to_half_and_bad_penalty_params_raise():
    rng = np.random.default_rng(0)
    D = unit_rows(rng.standard_normal((12, 6)))
    X = rng.standard_normal((4, 6))
    np.testing.assert_array_equal(
        sparse_encode(X, D, algorithm="lq", alpha=0.1),
        sparse_encode(X, D, algorithm="lq", alpha=0.1, penalty_params={"q": 0.5}),
    )
    with pytest.raises(ValueError, match="penalty_params .* 'mcp'"):
        sparse_encode(X, D, algorithm="mcp", alpha=0.1, penalty_params={"q": 0.5})
