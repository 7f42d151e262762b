"""Exact Lasso and least-angle regression by a batched homotopy in the Gram domain.

:func:`lars` follows every row's Lasso (or LAR) path at once with rank-one updates of
``G_AA^{-1}``; :func:`lasso` runs it to ``alpha``, re-solves rows whose KKT conditions fail on
their support (Cholesky) and finishes any left with FISTA. Exact, like scikit-learn's
``lasso_lars`` / ``lasso_cd``, at a handful of ``(rows x atoms)`` operations per path step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .kernels.cpu_solvers import lars_gram, numba_available
from .operators import L1
from .problem import LeastSquares, SolverResult, _default_chunk
from .proximal import fista
from .select import row_max


def lasso(
    problem: LeastSquares,
    alpha: float,
    *,
    positive: bool = False,
    max_iter: int = 1000,
    tol: float = 1e-6,
    chunk_size: int | None = None,
    progress: bool = False,
) -> SolverResult:
    """Exact Lasso ``0.5||x - zD||^2 + alpha ||z||_1`` per row (optionally with ``z >= 0``).

    Runs the batched homotopy of :func:`lars` and checks the KKT conditions of every row. Rows
    that fail (rounding on long paths, degenerate ties, ``max_iter`` reached) are re-solved on their
    support with a Cholesky factorisation; rows that still fail are finished by :func:`fista`
    warm-started from the homotopy's codes, to relative accuracy ``tol``. ``n_iter`` counts
    homotopy steps plus any FISTA iterations.
    """
    _check_alpha_iter(alpha, max_iter)
    codes, n_iter, ok = _homotopy(problem, float(alpha), None, True, positive, max_iter,
                                  chunk_size, progress)
    if problem.n_rows == 0:
        return SolverResult(codes, n_iter)
    if ok is None:  # the compiled path tests each row as it finishes
        ok = _kkt_ok(problem, codes, alpha, positive)
    bad = (~ok).nonzero().squeeze(1)
    if bad.numel():
        exact, ok = _support_solve(problem.rows(bad), codes[bad], alpha, positive)
        codes[bad[ok]] = exact[ok]
        bad = bad[~ok]
    if bad.numel():
        fix = fista(problem.rows(bad), L1(alpha, positive=positive), max_iter=max_iter, tol=tol,
                    init=codes[bad], chunk_size=chunk_size)
        codes[bad] = fix.codes
        n_iter[bad] += fix.n_iter
    return SolverResult(codes, n_iter)


def _kkt_ok(prob: LeastSquares, z: Tensor, alpha: float, positive: bool) -> Tensor:
    """Per row: do the Lasso optimality conditions hold (to rounding)?

    ``c_j - (z G)_j = alpha sign(z_j)`` on the support and ``|c_j - (z G)_j| <= alpha`` off it
    (``<= alpha`` without the absolute value when ``positive``).
    """
    corr = -prob.grad(z)
    slack = 1e3 * torch.finfo(z.dtype).eps * (alpha + corr.abs().amax(dim=1, keepdim=True))
    on = z != 0
    on_err = torch.where(on, (corr - alpha * torch.sign(z)).abs(), 0.0)
    off = torch.where(on, 0.0, corr if positive else corr.abs())
    return ((on_err <= slack) & (off <= alpha + slack)).all(dim=1)


def lars(
    problem: LeastSquares,
    *,
    alpha: float = 0.0,
    n_nonzero_coefs: int | None = None,
    lasso: bool = True,
    positive: bool = False,
    max_iter: int = 1000,
    chunk_size: int | None = None,
    progress: bool = False,
) -> SolverResult:
    """Batched least-angle regression / Lasso homotopy in the Gram domain.

    Follows, for every row at once, the piecewise-linear path of the Lasso solution as the
    penalty ``lam`` decreases from ``max|x D^T|`` to ``alpha`` (Efron et al. 2004; Osborne et al.
    2000). On the active set ``A`` with signs ``s`` the codes move along ``d = G_AA^{-1} s``; each
    step goes to the next event: an atom's correlation reaches ``lam`` (it enters), an active
    code crosses zero (it leaves: the Lasso modification, when ``lasso=True``), or ``lam``
    reaches ``alpha``. ``G_AA^{-1}`` is kept up to date by rank-one updates and downdates, so a
    step costs ``O(|A| K)`` per row.

    With ``lasso=False`` this is plain LAR (no atom leaves) and ``n_nonzero_coefs`` stops a row
    when the next atom would enter, as scikit-learn's ``Lars(n_nonzero_coefs=...)`` does.
    ``max_iter`` bounds the number of steps per row. ``n_iter`` is the number of steps taken.
    """
    _check_alpha_iter(alpha, max_iter)
    K = problem.n_atoms
    k_stop = None
    if n_nonzero_coefs is not None:
        if n_nonzero_coefs < 1 or n_nonzero_coefs > K:
            raise ValueError(
                f"n_nonzero_coefs must be in [1, n_atoms={K}], got {n_nonzero_coefs}"
            )
        k_stop = int(n_nonzero_coefs)
    out, n_iter, _ = _homotopy(problem, float(alpha), k_stop, lasso, positive, max_iter,
                               chunk_size, progress)
    return SolverResult(out, n_iter)


def _check_alpha_iter(alpha: float, max_iter: int) -> None:
    if not alpha >= 0:
        raise ValueError(f"alpha must be >= 0, got {alpha!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")


def _homotopy(problem: LeastSquares, alpha: float, k_stop: int | None, lasso: bool,
              positive: bool, max_iter: int, chunk_size: int | None, progress: bool
              ) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(codes, steps, kkt_ok)`` of :func:`lars` chunk by chunk: compiled per signal on a CPU
    (which also tests each row's optimality: ``kkt_ok``), batched in torch elsewhere
    (``kkt_ok`` None)."""
    cap = problem.max_support
    out = problem.new_codes()
    n_iter = problem.new_codes(1, torch.long).squeeze(1)
    chunk = chunk_size or _default_chunk(problem.n_atoms, out.element_size(), per_row=7)
    if not (out.device.type == "cpu" and numba_available()):
        for sl, sub in problem.chunks(chunk, progress):
            out[sl], n_iter[sl] = _lars_chunk(sub, alpha, cap, k_stop, lasso, positive, max_iter)
        return out, n_iter, None
    ok = torch.zeros(problem.n_rows, dtype=torch.bool)
    G = problem.gram.to(out.dtype).detach().numpy()
    for sl, sub in problem.chunks(chunk, progress):
        codes, steps, good = lars_gram(G, sub.cov.detach().numpy(), alpha, cap, k_stop, lasso,
                                       positive, max_iter)
        out[sl], n_iter[sl], ok[sl] = (torch.from_numpy(a) for a in (codes, steps, good))
    return out, n_iter, ok


