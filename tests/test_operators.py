"""Tests for sparsecode.core.operators: every prox against brute force, projections against
exhaustive search over supports, values against hand formulas, and property tests."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from sparsecode.core.operators import (
    CEL0,
    L0,
    L1,
    MCP,
    NM,
    OPERATORS,
    SCAD,
    BatchTopK,
    FeatureChoice,
    GroupL21,
    Jump,
    Lq,
    Operator,
    Projection,
    TopK,
    make_operator,
)

F64 = torch.float64
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# --------------------------------------------------------------------------------------------
# brute force 1-D prox on a fine grid
# --------------------------------------------------------------------------------------------

# spacing 1.5e-4 on [-9, 9] (|prox(z)| <= |z| <= 8 here), plus an exact 0 (linspace's middle
# point may be off by rounding)
GRID = torch.cat([torch.linspace(-9.0, 9.0, 120001, dtype=F64), torch.zeros(1, dtype=F64)])


def objective(op: Operator, u: torch.Tensor, z: torch.Tensor, step: float) -> torch.Tensor:
    """0.5 (u - z)^2 + step * penalty(u), elementwise for scalar problems."""
    return 0.5 * (u - z) ** 2 + step * op.value(u.unsqueeze(-1))


def brute_force(op: Operator, z: torch.Tensor, step: float):
    """Grid minimiser, its objective, and the best objective at least 0.05 away from it.

    The search runs in numpy, one z at a time (single-threaded elementwise work, so a busy
    machine's thread oversubscription does not slow it down)."""
    grid = GRID.numpy()
    pen = (step * op.value(GRID.unsqueeze(-1))).numpy()  # (G,)
    out = np.empty((3, len(z)))
    for j, zj in enumerate(z.tolist()):
        f = grid - zj
        np.square(f, out=f)
        f *= 0.5
        f += pen
        i = int(np.argmin(f))
        out[0, j], out[1, j] = grid[i], f[i]
        f[np.abs(grid - grid[i]) <= 0.05] = np.inf
        out[2, j] = f.min()
    u_star, f_star, f_far = torch.from_numpy(out)
    return u_star, f_star, f_far


def z_values(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rand = torch.rand(28, generator=g, dtype=F64) * 16.0 - 8.0
    special = torch.tensor([0.0, 1e-3, -1e-3, 0.25, -0.7, 1.0, 3.0, -5.5], dtype=F64)
    return torch.cat([rand, special])


def check_against_brute_force(op: Operator, step: float, seed: int = 0) -> None:
    z = z_values(seed)
    p = op.prox(z.unsqueeze(-1), step).squeeze(-1)
    if getattr(op, "norms", None) is None:  # one long row gives the same (coordinate-wise)
        torch.testing.assert_close(op.prox(z, step), p, rtol=0, atol=0)
    u_star, f_star, f_far = brute_force(op, z, step)
    f_p = objective(op, p, z, step)
    # the prox is a global minimiser: no grid point does better
    bad = f_p > f_star + 1e-10
    assert not bad.any(), (op, step, z[bad], p[bad], u_star[bad], f_p[bad], f_star[bad])
    # where the minimiser is well separated from any other near-minimiser, it is the grid's
    unique = f_far - f_star > 1e-6
    assert unique.sum() > len(z) // 2
    err = (p - u_star).abs()
    assert (err[unique] <= 2e-4).all(), (op, step, z[unique][err[unique] > 2e-4])


SEPARABLE_CASES = [
    *[(L1(alpha=0.8, positive=pos), t) for pos in (False, True) for t in (0.3, 1.0, 2.5)],
    *[(L0(alpha=0.8, positive=pos), t) for pos in (False, True) for t in (0.3, 1.0, 2.5)],
    *[
        (Lq(alpha=0.7, q=q, positive=pos), t)
        for q in (0.5, 2.0 / 3.0, 0.3, 0.8)
        for pos in (False, True)
        for t in (0.3, 1.0, 2.5)
    ],
    *[(Lq(alpha=0.7, q=q, method="newton"), 1.3) for q in (0.5, 2.0 / 3.0)],
    # MCP gamma=3: firm (t < 3), the limit t = gamma, hard threshold (t > 3)
    *[
        (MCP(alpha=0.9, gamma=3.0, positive=pos), t)
        for pos in (False, True)
        for t in (0.5, 1, 3, 5)
    ],
    *[(MCP(alpha=1.2, gamma=1.5), t) for t in (1.0, 1.49, 1.5 - 1e-12, 2.0)],
    # SCAD gamma=3.7: convex closed form (t < 2.7), boundary t = gamma - 1, nonconvex (t > 2.7)
    *[
        (SCAD(alpha=0.9, gamma=3.7, positive=pos), t)
        for pos in (False, True)
        for t in (0.5, 1.0, 2.7, 4.0)
    ],
    *[(SCAD(alpha=1.1, gamma=2.2), t) for t in (0.3, 1.0, 1.2 - 1e-12, 1.2, 1.5, 3.0)],
    # CEL0: firm threshold for step * a^2 < 1, l0 hard threshold beyond
    *[
        (CEL0(alpha=0.6, norms=[a], positive=pos), t)
        for a in (1.0, 1.5)
        for pos in (False, True)
        for t in (0.2, 1.0 / a**2, 1.0)
    ],
]


@pytest.mark.parametrize(("op", "step"), SEPARABLE_CASES, ids=lambda x: repr(x))
def test_prox_matches_brute_force(op: Operator, step: float) -> None:
    check_against_brute_force(op, step)


@pytest.mark.parametrize("cls", [L1, L0, Lq, MCP, SCAD, CEL0])
def test_positive_prox_is_nonnegative_and_zero_on_negatives(cls) -> None:
    kw = {"q": 0.5} if cls is Lq else {}
    op = cls(alpha=0.5, positive=True, **kw)
    z = torch.linspace(-6, 6, 121, dtype=F64)
    p = op.prox(z, 1.0)
    assert (p >= 0).all()
    assert (p[z <= 0] == 0).all()
    plain = cls(alpha=0.5, **kw).prox(z, 1.0)
    torch.testing.assert_close(p[z > 0], plain[z > 0])


# --------------------------------------------------------------------------------------------
# closed forms
# --------------------------------------------------------------------------------------------


def lq_threshold(lam: float, q: float) -> tuple[float, float]:
    beta = (2 * lam * (1 - q)) ** (1 / (2 - q))
    return beta, (2 - q) * beta / (2 * (1 - q))


@pytest.mark.parametrize("q", [0.5, 2.0 / 3.0])
@pytest.mark.parametrize("lam", [1e-6, 0.3, 1.0, 50.0])
def test_lq_closed_form_matches_newton(q: float, lam: float) -> None:
    _, tau = lq_threshold(lam, q)
    ratio = torch.cat(
        [1 + torch.logspace(-9, 9, 400, dtype=F64), torch.linspace(0, 1 - 1e-9, 50, dtype=F64)]
    )
    z = torch.cat([tau * ratio, -tau * ratio])
    closed = Lq(alpha=lam, q=q).prox(z, 1.0)
    newton = Lq(alpha=lam, q=q, method="newton").prox(z, 1.0)
    torch.testing.assert_close(closed, newton, rtol=1e-13, atol=0)
    # float32 agrees away from the threshold (within float32 conditioning)
    z32 = z[ratio.repeat(2) > 1 + 1e-4].float()
    c32 = Lq(alpha=lam, q=q).prox(z32, 1.0)
    n32 = Lq(alpha=lam, q=q, method="newton").prox(z32, 1.0)
    assert c32.dtype == n32.dtype == torch.float32
    torch.testing.assert_close(c32.double(), newton[ratio.repeat(2) > 1 + 1e-4], rtol=2e-6, atol=0)
    torch.testing.assert_close(n32, c32, rtol=2e-6, atol=0)


@pytest.mark.parametrize("q", [0.05, 0.3, 0.5, 2.0 / 3.0, 0.8, 0.95])
def test_lq_threshold_and_stationarity(q: float) -> None:
    alpha, step = 0.7, 1.3
    lam = alpha * step
    beta, tau = lq_threshold(lam, q)
    op = Lq(alpha=alpha, q=q)
    below = op.prox(torch.tensor([tau * (1 - 1e-9), -tau * (1 - 1e-9)], dtype=F64), step)
    above = op.prox(torch.tensor([tau * (1 + 1e-9), -tau * (1 + 1e-9)], dtype=F64), step)
    assert (below == 0).all()
    # the jump at the threshold goes from 0 to beta
    torch.testing.assert_close(above, torch.tensor([beta, -beta], dtype=F64), rtol=1e-6, atol=0)
    # above the threshold: s + lam q s^(q-1) = |z| to rounding
    y = tau * (1 + torch.logspace(-6, 6, 200, dtype=F64))
    s = op.prox(y, step)
    torch.testing.assert_close(s + lam * q * s ** (q - 1), y, rtol=1e-14, atol=0)


def test_mcp_scad_cel0_closed_forms_by_hand() -> None:
    z = torch.tensor([0.5, -1.5, 2.0, 3.0, -5.0], dtype=F64)
    # MCP alpha=1, gamma=3, t=1: firm threshold (|z| - 1) / (1 - 1/3) on (1, 3]
    mcp = MCP(alpha=1.0, gamma=3.0).prox(z, 1.0)
    torch.testing.assert_close(mcp, torch.tensor([0.0, -0.75, 1.5, 3.0, -5.0], dtype=F64))
    # MCP t >= gamma: hard threshold at alpha sqrt(t gamma) = sqrt(12) ~ 3.46
    hard = MCP(alpha=1.0, gamma=3.0).prox(z, 4.0)
    torch.testing.assert_close(hard, torch.tensor([0.0, 0.0, 0.0, 0.0, -5.0], dtype=F64))
    # SCAD alpha=1, gamma=3.7, t=1 (Fan & Li): |z|<=1 -> 0; <=2 -> |z|-1; <=3.7 -> (2.7|z|-3.7)/1.7
    scad = SCAD(alpha=1.0, gamma=3.7).prox(z, 1.0)
    want = torch.tensor([0.0, -0.5, 1.0, (2.7 * 3 - 3.7) / 1.7, -5.0], dtype=F64)
    torch.testing.assert_close(scad, want)
    # SCAD general t=0.5: |z|<=0.5 -> 0; <=1.5 -> |z|-0.5; <=3.7 -> (2.7|z| - 1.85) / 2.2
    scad = SCAD(alpha=1.0, gamma=3.7).prox(z, 0.5)
    want = torch.tensor([0.0, -1.0, (5.4 - 1.85) / 2.2, (8.1 - 1.85) / 2.2, -5.0], dtype=F64)
    torch.testing.assert_close(scad, want)
    # CEL0 with unit norms is the MCP with alpha' = sqrt(2 alpha), gamma' = 1
    cel0 = CEL0(alpha=0.5, norms=[1.0] * 5).prox(z, 0.5)
    torch.testing.assert_close(cel0, MCP(alpha=1.0, gamma=1.0 + 1e-15).prox(z, 0.5))
    # alpha' = 1, gamma' = 1, t = 0.5: 0 below 0.5, (|z| - 0.5) / 0.5 on (0.5, 1], z beyond
    torch.testing.assert_close(cel0, torch.tensor([0.0, -1.5, 2.0, 3.0, -5.0], dtype=F64))


def test_cel0_per_atom_norms_and_hard_threshold_regime() -> None:
    norms = torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=F64)
    op = CEL0(alpha=0.4, norms=norms)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(50, 4, generator=g, dtype=F64) * 3
    for step in (0.05, 0.3, 1.0):
        p = op.prox(z, step)
        for i, a in enumerate(norms.tolist()):
            single = CEL0(alpha=0.4, norms=[a]).prox(z[:, i : i + 1], step)
            torch.testing.assert_close(p[:, i : i + 1], single, rtol=0, atol=0)
            if step * a * a >= 1:  # exact prox is the l0 hard threshold at sqrt(2 alpha step)
                l0 = L0(alpha=0.4).prox(z[:, i], step)
                torch.testing.assert_close(p[:, i], l0, rtol=0, atol=0)
    with pytest.raises(ValueError, match="4 norms but z has 3"):
        op.prox(z[:, :3], 0.1)


# --------------------------------------------------------------------------------------------
# group l2,1
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("positive", [False, True])
def test_group_l21_matches_2d_grid(positive: bool) -> None:
    op = GroupL21(alpha=0.6, groups=2, positive=positive)
    step = 1.5
    ax = torch.linspace(-3.5, 3.5, 701, dtype=F64)  # spacing 0.01
    U = torch.cartesian_prod(ax, ax)  # (G, 2)
    pen = step * op.value(U)
    g = torch.Generator().manual_seed(2)
    zs = torch.cat(
        [torch.rand(12, 2, generator=g, dtype=F64) * 6 - 3, torch.zeros(1, 2, dtype=F64)]
    )
    p = op.prox(zs, step)
    for z, pz in zip(zs, p, strict=True):
        f = 0.5 * ((U - z) ** 2).sum(-1) + pen
        i = f.argmin()
        f_p = 0.5 * ((pz - z) ** 2).sum() + step * op.value(pz)
        assert f_p <= f[i] + 1e-12
        assert (pz - U[i]).abs().max() <= 0.011


def test_group_l21_block_soft_threshold_and_step_per_row() -> None:
    op = GroupL21(alpha=0.5, groups=3)
    g = torch.Generator().manual_seed(3)
    z = torch.randn(5, 12, generator=g, dtype=F64)
    steps = torch.tensor([[0.1], [0.5], [1.0], [2.0], [4.0]], dtype=F64)
    p = op.prox(z, steps)
    for b in range(5):
        t = float(steps[b])
        torch.testing.assert_close(p[b], op.prox(z[b], t), rtol=1e-15, atol=0)
        for grp in range(4):
            zg, pg = z[b, 3 * grp : 3 * grp + 3], p[b, 3 * grp : 3 * grp + 3]
            nz = torch.linalg.vector_norm(zg)
            if nz <= 0.5 * t:
                assert (pg == 0).all()
            else:  # optimality: u - z + t alpha u / ||u|| = 0
                res = pg - zg + 0.5 * t * pg / torch.linalg.vector_norm(pg)
                assert res.abs().max() < 1e-12
    with pytest.raises(ValueError, match="one step per row"):
        op.prox(z, torch.ones(5, 12, dtype=F64))


def test_group_l21_shape_errors_name_both_numbers() -> None:
    op = GroupL21(alpha=1.0, groups=4)
    with pytest.raises(ValueError, match=r"\(10\).*group size 4"):
        op.prox(torch.ones(2, 10), 1.0)
    with pytest.raises(ValueError, match=r"\(6\).*group size 4"):
        op.value(torch.ones(6))


# --------------------------------------------------------------------------------------------
# projections against exhaustive search
# --------------------------------------------------------------------------------------------


def best_over_supports(z: torch.Tensor, supports, positive: bool) -> float:
    """min ||u - z||^2 over u supported on each candidate support (u >= 0 if positive)."""
    target = z.clamp(min=0) if positive else z
    best = math.inf
    for s in supports:
        u = torch.zeros_like(z)
        u[list(s)] = target[list(s)]
        best = min(best, float(((u - z) ** 2).sum()))
    return best


def tie_heavy_rows(n_rows: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ints = torch.randint(-3, 4, (n_rows, n), generator=g).to(F64)  # many ties, some zeros
    cont = torch.randn(n_rows, n, generator=g, dtype=F64)
    return torch.cat([ints, cont])


@pytest.mark.parametrize("positive", [False, True])
@pytest.mark.parametrize("k", [1, 2, 3, 5, 6, 8])
def test_topk_is_the_projection(k: int, positive: bool) -> None:
    op = TopK(k=k, positive=positive)
    z = tie_heavy_rows(20, 6, seed=k)
    p = op.project(z)
    kk = min(k, 6)
    for zr, pr in zip(z, p, strict=True):
        best = best_over_supports(zr, itertools.combinations(range(6), kk), positive)
        assert float(((pr - zr) ** 2).sum()) == pytest.approx(best, abs=1e-12)
        eligible = int((zr > 0).sum()) if positive else int((zr != 0).sum())
        assert int((pr != 0).sum()) == min(k, eligible)  # exactly k even with ties
        keep = pr != 0
        assert (pr[keep] == zr[keep]).all()
    assert op.contains(p).all()
    assert (op.value(p) == 0).all()


@pytest.mark.parametrize("positive", [False, True])
@pytest.mark.parametrize("k", [1, 2])
def test_batch_topk_is_the_projection(k: int, positive: bool) -> None:
    op = BatchTopK(k=k, positive=positive)
    for z in tie_heavy_rows(10, 6, seed=10 + k).reshape(10, 2, 2, 3):  # B = 2 x 2, n = 3
        p = op.project(z)
        assert p.shape == z.shape
        flat_z, flat_p = z.reshape(-1), p.reshape(-1)
        budget = 4 * k
        best = best_over_supports(flat_z, itertools.combinations(range(12), budget), positive)
        assert float(((flat_p - flat_z) ** 2).sum()) == pytest.approx(best, abs=1e-12)
        eligible = int((flat_z > 0).sum()) if positive else int((flat_z != 0).sum())
        assert int((flat_p != 0).sum()) == min(budget, eligible)
        assert op.contains(p).shape == (2, 2) and op.contains(p).all()


def test_batch_topk_exact_count_with_ties_and_budget_is_global() -> None:
    z = torch.ones(8, 16)
    z[0] = 5.0  # one row with large entries takes more than k of the budget
    p = BatchTopK(k=3).project(z)
    assert int((p != 0).sum()) == 24
    assert int((p[0] != 0).sum()) == 16
    assert not BatchTopK(k=3).contains(z).any()
    assert torch.isinf(BatchTopK(k=3).value(z)).all()


def _lowest_index_top(key: torch.Tensor, k: int) -> torch.Tensor:
    """Brute-force tie rule: a stable sort by decreasing key, the first k (1-D positions)."""
    return torch.sort(-key, stable=True).indices[:k].sort().values


@pytest.mark.parametrize("positive", [False, True])
def test_selections_break_ties_by_lowest_index(positive: bool) -> None:
    # one rule shared with the fused encoders (sparsecode.core.select): lowest index first
    from sparsecode.core.select import top_budget

    z = tie_heavy_rows(12, 10, seed=3)[:12]  # integers in [-3, 3]: ties everywhere
    key = z if positive else z.abs()

    def kept(rows, cols):
        v = z[rows, cols]
        keep = v > 0 if positive else v != 0
        return rows[keep], cols[keep]

    rows, cols = TopK(4, positive=positive).support(z)
    ref = [(r, int(c)) for r in range(12) for c in _lowest_index_top(key[r], 4)]
    r_ref, c_ref = kept(*map(torch.tensor, zip(*ref, strict=True)))
    assert torch.equal(rows, r_ref) and torch.equal(cols, c_ref)

    rows, cols = BatchTopK(3, positive=positive).support(z)
    flat = _lowest_index_top(key.reshape(-1), 36)
    assert torch.equal(torch.stack([rows, cols]), torch.stack(kept(flat // 10, flat % 10)))

    rows, cols = FeatureChoice(2, positive=positive).support(z)
    per_col = [(int(r), c) for c in range(10) for r in _lowest_index_top(key[:, c], 2)]
    r_ref, c_ref = map(torch.tensor, zip(*sorted(per_col), strict=True))
    assert torch.equal(torch.stack([rows, cols]), torch.stack(kept(r_ref, c_ref)))

    order = torch.randperm(120, generator=torch.Generator().manual_seed(0))
    got = top_budget(key.reshape(-1), 30, order=order)  # ties by the smallest order instead
    ref = torch.sort(-key.reshape(-1)[order.argsort()], stable=True).indices[:30]
    assert torch.equal(got.sort().values, order.argsort()[ref].sort().values)


@pytest.mark.parametrize("positive", [False, True])
@pytest.mark.parametrize("m", [1, 2])
def test_feature_choice_is_the_projection(m: int, positive: bool) -> None:
    op = FeatureChoice(m=m, positive=positive)
    for z in tie_heavy_rows(10, 8, seed=20 + m).reshape(20, 4, 2):  # 4 rows, 2 features
        p = op.project(z)
        per_col = [list(itertools.combinations(range(4), m)) for _ in range(2)]
        best = math.inf
        for choice in itertools.product(*per_col):
            mask = torch.zeros(4, 2, dtype=torch.bool)
            for col, rows in enumerate(choice):
                mask[list(rows), col] = True
            target = z.clamp(min=0) if positive else z
            u = torch.where(mask, target, torch.zeros_like(z))
            best = min(best, float(((u - z) ** 2).sum()))
        assert float(((p - z) ** 2).sum()) == pytest.approx(best, abs=1e-12)
        for col in range(2):
            eligible = int((z[:, col] > 0).sum()) if positive else int((z[:, col] != 0).sum())
            assert int((p[:, col] != 0).sum()) == min(m, eligible)
        assert op.contains(p).all()


@pytest.mark.parametrize(("shape", "n", "m", "dim"), [((2, 8), 2, 4, -1), ((8, 2), 1, 4, 0)])
def test_nm_is_the_projection(shape, n: int, m: int, dim: int) -> None:
    op = NM(n=n, m=m, dim=dim)
    # all supports: product over groups of the n-subsets of each group
    size = shape[dim]
    other = shape[1 - (dim % 2)]
    groups = [range(g * m, (g + 1) * m) for g in range(size // m)]
    per_group = [list(itertools.combinations(gr, n)) for gr in groups]
    masks = []
    for choice in itertools.product(*per_group):
        mask = torch.zeros(size, dtype=torch.bool)
        mask[[i for c in choice for i in c]] = True
        masks.append(mask)
    masks = torch.stack(masks)  # (S, size)
    for z in tie_heavy_rows(6, 16, seed=30).reshape(12, *shape):
        p = op.project(z)
        zt = z.movedim(dim, -1)  # (other, size); each line is independent
        pt = p.movedim(dim, -1)
        for line in range(other):
            cand = torch.where(masks, zt[line], torch.zeros_like(zt[line]))
            best = float(((cand - zt[line]) ** 2).sum(-1).min())
            assert float(((pt[line] - zt[line]) ** 2).sum()) == pytest.approx(best, abs=1e-12)
            for gr in groups:
                seg_z, seg_p = zt[line, list(gr)], pt[line, list(gr)]
                assert int((seg_p != 0).sum()) == min(n, int((seg_z != 0).sum()))
        assert op.contains(p).all()
        assert (op.value(p) == 0).all()


@pytest.mark.parametrize(("n", "m"), [(1, 4), (2, 4), (3, 4), (4, 8), (5, 16)])
def test_nm_sorting_network_equals_topk_selection(n: int, m: int) -> None:
    # continuous data takes the sorting-network threshold; ties (quantised weights) the
    # exact top-k path: both must give the selection of topk over each group
    gen = torch.Generator().manual_seed(n * 100 + m)
    for z in (torch.randn(37, 4 * m, generator=gen),
              torch.randint(-2, 3, (37, 4 * m), generator=gen).float()):
        g = z.reshape(37, 4, m)
        idx = g.abs().topk(n, dim=-1).indices
        ref = torch.zeros_like(g).scatter(-1, idx, g.gather(-1, idx)).reshape(z.shape)
        out = NM(n, m).project(z)
        if bool((g.abs().unsqueeze(-1) == g.abs().unsqueeze(-2)).sum((-1, -2)).gt(m).any()):
            assert NM(n, m).contains(out).all()  # ties: any n of the tied entries may win
            assert float(((out - z) ** 2).sum()) == pytest.approx(float(((ref - z) ** 2).sum()))
        else:
            assert torch.equal(out, ref)


def test_nm_contains_and_errors() -> None:
    op = NM(2, 4)
    z = torch.tensor([[1.0, 2.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0]])
    assert not op.contains(z).item()
    assert torch.isinf(op.value(z)).all()
    assert op.contains(op.project(z)).item()
    with pytest.raises(ValueError, match=r"\(6\).*m=4"):
        op.project(torch.ones(3, 6))
    with pytest.raises(ValueError, match=r"\(3\).*m=4"):
        NM(1, 4, dim=0).project(torch.ones(3, 8))
    for n, m in [(2, 2), (3, 2), (0, 4)]:
        with pytest.raises(ValueError, match="n"):
            NM(n, m)


@pytest.mark.parametrize("positive", [False, True])
def test_jump_per_feature_threshold(positive: bool) -> None:
    theta = torch.tensor([0.5, 1.0, 2.0], dtype=F64)
    op = Jump(theta, positive=positive)
    z = torch.tensor([[0.4, 1.5, 2.0], [-0.6, -1.0, 3.0], [0.6, -2.5, 1.9]], dtype=F64)
    key = z if positive else z.abs()
    want = torch.where(key > theta, z, torch.zeros_like(z))
    torch.testing.assert_close(op.project(z), want, rtol=0, atol=0)
    torch.testing.assert_close(op.prox(z, 123.0), want, rtol=0, atol=0)
    if positive:
        torch.testing.assert_close(
            want, torch.tensor([[0, 1.5, 0], [0, 0, 3.0], [0.6, 0, 0]], dtype=F64)
        )
    else:
        torch.testing.assert_close(
            want, torch.tensor([[0, 1.5, 0], [-0.6, 0, 3.0], [0.6, -2.5, 0]], dtype=F64)
        )
    assert (op.value(z) == 0).all() and op.value(z).shape == (3,)
    assert not op.contains(z).any()
    assert op.contains(want).all()
    # the threshold is kept by reference: a learned parameter stays live
    param = torch.nn.Parameter(torch.full((3,), 0.1))
    jp = Jump(param)
    with torch.no_grad():
        param.fill_(10.0)
    assert (jp.project(z.float()) == 0).all()


# --------------------------------------------------------------------------------------------
# encode: the projection as one encoder step, against the dense projection
# --------------------------------------------------------------------------------------------

_THETA = torch.linspace(0.0, 0.8, 11, dtype=F64)


@pytest.mark.parametrize("op", [
    TopK(3, positive=True), TopK(3), BatchTopK(2, positive=True), BatchTopK(2),
    FeatureChoice(2, positive=True), FeatureChoice(k=2, positive=True), FeatureChoice(3),
    NM(1, 11), Jump(0.3), Jump(0.3, positive=False), Jump(_THETA),
], ids=repr)
def test_encode_equals_the_dense_projection_values_and_gradients(op) -> None:
    """``encode`` + ``project_pairs`` (fused kernels or the dense fallback) give exactly the
    nonzeros of ``project((x - b_dec) W^T + b_enc)``, and the same gradients."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 5, generator=g, dtype=F64, requires_grad=True)
    W = torch.randn(11, 5, generator=g, dtype=F64, requires_grad=True)
    b = torch.randn(11, generator=g, dtype=F64, requires_grad=True)
    c = torch.randn(5, generator=g, dtype=F64, requires_grad=True)
    w = torch.randn(9, 11, generator=g, dtype=F64)
    rows, cols, pre = op.encode(x, W, b, c)
    vals = op.project_pairs(pre, cols)
    got = torch.zeros(9, 11, dtype=F64).index_put((rows, cols), vals)
    want = op.project((x - c) @ W.T + b)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert (rows.diff() >= 0).all()  # grouped by row
    params = (x, W, b, c)
    for a, e in zip(torch.autograd.grad((got * w).sum(), params),
                    torch.autograd.grad((want * w).sum(), params), strict=True):
        torch.testing.assert_close(a, e)


def test_jump_straight_through_estimator_on_pairs_and_dense() -> None:
    """With ``bandwidth``, the threshold gets the JumpReLU paper's gradient: ``-(theta / eps)``
    per entry in the window ``|z - theta| < eps / 2`` for the code, ``-1 / eps`` for the L0
    indicator; pairs (from ``encode``, kept from ``cut = theta - eps / 2``) and dense agree."""
    eps = 0.2
    theta = torch.tensor([0.3, 0.5], dtype=F64, requires_grad=True)
    op = Jump(theta, bandwidth=eps)
    z = torch.tensor([[0.25, 0.45], [0.41, 0.7], [0.1, 0.58]], dtype=F64)
    code = op.project(z)
    torch.testing.assert_close(code.detach(), torch.tensor([[0, 0], [0.41, 0.7], [0, 0.58]],
                                                           dtype=F64))
    (g_code,) = torch.autograd.grad(code.sum(), theta)
    # in the window: 0.25 (feature 0); 0.45 and 0.58 (feature 1); not 0.41, 0.1 or 0.7
    torch.testing.assert_close(g_code, torch.tensor([-0.3 / eps, -2 * 0.5 / eps], dtype=F64))
    (g_l0,) = torch.autograd.grad(op.indicator(z).sum(), theta)
    torch.testing.assert_close(g_l0, torch.tensor([-1 / eps, -2 / eps], dtype=F64))
    torch.testing.assert_close(op.cut, theta.detach() - eps / 2)
    rows, cols = (z > op.cut).nonzero(as_tuple=True)
    pre = z[rows, cols]
    (g_pairs,) = torch.autograd.grad(op.project_pairs(pre, cols).sum(), theta)
    torch.testing.assert_close(g_pairs, g_code)
    with pytest.raises(ValueError, match="positive=True"):
        Jump(0.1, positive=False, bandwidth=0.1)
    with pytest.raises(ValueError, match="bandwidth"):
        Jump(0.1, bandwidth=0.0)


def test_feature_choice_batch_relative_budget() -> None:
    op = FeatureChoice(k=3, positive=True)
    assert op.budget(50, 40) == 4 and op.budget(10, 40) == 1  # ceil(k B / n), at least 1
    z = torch.randn(50, 40, generator=torch.Generator().manual_seed(0))
    assert ((op.project(z) != 0).sum(0) <= 4).all()
    with pytest.raises(ValueError, match="exactly one of m"):
        FeatureChoice(2, k=3)
    with pytest.raises(ValueError, match="k must be"):
        FeatureChoice(k=0)


# --------------------------------------------------------------------------------------------
# values
# --------------------------------------------------------------------------------------------


def test_values_match_hand_formulas() -> None:
    z = torch.tensor([[4.0, -9.0, 0.0], [1.0, 0.25, -0.0]], dtype=F64)
    torch.testing.assert_close(L1(2.0).value(z), torch.tensor([26.0, 2.5], dtype=F64))
    torch.testing.assert_close(L0(2.0).value(z), torch.tensor([4.0, 4.0], dtype=F64))
    torch.testing.assert_close(Lq(2.0, 0.5).value(z), torch.tensor([10.0, 3.0], dtype=F64))
    # MCP alpha=1, gamma=3: 0.5 - 0.25/6, 2 - 4/6, 3/2
    v = MCP(1.0, 3.0).value(torch.tensor([0.5, -2.0, 5.0], dtype=F64))
    assert v.item() == pytest.approx(0.5 - 0.25 / 6 + 2 - 4 / 6 + 1.5, abs=1e-14)
    # SCAD alpha=1, gamma=3.7: 0.5, (14.8 - 4 - 1) / 5.4, 4.7 / 2
    v = SCAD(1.0, 3.7).value(torch.tensor([0.5, 2.0, -5.0], dtype=F64))
    assert v.item() == pytest.approx(0.5 + 9.8 / 5.4 + 2.35, abs=1e-14)
    # CEL0 alpha=0.5, norms (1, 2): 0.5 - 0.5 (0.5 - 1)^2, and |1| > 1/2 gives alpha
    v = CEL0(0.5, norms=[1.0, 2.0]).value(torch.tensor([0.5, 1.0], dtype=F64))
    assert v.item() == pytest.approx(0.375 + 0.5, abs=1e-14)
    # group l2,1: 0.5 (||(3, 4)|| + ||(0, -1)||)
    v = GroupL21(0.5, groups=2).value(torch.tensor([3.0, 4.0, 0.0, -1.0], dtype=F64))
    assert v.item() == pytest.approx(3.0, abs=1e-14)


@pytest.mark.parametrize(
    "op",
    [
        L1(1.0, positive=True),
        L0(1.0, positive=True),
        Lq(1.0, 0.5, positive=True),
        MCP(1.0, positive=True),
        SCAD(1.0, positive=True),
        CEL0(1.0, positive=True),
        GroupL21(1.0, groups=2, positive=True),
        TopK(3, positive=True),
    ],
    ids=repr,
)
def test_positive_value_is_inf_on_negative_rows(op: Operator) -> None:
    z = torch.tensor([[1.0, 0.5, 0.0, 2.0], [1.0, -0.5, 0.0, 2.0]], dtype=F64)
    v = op.value(z)
    assert math.isfinite(v[0].item()) and v[1].item() == math.inf


@pytest.mark.parametrize(
    ("op", "breaks"),
    [
        (MCP(0.7, 2.5), [0.7 * 2.5]),
        (SCAD(0.7, 3.7), [0.7, 0.7 * 3.7]),
        (CEL0(0.5, norms=[2.0]), [0.5]),
    ],
    ids=repr,
)
def test_nonconvex_penalties_are_continuous(op: Operator, breaks) -> None:
    for b in breaks:
        x = torch.tensor([[b - 1e-9], [b + 1e-9]], dtype=F64)
        left, right = op.value(x).tolist()
        assert left == pytest.approx(right, abs=1e-8)


# --------------------------------------------------------------------------------------------
# dtypes, devices, per-row steps
# --------------------------------------------------------------------------------------------

PENALTIES = [
    L1(0.6),
    L0(0.6),
    Lq(0.6, 0.5),
    Lq(0.6, 2.0 / 3.0),
    Lq(0.6, 0.3),
    MCP(0.6),
    SCAD(0.6),
    CEL0(0.6),
    GroupL21(0.6, groups=2),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", PENALTIES, ids=repr)
def test_float32_matches_float64_in_objective(op: Operator, device: str) -> None:
    g = torch.Generator().manual_seed(4)
    z = (torch.randn(64, 8, generator=g, dtype=F64) * 3).to(device)
    for step in (0.5, 1.0):
        p64 = op.prox(z, step)
        p32 = op.prox(z.float(), step)
        assert p32.dtype == torch.float32 and p64.dtype == F64
        assert p32.device == z.device

        f32 = 0.5 * ((p32.double() - z) ** 2).sum(-1) + step * op.value(p32.double())
        f64 = 0.5 * ((p64 - z) ** 2).sum(-1) + step * op.value(p64)
        # ties near thresholds may flip, but the float32 answer is as good to float32 accuracy
        assert (f32 <= f64 + 1e-5 * (1 + f64.abs())).all()
        close = (p32.double() - p64).abs() <= 1e-5 * (1 + p64.abs())
        assert close.float().mean() > 0.95


@pytest.mark.parametrize("op", PENALTIES, ids=repr)
def test_per_row_tensor_step(op: Operator) -> None:
    g = torch.Generator().manual_seed(5)
    z = torch.randn(4, 6, generator=g, dtype=F64) * 3
    steps = torch.tensor([[0.2], [0.7], [1.0], [3.0]], dtype=F64)
    p = op.prox(z, steps)
    assert p.shape == z.shape
    for b in range(4):
        torch.testing.assert_close(p[b], op.prox(z[b], float(steps[b])), rtol=1e-14, atol=0)
    # a float32 step tensor with float64 z keeps z's dtype
    assert op.prox(z, steps.float()).dtype == F64


def test_zero_alpha_and_zero_step_are_identity() -> None:
    z = torch.linspace(-3, 3, 13, dtype=F64)
    for op in [Lq(0.0, 0.5), Lq(0.0, 2.0 / 3.0), Lq(0.0, 0.4), MCP(0.0), SCAD(0.0), CEL0(0.0)]:
        torch.testing.assert_close(op.prox(z, 1.0), z, rtol=0, atol=0)
    for op in [Lq(1.0, 0.5), Lq(1.0, 2.0 / 3.0), Lq(1.0, 0.4), MCP(1.0), SCAD(1.0), CEL0(1.0)]:
        torch.testing.assert_close(op.prox(z, 0.0), z, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# validation and factory
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: L1(-1.0), "alpha"),
        (lambda: Lq(1.0, 1.0), "q must be"),
        (lambda: Lq(1.0, 0.0), "q must be"),
        (lambda: Lq(1.0, -0.5), "q must be"),
        (lambda: Lq(1.0, 0.5, method="bisect"), "method"),
        (lambda: Lq(float("nan"), 0.5), "alpha"),
        (lambda: MCP(1.0, gamma=1.0), "gamma"),
        (lambda: MCP(-1.0), "alpha"),
        (lambda: SCAD(1.0, gamma=2.0), "gamma"),
        (lambda: SCAD(1.0, gamma=float("inf")), "gamma"),
        (lambda: CEL0(1.0, norms=[1.0, 0.0]), "norms"),
        (lambda: CEL0(1.0, norms=[[1.0]]), "norms"),
        (lambda: GroupL21(1.0, groups=0), "groups"),
        (lambda: GroupL21(1.0, groups=2.5), "groups"),
        (lambda: TopK(0), "k"),
        (lambda: BatchTopK(-1), "k"),
        (lambda: FeatureChoice(0), "m"),
        (lambda: NM(4, 4), "n < m"),
        (lambda: Jump(-0.1), "threshold"),
        (lambda: Jump(torch.tensor([0.1, -1.0])), "threshold"),
        (lambda: make_operator("lasso", alpha=1.0), "known operators: .*group_l21"),
    ],
)
def test_invalid_parameters_raise(build, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build()


def test_factory_builds_every_operator() -> None:
    names = {
        "l1": {"alpha": 1.0},
        "l0": {"alpha": 1.0},
        "lq": {"alpha": 1.0, "q": 0.5},
        "mcp": {"alpha": 1.0, "gamma": 3.0},
        "scad": {"alpha": 1.0},
        "cel0": {"alpha": 1.0},
        "group_l21": {"alpha": 1.0, "groups": 2},
        "topk": {"k": 2},
        "batch_topk": {"k": 2},
        "feature_choice": {"m": 2},
        "nm": {"n": 2, "m": 4},
        "jump": {"threshold": 0.5},
    }
    assert set(OPERATORS) == set(names)
    for name, params in names.items():
        op = make_operator(name, **params)
        assert type(op) is OPERATORS[name]
        assert isinstance(op, Operator)
        assert all(getattr(op, k) == v for k, v in params.items())
    assert isinstance(make_operator("TopK", k=1), TopK)
    for cls in (TopK, BatchTopK, FeatureChoice, NM, Jump):
        assert issubclass(cls, Projection)
    assert not GroupL21.separable and not BatchTopK.separable and not NM.separable
    assert not any(c.convex for c in (L0, Lq, MCP, SCAD, CEL0)) and GroupL21.convex


# --------------------------------------------------------------------------------------------
# property tests
# --------------------------------------------------------------------------------------------

ALL_OPS = [
    *PENALTIES,
    L1(0.6, positive=True),
    Lq(0.6, 0.8, positive=True),
    MCP(0.6, positive=True),
    SCAD(0.6, positive=True),
    GroupL21(0.6, groups=2, positive=True),
    TopK(2),
    TopK(3, positive=True),
    BatchTopK(2),
    BatchTopK(1, positive=True),
    FeatureChoice(2),
    FeatureChoice(1, positive=True),
    NM(1, 2),
    Jump(0.5),
    Jump(0.5, positive=False),
]
PROJECTIONS = [op for op in ALL_OPS if isinstance(op, Projection)]
SEPARABLE = [op for op in ALL_OPS if op.separable and not isinstance(op, Projection)]


@st.composite
def tensors(draw) -> torch.Tensor:
    lead = draw(st.lists(st.integers(1, 4), min_size=0, max_size=2))
    n = draw(st.sampled_from([2, 4, 6]))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    arr = draw(arrays(dtype, (*lead, n), elements=st.floats(-10, 10, width=32)))
    return torch.from_numpy(arr)


@settings(max_examples=60, deadline=None)
@given(z=tensors(), op=st.sampled_from(ALL_OPS), step=st.sampled_from([0.1, 1.0, 4.0]))
def test_prox_preserves_shape_and_dtype(z: torch.Tensor, op: Operator, step: float) -> None:
    p = op.prox(z, step)
    assert p.shape == z.shape and p.dtype == z.dtype
    assert torch.isfinite(p).all()
    if getattr(op, "positive", False):
        assert (p >= 0).all()
    v = op.value(p)
    assert v.shape == z.shape[:-1] and v.dtype == z.dtype
    assert torch.isfinite(v).all()  # the prox lands where the penalty is finite


@settings(max_examples=60, deadline=None)
@given(z=tensors(), op=st.sampled_from(PROJECTIONS))
def test_projections_are_idempotent(z: torch.Tensor, op: Projection) -> None:
    p = op.project(z)
    assert torch.equal(op.project(p), p)
    assert op.contains(p).all()
    assert torch.equal(op.prox(z, 0.3), p)


@settings(max_examples=60, deadline=None)
@given(
    z=tensors(),
    op=st.sampled_from(SEPARABLE),
    step=st.sampled_from([0.1, 1.0, 4.0]),
    shift=st.floats(0, 5),
)
def test_separable_prox_is_monotone(z: torch.Tensor, op: Operator, step: float, shift) -> None:
    g = torch.Generator().manual_seed(int(z.numel()))
    delta = (torch.rand(z.shape, generator=g) * shift).to(z.dtype)
    lo, hi = op.prox(z, step), op.prox(z + delta, step)
    eps = torch.finfo(z.dtype).eps
    assert (lo <= hi + 8 * eps * (1 + hi.abs())).all()


@pytest.mark.parametrize("positive", [False, True])
@pytest.mark.parametrize("k", [2, 6, 9])  # below, at and above the row width
def test_topk_projection_gradient_is_the_kept_mask(k: int, positive: bool) -> None:
    """The gradient of ``TopK.project`` passes through the kept entries only, on the selection
    path (k < width) and on the shortcut where every entry fits (k >= width)."""
    z = tie_heavy_rows(10, 6, seed=k).requires_grad_(True)
    w = torch.randn(z.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    p = TopK(k, positive=positive).project(z)
    (p * w).sum().backward()
    kept = p.detach() != 0
    torch.testing.assert_close(z.grad, torch.where(kept, w, 0.0))


# --------------------------------------------------------------------------------------------
# ColumnTopK: group top-k over whole columns of a batch (structured pruning)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k,groups", [(1, 1), (2, 1), (3, 1), (1, 2), (2, 2), (1, 3)])
def test_column_topk_is_the_projection(k: int, groups: int) -> None:
    from sparsecode.core.projections import ColumnTopK

    z = torch.randn(3, 6, dtype=F64, generator=torch.Generator().manual_seed(k + 10 * groups))
    op = ColumnTopK(k, groups)
    n_groups = 6 // groups
    best, best_dist = None, math.inf  # exhaustive search over the kept group sets
    for keep in itertools.combinations(range(n_groups), min(k, n_groups)):
        cols = [c for g in keep for c in range(g * groups, (g + 1) * groups)]
        u = torch.zeros_like(z)
        u[:, cols] = z[:, cols]
        d = float((u - z).square().sum())
        if d < best_dist:
            best, best_dist = u, d
    torch.testing.assert_close(op.project(z), best)
    assert bool(op.contains(op.project(z)).all())
    assert op.contains(z).shape == (3,) and not bool(op.contains(z).any())
    torch.testing.assert_close(op.project(op.project(z)), op.project(z))
    torch.testing.assert_close(op.prox(z, 0.3), op.project(z))


def test_column_topk_ties_and_errors() -> None:
    from sparsecode.core.projections import ColumnTopK

    z = torch.tensor([[1.0, -1.0, 1.0, 0.5]])
    assert ColumnTopK(2).kept_groups(z).tolist() == [0, 1]  # ties: lowest index kept
    torch.testing.assert_close(ColumnTopK(9).project(z), z)
    with pytest.raises(ValueError, match="not divisible by the group size 3"):
        ColumnTopK(1, 3).project(z)
    with pytest.raises(ValueError, match="k"):
        ColumnTopK(0)
