"""The batched solvers of sparsecode.core against scikit-learn, closed forms and brute force."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import lars_path_gram, orthogonal_mp_gram

from sparsecode.core import SparseCodes, fista, iht, ista, lars, lasso, lipschitz, omp
from sparsecode.core.operators import L0, L1, MCP, NM, SCAD, Lq, TopK
from sparsecode.core.solvers import LeastSquares


def make_problem(n=40, feat=16, K=48, seed=0, dtype=torch.float64):
    rng = np.random.default_rng(seed)
    D = rng.standard_normal((K, feat))
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    X = rng.standard_normal((n, feat))
    return X, D, LeastSquares.from_data(torch.tensor(X, dtype=dtype), torch.tensor(D, dtype=dtype))


def objective(X, D, Z, alpha):
    return 0.5 * ((X - Z @ D) ** 2).sum(1) + alpha * np.abs(Z).sum(1)


def test_lipschitz_is_largest_eigenvalue():
    _, D, _ = make_problem()
    G = torch.tensor(D @ D.T)
    top = float(torch.linalg.eigvalsh(G)[-1])
    assert top <= lipschitz(G) <= 1.02 * top


@pytest.mark.parametrize("k", [1, 4, 9])
@pytest.mark.parametrize("chunk_size", [None, 7])
def test_omp_matches_sklearn_n_nonzero(k, chunk_size):
    X, D, prob = make_problem()
    ref = orthogonal_mp_gram(D @ D.T, D @ X.T, n_nonzero_coefs=k).T
    res = omp(prob, n_nonzero_coefs=k, chunk_size=chunk_size)
    Z = res.codes.to_dense().numpy()
    np.testing.assert_allclose(Z, ref, atol=1e-10)
    assert (res.n_iter == k).all()


def test_omp_tolerance_matches_sklearn_and_is_reached():
    X, D, prob = make_problem(n=60)
    sq = (X**2).sum(1)
    tol = 0.2 * sq.mean()
    ref = orthogonal_mp_gram(D @ D.T, D @ X.T, tol=tol, norms_squared=sq).T
    res = omp(prob, tol=tol)
    Z = res.codes.to_dense().numpy()
    np.testing.assert_allclose(Z, ref, atol=1e-10)
    resid = ((X - Z @ D) ** 2).sum(1)
    assert (resid <= tol * (1 + 1e-9)).all()
    np.testing.assert_array_equal(res.n_iter.numpy(), (Z != 0).sum(1))


def test_omp_from_gram_equals_from_data():
    X, D, prob = make_problem()
    Xt, Dt = torch.tensor(X), torch.tensor(D)
    g = LeastSquares.from_gram(Dt @ Dt.T, Xt @ Dt.T, (Xt * Xt).sum(1))
    a = omp(prob, n_nonzero_coefs=5).codes.to_dense()
    b = omp(g, n_nonzero_coefs=5).codes.to_dense()
    torch.testing.assert_close(a, b)


def test_omp_stops_on_linear_dependence():
    # 3 independent atoms in R^3 plus a duplicate: a 4th atom cannot be added
    D = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 0, 0]], dtype=torch.float64)
    X = torch.tensor([[3.0, -2.0, 1.0]], dtype=torch.float64)
    res = omp(LeastSquares.from_data(X, D), n_nonzero_coefs=4)
    assert int(res.n_iter[0]) == 3
    torch.testing.assert_close(res.codes.decode(D), X)


def test_omp_zero_signal_and_tol_already_met():
    X, D, _ = make_problem(n=3)
    X[0] = 0.0
    prob = LeastSquares.from_data(torch.tensor(X), torch.tensor(D))
    res = omp(prob, tol=1e-3)
    assert int(res.n_iter[0]) == 0
    assert (res.codes.to_dense()[0] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("selection", ["omp", "ormp"])
@pytest.mark.parametrize("kw", [{"n_nonzero_coefs": 6}, {"tol": 4.0},
                                {"n_nonzero_coefs": 10, "tol": 0.5}])
def test_compiled_and_torch_omp_give_the_same_codes(monkeypatch, dtype, selection, kw):
    """The numba loop (the CPU default) and the batched torch path run the same steps."""
    from sparsecode.core.kernels.cpu_solvers import numba_available

    X, D, _ = make_problem(n=200, feat=16, K=48, seed=3)
    X[0] = 0.0  # a zero signal
    D[5] = D[2]  # a duplicate atom: linear dependence
    out = {}
    for backend in ("1", "0"):
        monkeypatch.setenv("SPARSECODE_DISABLE_NUMBA", backend)
        prob = LeastSquares.from_data(torch.tensor(X, dtype=dtype), torch.tensor(D, dtype=dtype))
        out[backend] = omp(prob, selection=selection, **kw)
    assert numba_available()  # the second run was the compiled one
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(out["0"].codes.to_dense(), out["1"].codes.to_dense(),
                               atol=tol, rtol=tol)
    assert torch.equal(out["0"].n_iter, out["1"].n_iter)


@pytest.mark.parametrize("kw", [{"alpha": 0.3}, {"alpha": 0.05, "positive": True},
                                {"alpha": 0.0, "lasso": False, "n_nonzero_coefs": 7},
                                {"alpha": 0.0, "lasso": False}])
def test_compiled_and_torch_homotopy_follow_the_same_path(monkeypatch, kw):
    """The numba homotopy (the CPU default) and the batched torch one: same steps, same codes."""
    X, D, _ = make_problem(n=150, feat=16, K=48, seed=4)
    X[0] = 0.0  # (exact ties between duplicate atoms are broken differently: not compared)
    kw = {"lasso": True, **kw}
    out = {}
    for backend in ("1", "0"):
        monkeypatch.setenv("SPARSECODE_DISABLE_NUMBA", backend)
        out[backend] = lars(LeastSquares.from_data(torch.tensor(X), torch.tensor(D)), **kw)
    torch.testing.assert_close(out["0"].codes, out["1"].codes, atol=1e-9, rtol=1e-9)
    assert torch.equal(out["0"].n_iter, out["1"].n_iter)


def test_omp_errors():
    _, _, prob = make_problem()
    with pytest.raises(ValueError, match="n_nonzero_coefs or tol"):
        omp(prob)
    with pytest.raises(ValueError, match="n_nonzero_coefs must be in"):
        omp(prob, n_nonzero_coefs=49)
    with pytest.raises(ValueError, match="tol must be"):
        omp(prob, tol=-1.0)


@pytest.mark.parametrize("alpha", [0.05, 0.3, 1.0])
@pytest.mark.parametrize("positive", [False, True])
def test_lasso_is_exact(alpha, positive):
    X, D, prob = make_problem()
    res = lasso(prob, alpha, positive=positive, chunk_size=16)
    Z = res.codes.numpy()
    G, C = D @ D.T, X @ D.T
    # KKT conditions of 0.5||x - zD||^2 + alpha||z||_1 hold to machine precision
    corr = C - Z @ G
    on = Z != 0
    np.testing.assert_allclose(corr[on], alpha * np.sign(Z[on]), atol=1e-9)
    off = corr[~on] if positive else np.abs(corr[~on])
    assert (off <= alpha + 1e-9).all()
    if positive:
        assert (Z >= 0).all()
    # and it equals scikit-learn's LARS path at alpha (per sample)
    for i in range(3):
        alphas, _, coefs = lars_path_gram(C[i], G, n_samples=1, alpha_min=alpha,
                                          method="lasso", positive=positive)
        np.testing.assert_allclose(Z[i], coefs[:, -1], atol=1e-8)


def test_lar_matches_sklearn():
    X, D, prob = make_problem()
    res = lars(prob, n_nonzero_coefs=5, lasso=False)
    Z = res.codes.numpy()
    G, C = D @ D.T, X @ D.T
    for i in range(5):
        _, _, coefs = lars_path_gram(C[i], G, n_samples=1, max_iter=5, method="lar")
        np.testing.assert_allclose(Z[i], coefs[:, -1], atol=1e-9)
    assert ((Z != 0).sum(1) == 5).all()


def test_lasso_float32_close_to_float64():
    X, D, p64 = make_problem()
    _, _, p32 = make_problem(dtype=torch.float32)
    z64 = lasso(p64, 0.2).codes.numpy()
    z32 = lasso(p32, 0.2).codes.double().numpy()
    rel = objective(X, D, z32, 0.2).sum() / objective(X, D, z64, 0.2).sum() - 1
    assert 0 <= rel < 1e-5


@pytest.mark.parametrize("fast", [True, False])
def test_fista_ista_converge_to_lasso(fast):
    X, D, prob = make_problem(n=10)
    exact = lasso(prob, 0.2).codes.numpy()
    res = fista(prob, L1(0.2), fast=fast, tol=1e-12, max_iter=20000)
    Z = res.codes.numpy()
    f, f_star = objective(X, D, Z, 0.2).sum(), objective(X, D, exact, 0.2).sum()
    assert abs(f / f_star - 1) < 1e-8
    assert (res.n_iter < 20000).all()


def test_fista_needs_fewer_iterations_than_ista():
    _, _, prob = make_problem(n=10)
    a = fista(prob, L1(0.1), tol=1e-8, max_iter=20000).n_iter.float().mean()
    b = ista(prob, L1(0.1), tol=1e-8, max_iter=20000).n_iter.float().mean()
    assert a < b


def test_fista_warm_start_from_solution_stops_at_once():
    _, _, prob = make_problem(n=5)
    z = lasso(prob, 0.3).codes
    res = fista(prob, L1(0.3), init=z, tol=1e-8, check_every=1)
    assert (res.n_iter == 1).all()


@pytest.mark.parametrize(
    "penalty", [L0(0.1), Lq(0.1, q=0.5), MCP(0.2, gamma=3.0), SCAD(0.2, gamma=3.7), TopK(4)]
)
@pytest.mark.parametrize("fast", [True, False])
def test_nonconvex_objective_decreases_monotonically(penalty, fast):
    _, _, prob = make_problem(n=8)
    values = []
    for t in range(1, 40):
        z = fista(prob, penalty, fast=fast, max_iter=t, tol=0.0).codes
        values.append((prob.loss(z) + penalty.value(z)).numpy())
    values = np.array(values)
    assert (np.diff(values, axis=0) <= 1e-12).all()
    assert (values[-1] < values[0]).all()


def test_iht_topk_and_nm():
    X, D, prob = make_problem()
    cov = prob.cov
    for proj in (TopK(3), NM(2, 4)):
        z = iht(prob, proj, max_iter=300).codes
        assert bool(proj.contains(z).all())
        # better than projecting the plain correlations
        z0 = proj.project(cov)
        assert (prob.loss(z) <= prob.loss(z0) + 1e-12).all()
    with pytest.raises(TypeError, match="Projection"):
        iht(prob, L1(0.1))


def test_solver_argument_errors():
    _, _, prob = make_problem()
    with pytest.raises(ValueError, match="max_iter"):
        fista(prob, L1(0.1), max_iter=0)
    with pytest.raises(ValueError, match="alpha"):
        lasso(prob, -1.0)
    with pytest.raises(ValueError, match="step"):
        fista(prob, L1(0.1), step=-1.0)


def test_sparse_codes_decode_and_gradients_match_dense():
    torch.manual_seed(0)
    z = torch.randn(6, 10, dtype=torch.float64)
    z[z.abs() < 0.8] = 0
    codes = SparseCodes.from_dense(z)
    torch.testing.assert_close(codes.to_dense(), z)
    D = torch.randn(10, 5, dtype=torch.float64, requires_grad=True)
    vals = codes.values.clone().requires_grad_(True)
    out = SparseCodes(vals, codes.indices, 10).decode(D)
    dense = SparseCodes(vals, codes.indices, 10).to_dense()
    ref = dense @ D
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    gv, gd = torch.autograd.grad(out, (vals, D), g)
    rv, rd = torch.autograd.grad(ref, (vals, D), g)
    torch.testing.assert_close(gv, rv)
    torch.testing.assert_close(gd, rd)
    with pytest.raises(ValueError, match="atoms"):
        codes.decode(torch.randn(9, 5, dtype=torch.float64))


def test_progress_bar_reports_rows(capsys):
    _, _, prob = make_problem(n=30)
    plain = omp(prob, n_nonzero_coefs=3).codes.to_dense()
    shown = omp(prob, n_nonzero_coefs=3, progress=True, chunk_size=10).codes.to_dense()
    torch.testing.assert_close(plain, shown)
    err = capsys.readouterr().err
    assert "0/30" in err and "rows" in err


def brute_force_ormp(x, D, k):
    """Greedy: add the atom whose least-squares refit leaves the smallest residual."""
    S = []
    for _ in range(k):
        best = None
        for j in range(len(D)):
            if j in S:
                continue
            A = D[S + [j]].T
            coef = np.linalg.lstsq(A, x, rcond=None)[0]
            r = np.sum((x - A @ coef) ** 2)
            if best is None or r < best[0]:
                best = (r, j)
        S.append(best[1])
    return set(S)


def test_ormp_matches_brute_force_and_beats_omp():
    X, D, prob = make_problem(n=15, feat=10, K=25)
    res = omp(prob, n_nonzero_coefs=4, selection="ormp")
    Z = res.codes.to_dense().numpy()
    for i in range(15):
        assert set(np.flatnonzero(Z[i])) == brute_force_ormp(X[i], D, 4)
    Z_omp = omp(prob, n_nonzero_coefs=4).codes.to_dense().numpy()
    r_ormp = ((X - Z @ D) ** 2).sum(1)
    r_omp = ((X - Z_omp @ D) ** 2).sum(1)
    assert (r_ormp <= r_omp + 1e-12).mean() >= 0.9 and r_ormp.sum() < r_omp.sum()
    with pytest.raises(ValueError, match="selection"):
        omp(prob, n_nonzero_coefs=2, selection="mp")


@pytest.mark.parametrize("ridge", [0.0, 0.3])
def test_support_lstsq_matches_exact_solve_per_row(ridge):
    from sparsecode.core.solvers import support_lstsq

    X, D, _ = make_problem(n=12, feat=30, K=20, seed=3)
    Xt, Dt = torch.tensor(X), torch.tensor(D)
    G = Dt @ Dt.T
    prob = LeastSquares.from_gram(G, Xt @ Dt.T)
    gen = torch.Generator().manual_seed(0)
    support = torch.rand(12, 20, generator=gen) < 0.4
    support[0] = False  # an empty support gives zeros
    res = support_lstsq(prob, support, ridge=ridge, max_iter=100, tol=1e-12)
    Z = res.codes
    assert (Z[~support] == 0).all() and (Z[0] == 0).all() and res.n_iter[0] == 0
    for i in range(1, 12):
        S = support[i].nonzero().squeeze(1)
        A = G[S][:, S] + ridge * torch.eye(len(S), dtype=G.dtype)
        exact = torch.linalg.solve(A, (Xt[i] @ Dt.T)[S])
        torch.testing.assert_close(Z[i, S], exact, rtol=1e-8, atol=1e-8)
    # a warm start at the answer stops at once; bad input is refused
    again = support_lstsq(prob, support, init=Z, ridge=ridge, tol=1e-6)
    assert int(again.n_iter.max()) <= 1
    with pytest.raises(ValueError, match="support has shape"):
        support_lstsq(prob, support[:, :5])
    with pytest.raises(ValueError, match="ridge"):
        support_lstsq(prob, support, ridge=-1.0)


def test_support_lstsq_after_iht_lowers_the_objective():
    from sparsecode.core.solvers import support_lstsq

    _, _, prob = make_problem(n=20, feat=40, K=32, seed=4)
    for proj in (TopK(6), NM(2, 4)):
        z = iht(prob, proj, max_iter=30).codes
        z2 = support_lstsq(prob, z != 0, init=z, max_iter=100).codes
        assert (prob.loss(z2) <= prob.loss(z) + 1e-10).all()
        assert bool(proj.contains(z2).all())


# --------------------------------------------------------------------------------------------
# matching pursuit
# --------------------------------------------------------------------------------------------


def _textbook_mp(x, D, steps, tol=None, positive=False, stop_on_repeat=False):
    """Matching pursuit written row by row from its definition (residual space)."""
    r, z, n = x.copy(), np.zeros(D.shape[0]), 0
    norms = np.linalg.norm(D, axis=1)
    for _ in range(steps):
        if tol is not None and r @ r <= tol:
            break
        c = D @ r / norms
        j = int(np.argmax(c if positive else np.abs(c)))
        if (c[j] if positive else abs(c[j])) <= 0:
            break
        repeat = z[j] != 0
        v = (D[j] @ r) / norms[j] ** 2
        z[j] += v
        r = r - v * D[j]
        n += 1
        if repeat and stop_on_repeat:
            break
    return z, n


@pytest.mark.parametrize("positive, stop_on_repeat", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("chunk_size", [None, 7])
def test_mp_matches_a_textbook_loop(positive, stop_on_repeat, chunk_size):
    """Repeated atoms, non-unit atoms (the scaled dictionary) and a residual tolerance."""
    from sparsecode.core import mp

    X, D, _ = make_problem(n=30, feat=8, K=20, seed=3)
    D = D * np.linspace(0.5, 2.0, 20)[:, None]
    prob = LeastSquares.from_data(torch.tensor(X), torch.tensor(D))
    for steps, tol in ((12, None), (40, 0.3)):
        res = mp(prob, n_nonzero_coefs=steps, tol=tol, positive=positive,
                 stop_on_repeat=stop_on_repeat, chunk_size=chunk_size)
        Z = res.codes.to_dense().numpy()
        for i in range(len(X)):
            z, n = _textbook_mp(X[i], D, steps, tol, positive, stop_on_repeat)
            np.testing.assert_allclose(Z[i], z, atol=1e-10, err_msg=str(i))
            assert int(res.n_iter[i]) == n
    if not stop_on_repeat:
        assert (res.n_iter > 8).any()  # steps beyond the dimension: atoms were picked again


def test_mp_is_saelens_matching_pursuit_encoder():
    """positive + stop_on_repeat on unit-norm atoms is SAELens' MatchingPursuitSAE encoder."""
    from sae_lens.saes.matching_pursuit_sae import _encode_matching_pursuit

    from sparsecode.core import mp

    X, D, _ = make_problem(n=64, feat=16, K=96, seed=4, dtype=torch.float32)
    x, W = torch.tensor(X, dtype=torch.float32), torch.tensor(D, dtype=torch.float32)
    for k in (4, 16):
        ref = _encode_matching_pursuit(x, W, 0.0, max_iterations=k,
                                       stop_on_duplicate_support=True)
        got = mp(LeastSquares.from_data(x, W), n_nonzero_coefs=k, positive=True,
                 stop_on_repeat=True).codes.to_dense()
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_mp_bad_arguments():
    from sparsecode.core import mp

    _, _, prob = make_problem()
    with pytest.raises(ValueError, match="n_nonzero_coefs or tol"):
        mp(prob)
    with pytest.raises(ValueError, match="n_nonzero_coefs must be an integer >= 1"):
        mp(prob, n_nonzero_coefs=0)
    with pytest.raises(ValueError, match="tol must be >= 0"):
        mp(prob, tol=-1.0)


def test_nnomp_selects_like_the_textbook_and_solves_nnls_on_its_support():
    """Each step adds the atom most positively correlated with the residual of the NNLS fit;
    the final codes are scipy's NNLS on the selected atoms."""
    from scipy.optimize import nnls

    from sparsecode.core import nnomp

    X, D, prob = make_problem(n=25, feat=12, K=30, seed=6)
    res = nnomp(prob, n_nonzero_coefs=5, max_iter=2000)
    Z = res.codes.to_dense().numpy()
    idx = res.codes.indices.numpy()
    for i in range(len(X)):
        support: list[int] = []
        z = np.zeros(0)
        for _ in range(int(res.n_iter[i])):
            r = X[i] - z @ D[support] if support else X[i]
            c = D @ r
            c[support] = -np.inf
            support.append(int(np.argmax(c)))
            z, _ = nnls(D[support].T, X[i])
        assert idx[i, : len(support)].tolist() == support
        ref = np.zeros(D.shape[0])
        ref[support] = z
        np.testing.assert_allclose(Z[i], ref, atol=1e-6)
    assert (Z >= 0).all() and (res.n_iter == 5).any()