def _lars_start(rho: Tensor, alpha: float, width: int, positive: bool) -> dict:
    """Working state of the homotopy for rows with residual correlations ``rho`` (nothing
    active yet; ``width`` active slots, grown on demand)."""
    n, K = rho.shape
    dev, dt = rho.device, rho.dtype
    lam = (rho if positive else rho.abs()).amax(dim=1)
    return {
        "rows": torch.arange(n, device=dev),
        "live": lam > alpha,
        "rho": rho,
        "lam": lam,
        "Minv": torch.zeros(n, width, width, dtype=dt, device=dev),  # G_AA^{-1}, zero-padded
        "zA": torch.zeros(n, width, dtype=dt, device=dev),
        "sA": torch.zeros(n, width, dtype=dt, device=dev),
        "d": torch.zeros(n, width, dtype=dt, device=dev),  # direction G_AA^{-1} s_A
        "idx": torch.zeros(n, width, dtype=torch.long, device=dev),
        "count": torch.zeros(n, dtype=torch.long, device=dev),
        "active": torch.zeros(n, K, dtype=torch.bool, device=dev),
        "steps": torch.zeros(n, dtype=torch.long, device=dev),
    }


def _lars_entry(st: dict, a: Tensor, positive: bool) -> tuple[Tensor, Tensor]:
    """Step length to the next entry of an inactive atom, and that atom, per row.

    An inactive correlation reaches ``+lam`` at ``(lam - rho) / (1 - a)`` or ``-lam`` at
    ``(lam + rho) / (1 + a)``. Off the active set ``|rho| <= lam``, and the first of the two
    (both valid when ``|a| < 1``; only one when ``|a| >= 1``) is the side
    ``sigma = sign(rho - lam a)``, so one formula covers both. Clamping the denominator at eps
    turns "never" into a step too long to be chosen; rounding-level candidates (``<= guard``)
    are not events."""
    lam, rho = st["lam"][:, None], st["rho"]
    eps = torch.finfo(rho.dtype).eps
    if positive:
        num, den = lam - rho, 1 - a
    else:
        one = torch.ones((), dtype=rho.dtype, device=rho.device)
        sigma = torch.sign(torch.addcmul(rho, lam, a, value=-1))
        num = torch.addcmul(lam, sigma, rho, value=-1)
        den = torch.addcmul(one, sigma, a, value=-1)
    g = num.div_(den.clamp_(min=eps))
    g.masked_fill_((g <= 10 * eps * lam).logical_or_(st["active"]), math.inf)
    return g.min(dim=1)


