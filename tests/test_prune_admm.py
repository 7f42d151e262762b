"""ADMM on the solver core and the pruning methods built on it (admm, alps, Boža's update).

References: exhaustive search over masks (tiny layers), direct least squares on a support,
``torch.linalg.solve`` for the shifted Gram, ``topk`` for the batch-wide cut.
"""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch

from sparsecode.core.admm import ShiftedGram, admm
from sparsecode.core.operators import NM, BatchTopK, Support, TopK
from sparsecode.core.select import kth_largest, top_budget, top_budget_mask
from sparsecode.core.solvers import LeastSquares
from sparsecode.prune.layer import (
    admm_prune,
    alps_prune,
    layer_error,
    prune_layer,
    sparsegpt,
    wanda,
)


def _layer(seed: int, rows: int = 3, d: int = 6, n: int = 40):
    """A small layer with correlated inputs (so masks and weight updates matter)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(d, n, generator=g, dtype=torch.float64)
    X[1] += 0.8 * X[0]
    X[d - 2] += 0.5 * X[d - 3]
    return torch.randn(rows, d, generator=g, dtype=torch.float64), X @ X.T


def _best_by_size(w, H):
    """Per row: the least-squares error of the best support of every size (exhaustive)."""
    d = w.numel()
    out = [float(w @ H @ w)]
    for size in range(1, d + 1):
        best = math.inf
        for S in map(list, itertools.combinations(range(d), size)):
            wn = torch.zeros_like(w)
            wn[S] = torch.linalg.solve(H[S][:, S], H[S] @ w)
            best = min(best, float((w - wn) @ H @ (w - wn)))
        out.append(best)
    return out


def _optimum(W, H, keep: int, per_row: bool) -> float:
    """The smallest layer error over all masks keeping ``keep`` per row (or ``keep * rows`` in
    the whole matrix) with least-squares weights: exhaustive search."""
    per = [_best_by_size(w, H) for w in W]
    if per_row:
        return sum(p[keep] for p in per)
    d = W.shape[1]
    return min(sum(p[c] for p, c in zip(per, counts, strict=True))
               for counts in itertools.product(range(d + 1), repeat=W.shape[0])
               if sum(counts) == keep * W.shape[0])


def _err(W, W_new, H) -> float:
    return float(layer_error(W, W_new, H).sum())


# ---------------------------------------------------------------------------------------------
# the core pieces
# ---------------------------------------------------------------------------------------------


def test_shifted_gram_solves_and_shares_its_inverses():
    W, H = _layer(0, rows=5, d=8)
    inv = ShiftedGram(H)
    for rho in (0.1, 3.0):
        ref = torch.linalg.solve(H + rho * torch.eye(8, dtype=H.dtype), W.T).T
        torch.testing.assert_close(inv.solve(W, rho), ref)
    assert inv.inverse(0.1) is inv.inverse(0.1)  # cached: layers sharing a Gram share it


def test_shifted_gram_of_a_singular_gram_falls_back_and_refuses_rho_zero():
    H = torch.zeros(3, 3, dtype=torch.float64)
    H[0, 0] = 1.0
    inv = ShiftedGram(H)
    torch.testing.assert_close(inv.inverse(0.5), torch.diag(torch.tensor([1 / 1.5, 2, 2.0],
                                                                          dtype=H.dtype)))
    with pytest.raises(ValueError, match="singular"):
        inv.inverse(0.0)


@pytest.mark.parametrize("n", [10, 5000, 200_000])
@pytest.mark.parametrize("kind", ["continuous", "ties"])
def test_batch_cut_equals_a_full_topk(n, kind):
    g = torch.Generator().manual_seed(n)
    key = torch.randn(n, generator=g).abs() if kind == "continuous" \
        else torch.randint(0, 4, (n,), generator=g).float()
    for k in sorted({1, 3, n // 3, n // 2, n - 1, n}):
        assert kth_largest(key, k) == key.topk(k).values[-1]
        mask = top_budget_mask(key, k)
        ref = torch.zeros(n, dtype=torch.bool)
        ref[top_budget(key, k)] = True  # the tie rule: lowest index first
        assert torch.equal(mask, ref) and int(mask.sum()) == k


def test_batch_topk_projection_keeps_the_budget_over_the_whole_matrix():
    z = torch.randn(50, 40, generator=torch.Generator().manual_seed(1))
    p = BatchTopK(7).project(z)
    assert int((p != 0).sum()) == 7 * 50
    assert float(p.abs()[p != 0].min()) >= float(z.abs()[p == 0].max())
    torch.testing.assert_close(p[p != 0], z[p != 0])


def test_support_projection():
    mask = torch.tensor([[True, False], [False, True]])
    z = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert Support(mask).project(z).tolist() == [[1.0, 0.0], [0.0, 4.0]]
    assert Support(mask).contains(torch.tensor([[1.0, 0.0], [1.0, 1.0]])).tolist() == [True, False]
    with pytest.raises(ValueError, match="boolean"):
        Support(torch.ones(2))


def test_admm_with_a_fixed_support_converges_to_least_squares_on_it():
    W, H = _layer(2, rows=4, d=8)
    prob = LeastSquares.from_gram(H, W @ H)
    mask = torch.rand(4, 8, generator=torch.Generator().manual_seed(0)) > 0.4
    out = admm(prob, Support(mask), rho=float(H.diagonal().mean()), schedule="fixed",
               max_iter=500, init=W).codes
    for r in range(4):
        S = mask[r].nonzero().squeeze(1)
        ref = torch.linalg.solve(H[S][:, S], H[S] @ W[r])
        torch.testing.assert_close(out[r, S], ref, rtol=1e-6, atol=1e-8)
    assert not bool(out[~mask].any())


@pytest.mark.parametrize("projection", [BatchTopK(3), NM(2, 4)])
def test_admm_from_the_target_equals_admm_from_the_correlations(projection):
    # the pruning problem given by its weights V: z = V + (rho (u - V) - lam) M, no C = V G
    W, H = _layer(6, rows=6, d=8)
    by_target = LeastSquares.from_target(H, W)
    by_cov = LeastSquares.from_gram(H, W @ H, ((W @ H) * W).sum(1))
    for prob in (by_target, by_cov):
        assert prob.n_rows == 6 and prob.new_codes().shape == (6, 8)
    a = admm(by_target, projection, schedule="geometric", max_iter=9, init=W, relax=1.5).codes
    b = admm(by_cov, projection, schedule="geometric", max_iter=9, init=W, relax=1.5).codes
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(by_target.cov, by_cov.cov)
    torch.testing.assert_close(by_target.sq_norms, by_cov.sq_norms)
    torch.testing.assert_close(by_target.rows(slice(1, 3)).cov, by_cov.cov[1:3])


@pytest.mark.parametrize("relax", [0.7, 1.5])
def test_over_relaxed_admm_reaches_the_same_least_squares_on_a_fixed_support(relax):
    W, H = _layer(2, rows=4, d=8)
    prob = LeastSquares.from_gram(H, W @ H)
    mask = torch.rand(4, 8, generator=torch.Generator().manual_seed(0)) > 0.4
    rho = float(H.diagonal().mean())
    ref = admm(prob, Support(mask), rho=rho, schedule="fixed", max_iter=500, init=W).codes
    out = admm(prob, Support(mask), rho=rho, schedule="fixed", max_iter=500, init=W,
               relax=relax).codes
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-8)


def test_batch_cut_sample_sees_every_column_of_a_column_scaled_matrix(monkeypatch):
    # the strided sample's bracket holds on a weight whose columns have very different scales
    # (a stride sharing a factor with the width sampled 128 of 1536 columns and missed it)
    g = torch.Generator().manual_seed(3)
    key = torch.randn(576, 1536, generator=g) * torch.exp(torch.randn(1, 1536, generator=g))
    key = key.abs()
    key = key.reshape(-1)
    full = []
    topk = torch.Tensor.topk
    monkeypatch.setattr(torch.Tensor, "topk", lambda t, k, *a, **kw: (
        full.append(t.numel()) if t.numel() == key.numel() else None) or topk(t, k, *a, **kw))
    for frac in (0.3, 0.4, 0.5, 0.6, 0.7):
        k = int(frac * key.numel())
        assert kth_largest(key, k) == key.sort(descending=True).values[k - 1]
    assert not full  # no fallback to a full topk


@pytest.mark.parametrize("projection", [TopK(3), BatchTopK(3), NM(2, 4)])
def test_admm_result_is_in_the_set(projection):
    W, H = _layer(3, rows=5, d=8)
    out = admm(LeastSquares.from_gram(H, W @ H), projection, init=W)
    assert bool(projection.contains(out.codes).all())
    assert out.residual is not None and math.isfinite(out.residual)


def test_admm_divergence_is_a_clean_error_naming_the_residual():
    W, H = _layer(4)
    C = W @ H
    C[0, 0] = math.inf
    with pytest.raises(ValueError, match=r"diverged: the primal residual .* is nan after 3 it"):
        admm(LeastSquares.from_gram(H, C), TopK(2), schedule="geometric", max_iter=6)
    H[0, 0] = math.nan
    with pytest.raises(ValueError, match="Gram matrix has non-finite"):
        admm(LeastSquares.from_gram(H, W @ H), TopK(2))


def test_admm_that_runs_out_of_iterations_warns_with_the_residual():
    W, H = _layer(5, rows=20, d=12)
    with pytest.warns(RuntimeWarning, match="primal residual"):
        out = admm(LeastSquares.from_gram(H, W @ H), BatchTopK(4), max_iter=3, init=W)
    assert bool(BatchTopK(4).contains(out.codes).all())  # stopped cleanly, in the set


@pytest.mark.parametrize("bad", [dict(rho=0.0), dict(rho=math.inf), dict(schedule="cosine"),
                                 dict(growth=0.5), dict(max_iter=0), dict(update_every=0),
                                 dict(tol=-1.0), dict(relax=0.0), dict(relax=2.0)])
def test_admm_bad_settings(bad):
    W, H = _layer(0)
    with pytest.raises(ValueError):
        admm(LeastSquares.from_gram(H, W @ H), TopK(2), **bad)
    with pytest.raises(TypeError, match="Projection"):
        admm(LeastSquares.from_gram(H, W @ H), "topk")


# ---------------------------------------------------------------------------------------------
# pruning methods
# ---------------------------------------------------------------------------------------------


def test_admm_and_alps_against_the_exhaustive_optimum_over_masks():
    """On 20 random 3 x 6 layers at 50% (9 of 18 weights, any split over the rows), ADMM is a
    heuristic for a nonconvex problem: the documented bound is the measured one. The default
    ``admm`` reaches the exact optimum on at least 8 of 20 (10 measured) and is within 5% of it
    on average (4.4% measured); ALPS reaches it on at least 12 (15 measured); both are far
    better on average than SparseGPT (0 of 20, 22% above on average)."""
    ratios = {"admm": [], "alps": [], "sparsegpt": []}
    for seed in range(20):
        W, H = _layer(seed)
        opt = _optimum(W, H, keep=3, per_row=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            got = {"admm": admm_prune(W, H, 0.5, cg_iter=200, ridge=0.0)[0],
                   "alps": alps_prune(W, H, 0.5, cg_iter=200, ridge=0.0)[0],
                   "sparsegpt": sparsegpt(W, H, 0.5)[0]}
        for name, W_new in got.items():
            assert int((W_new != 0).sum()) <= 9
            ratios[name].append(_err(W, W_new, H) / opt)
    for r in ratios.values():
        assert min(r) >= 1 - 1e-9  # the exhaustive search is a true lower bound
    exact = {k: sum(v < 1 + 1e-6 for v in r) for k, r in ratios.items()}
    mean = {k: sum(r) / len(r) for k, r in ratios.items()}
    assert exact["admm"] >= 8 and mean["admm"] <= 1.05
    assert exact["alps"] >= 12
    assert mean["admm"] < mean["sparsegpt"] and mean["alps"] < mean["sparsegpt"]


def test_per_row_alps_against_the_exhaustive_optimum():
    ratios = []
    for seed in range(10):
        W, H = _layer(seed)
        W_new = alps_prune(W, H, 0.5, per_row=True, cg_iter=200, ridge=0.0)[0]
        assert ((W_new != 0).sum(dim=1) <= 3).all()
        ratios.append(_err(W, W_new, H) / _optimum(W, H, keep=3, per_row=True))
    assert min(ratios) >= 1 - 1e-9 and sum(r < 1 + 1e-6 for r in ratios) >= 6


def test_alps_refit_is_least_squares_on_its_support():
    W, H = _layer(7, rows=6, d=16, n=80)
    W_new, keep = alps_prune(W, H, 0.5, cg_iter=200, ridge=0.0)
    assert torch.equal(keep, W_new != 0)
    for r in range(6):  # to the conjugate gradient's tolerance (1e-6 of the residual)
        S = keep[r].nonzero().squeeze(1)
        ref = torch.linalg.solve(H[S][:, S], H[S] @ W[r])
        torch.testing.assert_close(W_new[r, S], ref, rtol=1e-5, atol=1e-6)


def test_boza_update_is_least_squares_on_the_wanda_mask():
    W, H = _layer(8, rows=6, d=16, n=80)
    W_new, keep = admm_prune(W, H, 0.5, fix_mask=True, max_iter=400)
    assert torch.equal(keep, wanda(W, H, 0.5)[1])
    for r in range(6):
        S = keep[r].nonzero().squeeze(1)
        ref = torch.linalg.solve(H[S][:, S], H[S] @ W[r])
        torch.testing.assert_close(W_new[r, S], ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", ["admm", "alps"])
@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_exact_nm_patterns(method, pattern):
    W, H = _layer(9, rows=8, d=32, n=100)
    n, m = map(int, pattern.split(":"))
    W_new, keep = prune_layer(W.float(), H.float(), method=method, pattern=pattern)
    assert ((keep.reshape(8, -1, m).sum(-1)) == n).all()
    assert not bool(W_new[~keep].any())


def test_default_admm_keeps_the_layer_budget_and_beats_sparsegpt_and_wanda():
    W, H = _layer(10, rows=64, d=48, n=400)
    W, H = W.float(), H.float()
    W_new, keep = prune_layer(W, H, 0.6)  # the default method
    assert int(keep.sum()) == (48 - round(0.6 * 48)) * 64  # the per-row count, layer-wide
    e = _err(W, W_new, H)
    assert e < _err(W, sparsegpt(W, H, 0.6)[0], H) and e < _err(W, wanda(W, H, 0.6)[0], H)


@pytest.mark.parametrize("init", ["magnitude", "wanda", "sparsegpt"])
def test_admm_warm_starts_from_any_mask(init):
    W, H = _layer(11, rows=16, d=24, n=100)
    W_new, keep = admm_prune(W, H, 0.5, init=init)
    assert int(keep.sum()) == W.numel() // 2
    assert _err(W, W_new, H) < _err(W, wanda(W, H, 0.5)[0], H)


def test_prune_layer_refuses_non_finite_input_naming_the_layer():
    W, H = _layer(12)
    W[0, 0] = math.inf
    with pytest.raises(ValueError, match="blocks.3.q: the weight has non-finite"):
        prune_layer(W, H, 0.5, name="blocks.3.q")
    W, H = _layer(12)
    H[1, 1] = math.nan
    with pytest.raises(ValueError, match="blocks.3.q: the input Gram has non-finite"):
        prune_layer(W, H, 0.5, name="blocks.3.q")


def test_admm_prune_bad_init():
    W, H = _layer(0)
    with pytest.raises(ValueError, match="init must be one of"):
        admm_prune(W, H, 0.5, init="random")