def _lars_exit(st: dict, d: Tensor, s: int) -> tuple[Tensor, Tensor]:
    """Step length to the next zero crossing of an active code, and its slot, per row."""
    guard = 10 * torch.finfo(d.dtype).eps * st["lam"][:, None]
    slot_ok = torch.arange(s, device=d.device)[None, :] < st["count"][:, None]
    gd = -st["zA"][:, :s] / d
    gd = torch.where(slot_ok & (d != 0) & (gd > guard), gd, math.inf)
    return gd.min(dim=1)


def _lars_chunk(prob, alpha, cap, k_stop, lasso, positive, max_iter):
    G = prob.gram
    D = prob.D if prob.use_data else None
    n, K = prob.cov.shape
    out = torch.zeros(n, K, dtype=prob.cov.dtype, device=prob.cov.device)
    steps_out = torch.zeros(n, dtype=torch.long, device=out.device)
    # active-set storage, grown on demand; ``cap`` is the rank bound on the active set size
    max_width = cap if k_stop is None else min(cap, k_stop)
    width = min(max_width, 16)
    st = _lars_start(prob.cov.clone(), alpha, width, positive)  # rho = x D^T - z G
    n_live = int(st["live"].sum())
    if n_live:
        j0 = row_max(st["rho"] if positive else st["rho"].abs())[1]
        _lars_add(st, st["live"], j0, G, positive)
    for _ in range(max_iter):
        if n_live == 0:
            break
        if n_live < 0.75 * st["rows"].numel():  # compact: drop finished rows
            keep = st["live"]
            for key in st:
                st[key] = st[key][keep]
        live, count = st["live"], st["count"]
        s = int(count.max())
        if s == width and width < max_width:  # make room for one more atom
            width = min(max_width, 2 * width)
            _lars_widen(st, width)
        d = st["d"][:, :s]
        d_full = torch.zeros_like(st["rho"]).scatter_add_(1, st["idx"][:, :s], d)
        # effect of the direction on every correlation: d G, through D when that is cheaper
        a = (d_full @ D) @ D.T if D is not None else d_full @ G
        g_add, j_add = _lars_entry(st, a, positive)
        g_add.masked_fill_(count >= cap, math.inf)  # no room: the active set spans the space
        if lasso:
            g_drop, p_drop = _lars_exit(st, d, s)
        else:
            g_drop, p_drop = torch.full_like(g_add, math.inf), torch.zeros_like(j_add)
        g_end = st["lam"] - alpha
        gam = torch.where(live, torch.minimum(torch.minimum(g_add, g_drop), g_end), 0.0)
        st["zA"][:, :s] += gam[:, None] * d
        st["lam"] = st["lam"] - gam
        st["rho"] = st["rho"].addcmul_(gam[:, None], a, value=-1)
        st["steps"] += live.long()
        end = live & (g_end <= torch.minimum(g_add, g_drop))
        drop = live & ~end & (g_drop < g_add)
        add = live & ~end & ~drop
        if k_stop is not None:
            end |= add & (count >= k_stop)
            add &= ~end
        if bool(drop.any()):
            r = drop.nonzero().squeeze(1)
            _lars_drop(st, r, p_drop[r])
        if bool(add.any()):
            end |= _lars_add(st, add, j_add, G, positive)  # dependent atom: stop the row
        if bool(end.any()):
            _lars_finish(st, end, out, steps_out)
            n_live = int(st["live"].sum())
    _lars_finish(st, st["live"], out, steps_out)
    return out, steps_out


def _lars_widen(st: dict, width: int) -> None:
    """Grow the zero-padded active-set storage to ``width`` slots."""
    m, w = st["Minv"].shape[:2]
    pad = width - w
    st["Minv"] = F.pad(st["Minv"], (0, pad, 0, pad))
    for key in ("zA", "sA", "idx", "d"):
        st[key] = F.pad(st[key], (0, pad))


def _lars_finish(st: dict, mask: Tensor, out: Tensor, steps_out: Tensor) -> None:
    """Write the codes of the masked rows and take them out of the live set."""
    r = st["rows"][mask]
    z = torch.zeros(r.numel(), out.shape[1], dtype=out.dtype, device=out.device)
    out[r] = z.scatter_add_(1, st["idx"][mask], st["zA"][mask])
    steps_out[r] = st["steps"][mask]
    st["live"] = st["live"] & ~mask


def _lars_add(st: dict, add: Tensor, j: Tensor, G: Tensor, positive: bool) -> Tensor:
    """Append atom ``j[i]`` to the active set of every row ``i`` with ``add[i]``.

    Rank-one update of ``G_AA^{-1}`` done with masks over all working rows (no gathers): with
    ``b = G[A, j]``, ``u = G_AA^{-1} b`` and ``sigma = G[j, j] - b.u`` the new inverse is
    ``[[M + u u^T / sigma, -u / sigma], [-u^T / sigma, 1 / sigma]]``, one rank-one update of the
    zero-padded ``M``. Returns the rows whose atom is linearly dependent on their active set
    (``sigma ~ 0``); those are not updated.
    """
    count = st["count"]
    s = min(int(count.max()) + 1, st["Minv"].shape[1])
    ar = torch.arange(s, device=j.device)
    occupied = ar[None, :] < count[:, None]
    b = torch.where(occupied, G[st["idx"][:, :s], j[:, None]], 0.0)  # G[A, j]
    Minv = st["Minv"][:, :s, :s]
    u = torch.bmm(Minv, b[:, :, None]).squeeze(2)
    gjj = G[j, j]
    sigma = gjj - (b * u).sum(dim=1)
    dep = add & (sigma <= 1e3 * torch.finfo(sigma.dtype).eps * gjj)
    add = add & ~dep
    sigma = torch.where(add, sigma, 1.0)
    e = (ar[None, :] == count[:, None]) & add[:, None]  # one-hot new slot (rows that add)
    # [[M + u u^T/sigma, -u/sigma], [-u^T/sigma, 1/sigma]] = M + (u - e)(u - e)^T / sigma
    v = u - e.to(u.dtype)
    Minv.addcmul_(v[:, :, None] * (add / sigma)[:, None, None], v[:, None, :])
    sign = torch.ones_like(sigma) if positive else torch.sign(st["rho"].gather(1, j[:, None])[:, 0])
    # the direction follows without a matrix product: with M e = 0 and v.e = -1,
    # M_new (s + sign e) = d + v (u.s - sign) / sigma
    coef = ((u * st["sA"][:, :s]).sum(dim=1) - sign) * (add / sigma)
    st["d"][:, :s].addcmul_(coef[:, None], v)
    st["sA"][:, :s] = torch.where(e, sign[:, None], st["sA"][:, :s])
    st["zA"][:, :s] = torch.where(e, 0.0, st["zA"][:, :s])
    st["idx"][:, :s] = torch.where(e, j[:, None], st["idx"][:, :s])
    r = add.nonzero().squeeze(1)
    st["active"][r, j[r]] = True
    st["count"] += add.long()
    return dep


def _lars_drop(st: dict, r: Tensor, p: Tensor) -> None:
    """Remove active slot ``p`` from rows ``r``: move it last, downdate G_AA^{-1}, new direction."""
    last = st["count"][r] - 1
    m, s = r.numel(), int(last.max()) + 1
    ar, rm = torch.arange(s, device=r.device), torch.arange(m, device=r.device)
    perm = ar.repeat(m, 1)
    perm[rm, p], perm[rm, last] = last, p
    Minv = st["Minv"][r[:, None, None], perm[:, :, None], perm[:, None, :]]  # (m, s, s)
    col = Minv[rm, :, last]
    Minv -= col[:, :, None] * col[:, None, :] / col[rm, last][:, None, None]
    Minv[rm, last, :] = 0.0
    Minv[rm, :, last] = 0.0
    st["Minv"][r[:, None, None], ar[None, :, None], ar[None, None, :]] = Minv
    for key in ("zA", "sA", "idx"):
        st[key][r[:, None], ar[None, :]] = st[key][r[:, None], perm]
    st["active"][r, st["idx"][r, last]] = False
    for key in ("zA", "sA", "idx"):
        st[key][r, last] = 0
    st["count"][r] -= 1
    st["d"][r[:, None], ar[None, :]] = torch.bmm(Minv, st["sA"][r, :s, None]).squeeze(2)


def _support_solve(
    prob: LeastSquares, z: Tensor, alpha: float, positive: bool
) -> tuple[Tensor, Tensor]:
    """Solve the Lasso optimality system on each row's support of ``z``; check the KKT conditions.

    On the support ``S`` with signs ``s``: ``z_S = G_SS^{-1} (c_S - alpha s_S)`` (batched Cholesky,
    supports padded to the largest one). Returns the candidate codes and, per row, whether the
    candidate is optimal: signs agree and ``|c_j - (z G)_j| <= alpha`` off the support.
    """
    n, K = z.shape
    nnz = (z != 0).sum(dim=1)
    W = int(nnz.max().item()) if n else 0
    sign_ok = torch.ones(n, dtype=torch.bool, device=z.device)
    cand = torch.zeros_like(z)
    if W:
        idx = z.abs().topk(W, dim=1).indices  # slots past nnz are padding
        valid = torch.arange(W, device=z.device)[None, :] < nnz[:, None]
        idx = torch.where(valid, idx, torch.zeros_like(idx))
        signs = torch.ones_like(z[:, :W]) if positive else torch.sign(z.gather(1, idx))
        G = prob.gram[idx[:, :, None], idx[:, None, :]]  # (n, W, W)
        eye = torch.eye(W, dtype=z.dtype, device=z.device)
        G = torch.where(valid[:, :, None] & valid[:, None, :], G, eye)
        rhs = torch.where(valid, prob.cov.gather(1, idx) - alpha * signs, 0.0)
        chol, info = torch.linalg.cholesky_ex(G)
        zs = torch.cholesky_solve(rhs.unsqueeze(-1), chol).squeeze(-1)
        zs = torch.where(valid, zs, 0.0)
        sign_ok = ((zs * signs > 0) | ~valid).all(dim=1) & (info == 0)
        cand.scatter_add_(1, idx, zs)
    return cand, sign_ok & _kkt_ok(prob, cand, alpha, positive)
