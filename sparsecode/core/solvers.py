"""Batched sparse-coding solvers: ISTA/FISTA, IHT, exact Lasso, OMP.

All solvers minimise, for every row ``x`` of a batch at once,

    F(z) = 0.5 * ||x - z D||^2 + penalty(z)          (atoms are the rows of D)

where ``penalty`` is an operator of :mod:`sparsecode.core.operators`. The smooth part is a
:class:`LeastSquares` problem, given either by the data ``(X, D)`` or only through the Gram matrix
``G = D D^T`` and the correlations ``C = X D^T`` (what layer-wise pruning has). Work is split into
row chunks so memory stays bounded (``progress=True`` shows a progress bar over them), rows that
have converged drop out of the batch, and every solver returns per-row iteration counts.

Example
-------
>>> import torch
>>> from sparsecode.core.operators import L1
>>> from sparsecode.core.solvers import LeastSquares, fista
>>> D = torch.eye(3, dtype=torch.float64)
>>> X = torch.tensor([[3.0, 0.5, -2.0]], dtype=torch.float64)
>>> fista(LeastSquares.from_data(X, D), L1(1.0)).codes.round(decimals=6)
tensor([[ 2.,  0., -1.]], dtype=torch.float64)
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .operators import L1, Operator, Projection
from .sparse import SparseCodes

__all__ = [
    "LeastSquares",
    "SolverResult",
    "lipschitz",
    "ista",
    "fista",
    "iht",
    "lars",
    "lasso",
    "omp",
    "support_lstsq",
]

#: Default bound on the working memory of one chunk, in bytes.
CHUNK_BYTES = 64 * 2**20
#: OMP's working set per chunk (smaller: it streams over its storage once per selected atom).
OMP_CHUNK_BYTES = 20 * 2**20


@dataclass
class SolverResult:
    """Codes (dense tensor, or :class:`SparseCodes` for OMP) and iterations used per row."""

    codes: Tensor | SparseCodes
    n_iter: Tensor  # (N,) int64


class LeastSquares:
    """The smooth term ``f(z) = 0.5 ||x - z D||^2`` of each row, batched.

    Build it from data with :meth:`from_data` or from second moments with :meth:`from_gram`.
    Gradients use whichever is cheaper: ``(z D - X) D^T`` costs ``2 K n`` per row, ``z G - C``
    costs ``K^2``.
    """

    def __init__(
        self,
        gram: Tensor,
        cov: Tensor | None,
        sq_norms: Tensor | None,
        X: Tensor | None = None,
        D: Tensor | None = None,
    ):
        self.gram = gram
        self.X = X
        self.D = D
        self._cov = cov
        self._sq_norms = sq_norms
        self.use_data = X is not None and D is not None and 2 * D.shape[1] < D.shape[0]

    @classmethod
    def from_data(cls, X: Tensor, D: Tensor, gram: Tensor | None = None) -> LeastSquares:
        """Problem for signals ``X (N, n)`` and dictionary ``D (K, n)``; ``gram`` may be given."""
        if gram is None:
            gram = D @ D.T
        return cls(gram, None, None, X, D)

    @classmethod
    def from_gram(
        cls, gram: Tensor, cov: Tensor, sq_norms: Tensor | None = None
    ) -> LeastSquares:
        """Problem given by ``gram = D D^T (K, K)`` and ``cov = X D^T (N, K)``.

        ``sq_norms`` (``||x||^2`` per row) only shifts objective values; it is needed for OMP's
        residual tolerance and for reporting objectives.
        """
        return cls(gram, cov, sq_norms)

    @property
    def n_rows(self) -> int:
        return self.X.shape[0] if self.X is not None else self._cov.shape[0]

    @property
    def n_atoms(self) -> int:
        return self.gram.shape[0]

    @property
    def max_support(self) -> int:
        """Most atoms that can be linearly independent: ``min(n_atoms, n_features)``."""
        K = self.n_atoms
        return min(K, self.D.shape[1]) if self.D is not None else K

    def lipschitz(self) -> float:
        """Lipschitz constant of the gradient, ``||D D^T||_2`` (from the smaller Gram)."""
        D = self.D
        return lipschitz(D.T @ D if D is not None and D.shape[1] < D.shape[0] else self.gram)

    def new_codes(self, width: int | None = None, dtype: torch.dtype | None = None) -> Tensor:
        """Zeros of shape ``(n_rows, width or n_atoms)`` on the problem's device and dtype."""
        ref = self.X if self.X is not None else self.cov
        return torch.zeros(self.n_rows, width or self.n_atoms, dtype=dtype or ref.dtype,
                           device=ref.device)

    @property
    def cov(self) -> Tensor:
        """Correlations ``X D^T`` (computed on first use)."""
        if self._cov is None:
            self._cov = self.X @ self.D.T
        return self._cov

    @property
    def sq_norms(self) -> Tensor:
        if self._sq_norms is None:
            if self.X is None:
                raise ValueError("this problem was built without ||x||^2 (pass sq_norms)")
            self._sq_norms = (self.X * self.X).sum(dim=1)
        return self._sq_norms

    def rows(self, index: Tensor | slice) -> LeastSquares:
        """The sub-problem of the given rows (shares the dictionary / Gram)."""
        def pick(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[index]

        return LeastSquares(self.gram, pick(self._cov), pick(self._sq_norms), pick(self.X), self.D)

    def chunks(self, size: int, progress: bool = False) -> Iterator[tuple[slice, LeastSquares]]:
        """Consecutive row blocks of at most ``size`` rows (a tqdm bar over rows if asked)."""
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.n_rows, unit="rows", leave=False)
        for start in range(0, self.n_rows, size):
            sl = slice(start, min(start + size, self.n_rows))
            yield sl, self.rows(sl)
            if bar is not None:
                bar.update(sl.stop - sl.start)
        if bar is not None:
            bar.close()

    def grad(self, z: Tensor) -> Tensor:
        if self.use_data:
            return (z @ self.D - self.X) @ self.D.T
        return z @ self.gram - self.cov

    def forward_step(self, z: Tensor, step: float) -> Tensor:
        """The gradient step ``z - step * grad f(z)``, its products fused into ``addmm`` calls.

        Same value as ``z - step * self.grad(z)`` with two fewer passes over ``(N, K)`` arrays:
        the proximal-gradient loops are memory-bound on these passes at sparse-coding sizes.
        """
        if self.use_data:
            r = torch.addmm(self.X, z, self.D, beta=-1)  # z D - X
            return torch.addmm(z, r, self.D.T, alpha=-step)
        return torch.addmm(torch.add(z, self.cov, alpha=step), z, self.gram, alpha=-step)

    def loss(self, z: Tensor) -> Tensor:
        """``0.5 ||x - z D||^2`` per row."""
        if self.X is not None and self.D is not None:
            r = self.X - z @ self.D
            return 0.5 * (r * r).sum(dim=1)
        return 0.5 * self.sq_norms - (z * self.cov).sum(1) + 0.5 * ((z @ self.gram) * z).sum(1)


def lipschitz(gram: Tensor, n_iter: int = 50, seed: int = 0, rtol: float = 1e-4) -> float:
    """Largest eigenvalue of the PSD matrix ``gram`` by power iteration (+1% safety margin).

    This is the Lipschitz constant of ``grad f`` for ``f = 0.5||x - z D||^2`` with ``gram = D D^T``
    (``D^T D`` has the same value and is smaller when atoms outnumber features). Stops early once
    the estimate moves by less than ``rtol`` (relative) over 5 iterations.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(gram.shape[0], 1, generator=gen, dtype=gram.dtype).to(gram.device)
    tiny = torch.finfo(gram.dtype).tiny
    lam_old = 0.0
    for i in range(1, n_iter + 1):
        w = gram @ v
        norm = torch.linalg.vector_norm(w)
        v = w / norm.clamp(min=tiny)
        if i % 5 == 0:  # host sync only every few iterations
            lam = float(norm)
            if lam == 0.0 or lam - lam_old <= rtol * lam:
                break
            lam_old = lam
    return float(torch.linalg.vector_norm(gram @ v)) * 1.01


def _default_chunk(n_atoms: int, itemsize: int, per_row: int = 10) -> int:
    """Rows per chunk so that ``per_row`` row-vectors of ``n_atoms`` fit in ``CHUNK_BYTES``."""
    return max(64, CHUNK_BYTES // max(per_row * n_atoms * itemsize, 1))


def _step_size(problem: LeastSquares, step: float | None) -> float:
    if step is not None:
        if not step > 0:
            raise ValueError(f"step must be > 0, got {step!r}")
        return float(step)
    L = problem.lipschitz()
    return 1.0 / L if L > 0 else 1.0


def fista(
    problem: LeastSquares,
    penalty: Operator,
    *,
    fast: bool = True,
    max_iter: int = 1000,
    tol: float = 1e-6,
    init: Tensor | None = None,
    step: float | None = None,
    chunk_size: int | None = None,
    check_every: int = 10,
    progress: bool = False,
) -> SolverResult:
    """Proximal gradient (ISTA, or FISTA with adaptive restart) for any penalty or projection.

    A row stops when ``||z_t - z_{t-1}|| <= tol * max(||z_t||, 1)`` (checked every
    ``check_every`` iterations) or after ``max_iter`` iterations.

    * Convex penalties: FISTA with the gradient restart of O'Donoghue & Candes (2015), tested
      every ``_RESTART_EVERY`` iterations.
    * Nonconvex penalties and projections (l0, lq, MCP, SCAD, top-k, N:M ...): every accepted step
      decreases the objective; when the momentum step would increase it, the row restarts from a
      plain proximal-gradient step, so the objective is monotone (ISTA with ``fast=False`` is
      monotone by majorisation).

    ``init`` warm-starts the codes. ``step`` defaults to ``1 / L`` with ``L`` from
    :func:`lipschitz`.
    """
    _check_iter(max_iter, tol)
    out = problem.new_codes()
    n_iter = problem.new_codes(1, torch.long).squeeze(1)
    if problem.n_rows == 0:
        return SolverResult(out, n_iter)
    t_step = _step_size(problem, step)
    monotone = not getattr(penalty, "convex", True)
    chunk = chunk_size or _default_chunk(problem.n_atoms, out.element_size())
    for sl, sub in problem.chunks(chunk, progress):
        z0 = None if init is None else init[sl]
        out[sl], n_iter[sl] = _fista_chunk(
            sub, penalty, fast, max_iter, tol, z0, t_step, monotone, check_every
        )
    return SolverResult(out, n_iter)


def ista(problem: LeastSquares, penalty: Operator, **kwargs) -> SolverResult:
    """Plain proximal gradient: :func:`fista` with ``fast=False``."""
    return fista(problem, penalty, fast=False, **kwargs)


def iht(
    problem: LeastSquares, projection: Projection, *, fast: bool = False, **kwargs
) -> SolverResult:
    """Iterative hard thresholding: projected gradient onto any projection (top-k, N:M, ...).

    With ``fast=True`` it uses momentum with the monotone safeguard of :func:`fista`.
    """
    if not isinstance(projection, Projection):
        raise TypeError(f"iht needs a Projection (TopK, NM, ...), got {type(projection).__name__}")
    return fista(problem, projection, fast=fast, **kwargs)


def _check_iter(max_iter: int, tol: float) -> None:
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol!r}")


#: FISTA tests the gradient-restart condition every this many iterations: testing it every
#: iteration costs ~20% of an iteration at sparse-coding sizes (two extra passes over the codes),
#: and testing every 5th raised the iteration counts to convergence by at most 8% (1e-9 tolerance
#: on image patches and Gaussian dictionaries; no restart at all: 4-9x more iterations).
_RESTART_EVERY = 5


def _fista_chunk(
    prob: LeastSquares,
    penalty: Operator,
    fast: bool,
    max_iter: int,
    tol: float,
    init: Tensor | None,
    step: float,
    monotone: bool,
    check_every: int,
) -> tuple[Tensor, Tensor]:
    z_out = prob.new_codes()
    n, dev = z_out.shape[0], z_out.device
    it_out = torch.full((n,), max_iter, dtype=torch.long, device=dev)
    z = torch.zeros_like(z_out) if init is None else init.to(z_out).clone()
    y = z.clone()
    # Nesterov's momentum (t_0 = 1, t_{k+1} = (1 + sqrt(1 + 4 t_k^2)) / 2) as a table indexed by
    # each row's iterations since its last restart: fewer tiny per-iteration ops than updating t.
    coefs = fista_momentum(max_iter, z.dtype, dev)
    since = torch.zeros(n, 1, dtype=torch.long, device=dev)
    rows = torch.arange(n, device=dev)
    F_z = prob.loss(z) + penalty.value(z) if monotone else None
    for it in range(1, max_iter + 1):
        z_new = penalty.prox(prob.forward_step(y, step), step)
        if monotone:
            F_new = prob.loss(z_new) + penalty.value(z_new)
            worse = F_new > F_z
            if fast and bool(worse.any()):
                # momentum overshot: fall back to a proximal-gradient step from z (monotone)
                z_plain = penalty.prox(prob.forward_step(z, step), step)
                F_plain = prob.loss(z_plain) + penalty.value(z_plain)
                z_new = torch.where(worse[:, None], z_plain, z_new)
                F_new = torch.where(worse, F_plain, F_new)
                since.masked_fill_(worse[:, None], 0)
            F_z = F_new
        diff = z_new - z
        if fast:
            if not monotone and it % _RESTART_EVERY == 0:
                # gradient-based adaptive restart
                since.masked_fill_(torch.linalg.vecdot(y - z_new, diff, dim=1)[:, None] > 0, 0)
            y = torch.addcmul(z_new, coefs[since], diff)
            since += 1
        else:
            y = z_new
        done = None
        if it % check_every == 0 or it == max_iter:
            scale = torch.linalg.vector_norm(z_new, dim=1).clamp(min=1.0)
            done = torch.linalg.vector_norm(diff, dim=1) <= tol * scale
        z = z_new
        if done is not None and bool(done.any()):
            z_out[rows[done]] = z[done]
            it_out[rows[done]] = it
            keep = ~done
            if not bool(keep.any()):
                return z_out, it_out
            rows, z, y, since = rows[keep], z[keep], y[keep], since[keep]
            F_z = F_z[keep] if F_z is not None else None
            prob = prob.rows(keep)
    z_out[rows] = z
    return z_out, it_out


def fista_momentum(max_iter: int, dtype: torch.dtype = torch.float64, device=None) -> Tensor:
    """FISTA's momentum coefficients ``(t_k - 1) / t_{k+1}``, ``k = 0 .. max_iter``, ``t_0 = 1``.

    Step ``k`` (counted from the last restart) extrapolates ``y = z_k + coef[k] (z_k - z_{k-1})``;
    ``coef[0] = 0``. Used by :func:`fista` and by the momentum layers of :class:`sparsecode.LISTA`.

    >>> from sparsecode.core.solvers import fista_momentum
    >>> fista_momentum(3)
    tensor([0.0000, 0.2818, 0.4340, 0.5311], dtype=torch.float64)
    """
    t = [1.0]
    for _ in range(max_iter + 1):
        t.append(0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t[-1] ** 2)))
    return torch.tensor([(t[k] - 1.0) / t[k + 1] for k in range(max_iter + 1)], dtype=dtype,
                        device=device)


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
    if not alpha >= 0:
        raise ValueError(f"alpha must be >= 0, got {alpha!r}")
    res = lars(problem, alpha=alpha, lasso=True, positive=positive, max_iter=max_iter,
               chunk_size=chunk_size, progress=progress)
    codes, n_iter = res.codes, res.n_iter
    if problem.n_rows == 0:
        return res
    bad = (~_kkt_ok(problem, codes, alpha, positive)).nonzero().squeeze(1)
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
    if not alpha >= 0:
        raise ValueError(f"alpha must be >= 0, got {alpha!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")
    K = problem.n_atoms
    cap = problem.max_support
    k_stop = None
    if n_nonzero_coefs is not None:
        if n_nonzero_coefs < 1 or n_nonzero_coefs > K:
            raise ValueError(
                f"n_nonzero_coefs must be in [1, n_atoms={K}], got {n_nonzero_coefs}"
            )
        k_stop = int(n_nonzero_coefs)
    out = problem.new_codes()
    n_iter = problem.new_codes(1, torch.long).squeeze(1)
    chunk = chunk_size or _default_chunk(K, out.element_size(), per_row=7)
    for sl, sub in problem.chunks(chunk, progress):
        out[sl], n_iter[sl] = _lars_chunk(sub, float(alpha), cap, k_stop, lasso, positive,
                                          max_iter)
    return SolverResult(out, n_iter)


def _lars_chunk(prob, alpha, cap, k_stop, lasso, positive, max_iter):
    G = prob.gram
    D = prob.D if prob.use_data else None
    rho = prob.cov.clone()  # residual correlations x D^T - z G
    n, K = rho.shape
    dev, dt = rho.device, rho.dtype
    eps = torch.finfo(dt).eps
    inf = torch.tensor(math.inf, dtype=dt, device=dev)
    one = torch.ones((), dtype=dt, device=dev)
    out = torch.zeros(n, K, dtype=dt, device=dev)
    steps_out = torch.zeros(n, dtype=torch.long, device=dev)

    lam, j0 = (rho if positive else rho.abs()).max(dim=1)
    # active-set storage, grown on demand; ``cap`` is the rank bound on the active set size
    max_width = cap if k_stop is None else min(cap, k_stop)
    width = min(max_width, 16)
    st = {
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
    n_live = int(st["live"].sum())
    if n_live:
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
        lam, rho = st["lam"][:, None], st["rho"]
        guard = 10 * eps * lam
        # next entry: an inactive correlation reaches +lam at (lam - rho) / (1 - a) or -lam at
        # (lam + rho) / (1 + a). Off the active set |rho| <= lam, and the first of the two
        # (both valid when |a| < 1; only one when |a| >= 1) is the side sigma = sign(rho - lam a),
        # so one formula covers both. Clamping the denominator at eps turns "never" into a step
        # too long to be chosen; rounding-level candidates (<= guard) are not events.
        if positive:
            num, den = lam - rho, 1 - a
        else:
            sigma = torch.sign(torch.addcmul(rho, lam, a, value=-1))
            num = torch.addcmul(lam, sigma, rho, value=-1)
            den = torch.addcmul(one, sigma, a, value=-1)
        g = num.div_(den.clamp_(min=eps))
        g.masked_fill_((g <= guard).logical_or_(st["active"]), math.inf)
        g_add, j_add = g.min(dim=1)
        g_add.masked_fill_(count >= cap, math.inf)  # no room: the active set spans the space
        if lasso:
            slot_ok = torch.arange(s, device=dev)[None, :] < count[:, None]
            gd = -st["zA"][:, :s] / d
            gd = torch.where(slot_ok & (d != 0) & (gd > guard), gd, inf)
            g_drop, p_drop = gd.min(dim=1)
        else:
            g_drop, p_drop = torch.full_like(g_add, math.inf), torch.zeros_like(j_add)
        g_end = st["lam"] - alpha
        gam = torch.where(live, torch.minimum(torch.minimum(g_add, g_drop), g_end), 0.0)
        st["zA"][:, :s] += gam[:, None] * d
        st["lam"] = st["lam"] - gam
        st["rho"] = rho.addcmul_(gam[:, None], a, value=-1)
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


def omp(
    problem: LeastSquares,
    *,
    n_nonzero_coefs: int | None = None,
    tol: float | None = None,
    selection: str = "omp",
    chunk_size: int | None = None,
    progress: bool = False,
) -> SolverResult:
    """Batched Orthogonal Matching Pursuit in the Gram domain.

    Picks, for every row at once, the atom most correlated with the residual, then updates the
    residual correlations through an incremental Gram-Schmidt (Cholesky) factor of the selected
    atoms, so no per-row least-squares problem is ever formed. Stops a row after
    ``n_nonzero_coefs`` atoms, when its squared residual norm is ``<= tol``, or when the next atom
    is linearly dependent on the selected ones (whichever comes first). Returns
    :class:`SparseCodes`; ``n_iter`` is the number of atoms selected per row.

    ``selection="omp"``: the atom most correlated with the residual; the same rule and result as
    scikit-learn's ``orthogonal_mp_gram`` (which, unlike this function, selects one atom even when
    ``||x||^2 <= tol`` already). ``selection="ormp"``: order-recursive matching pursuit (also called
    orthogonal least squares; what SPAMS' ``omp`` does): the atom whose addition most reduces the
    residual after re-projection, i.e. the largest ``alpha_j^2 / ||d_j^perp||^2`` with ``d_j^perp``
    the part of atom ``j`` orthogonal to the selected ones. Slightly more work per step, lower
    residuals at equal sparsity.
    """
    if n_nonzero_coefs is None and tol is None:
        raise ValueError("omp needs n_nonzero_coefs or tol")
    if selection not in ("omp", "ormp"):
        raise ValueError(f"selection must be 'omp' or 'ormp', got {selection!r}")
    K = problem.n_atoms
    kmax = problem.max_support if n_nonzero_coefs is None else int(n_nonzero_coefs)
    if kmax < 1 or kmax > K:
        raise ValueError(f"n_nonzero_coefs must be in [1, n_atoms={K}], got {n_nonzero_coefs}")
    if tol is not None and not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol!r}")
    values = problem.new_codes(kmax)
    indices = problem.new_codes(kmax, torch.long)
    n_iter = problem.new_codes(1, torch.long).squeeze(1)
    # ~20 MB working sets measured fastest on CPU caches (2048 rows of 256 atoms in float32)
    per_row = values.element_size() * (min(kmax, 8) + 2) * K
    chunk = chunk_size or max(64, OMP_CHUNK_BYTES // per_row)
    for sl, sub in problem.chunks(chunk, progress):
        values[sl], indices[sl], n_iter[sl] = _omp_chunk(sub, kmax, tol, selection == "ormp")
    return SolverResult(SparseCodes(values, indices, K), n_iter)


def _omp_chunk(prob: LeastSquares, kmax: int, tol: float | None, ormp: bool = False):
    """OMP for one chunk; see :func:`omp`.

    With ``q_1..q_n`` the Gram-Schmidt basis of the selected atoms, only ``u_i = D q_i`` (the
    correlations of every atom with ``q_i``) is stored. Selecting atom ``j`` gives
    ``L[n, i] = u_i[j]``, ``L[n, n]^2 = G[j, j] - sum_i u_i[j]^2`` (Cholesky of ``G_SS``),
    ``u_n = (G[j] - sum_i L[n, i] u_i) / L[n, n]``, ``<q_n, x> = alpha[j] / L[n, n]`` and the
    residual correlations update as ``alpha -= <q_n, x> u_n``. Codes solve ``L^T z = c``.
    An atom already selected has (numerically) zero residual correlation and ``L[n, n] = 0``,
    so the linear-dependence test also stops rows that would pick one twice.

    For ORMP, ``perp[j] = G[j, j] - sum_i u_i[j]^2 = ||d_j^perp||^2`` is kept up to date too.

    Storage for ``u`` and ``L`` starts narrow and doubles on demand (with a tolerance most rows
    stop long before ``kmax``); finished rows are dropped from the working set in batches.
    """
    G = prob.gram
    n, K = prob.n_rows, prob.n_atoms
    cov = prob.cov
    dev, dt = cov.device, cov.dtype
    diag = torch.diagonal(G)
    eps, tiny = torch.finfo(dt).eps, torch.finfo(dt).tiny
    width = min(kmax, 8)
    L = torch.eye(width, dtype=dt, device=dev).repeat(n, 1, 1)
    c = torch.zeros(n, width, dtype=dt, device=dev)
    idx = torch.zeros(n, width, dtype=torch.long, device=dev)
    count = torch.zeros(n, dtype=torch.long, device=dev)
    # working set: rows still selecting atoms (compacted when half of them have finished)
    rows = torch.arange(n, device=dev)
    if tol is None:
        alpha, resid = cov.clone(), None  # residual correlations, squared residual norms
    else:  # rows already within tolerance select nothing
        rows = (prob.sq_norms > tol).nonzero().squeeze(1)
        alpha, resid = cov[rows], prob.sq_norms[rows]
    U = torch.empty(rows.numel(), width, K, dtype=dt, device=dev)
    score = torch.empty(rows.numel(), K, dtype=dt, device=dev)
    perp = diag.expand(rows.numel(), K).clone() if ormp else None
    live = torch.ones(rows.numel(), dtype=torch.bool, device=dev)
    n_live = int(live.sum())
    for step in range(kmax):
        if n_live == 0:
            break
        if n_live <= 0.5 * rows.numel():
            keep = live
            rows, alpha, U, live = rows[keep], alpha[keep], U[keep], live[keep]
            perp = perp[keep] if ormp else None
            resid = resid[keep] if resid is not None else None
        if step == width:
            new = min(kmax, 2 * width)
            U = F.pad(U, (0, 0, 0, new - width))
            L = F.pad(L, (0, new - width, 0, new - width))
            L[:, torch.arange(width, new), torch.arange(width, new)] = 1.0
            c = F.pad(c, (0, new - width))
            idx = F.pad(idx, (0, new - width))
            width = new
        m = rows.numel()
        if ormp:  # alpha^2 / ||d^perp||^2; selected or dependent atoms have perp ~ 0
            torch.mul(alpha, alpha, out=score[:m]).div_(perp.clamp(min=tiny))
            score[:m].masked_fill_(perp <= 1e2 * eps * diag, -1.0)
            j = score[:m].max(dim=1).indices
        else:
            j = torch.abs(alpha, out=score[:m]).max(dim=1).indices  # (max: ~2x faster than argmax)
        a_j = alpha.gather(1, j[:, None]).squeeze(1)
        w = G.index_select(0, j)
        if step:
            proj = U[:, :step].gather(2, j.view(m, 1, 1).expand(m, step, 1)).squeeze(2)
            if step <= 2:  # tiny batched matmuls are slow; two axpys are not
                for i in range(step):
                    w.addcmul_(proj[:, i : i + 1], U[:, i], value=-1)
            else:
                w = torch.baddbmm(w.unsqueeze(1), proj.unsqueeze(1), U[:, :step], alpha=-1)
                w = w.squeeze(1)
            norm2 = diag[j] - (proj * proj).sum(dim=1)
        else:
            proj, norm2 = None, diag[j].clone()
        ok = live & (norm2 > 1e2 * eps * diag[j]) & (a_j * a_j > tiny)
        lnn = torch.sqrt(torch.where(ok, norm2, 1.0))
        cn = torch.where(ok, a_j / lnn, 0.0)
        u = w.div_(lnn[:, None])
        alpha.addcmul_(cn[:, None], u, value=-1)
        U[:, step] = u
        if ormp:
            perp.addcmul_(u, u, value=-1)
        live = ok
        if resid is not None:
            resid = resid - cn * cn
            live = live & (resid > tol)
        r_ok = rows[ok]
        if proj is not None:
            L[r_ok, step, :step] = proj[ok]
        L[r_ok, step, step] = lnn[ok]
        c[r_ok, step] = cn[ok]
        idx[r_ok, step] = j[ok]
        count[r_ok] += 1
        n_live = int(live.sum())
    z = torch.linalg.solve_triangular(L.transpose(1, 2), c.unsqueeze(-1), upper=True).squeeze(-1)
    pad = kmax - width
    return F.pad(z, (0, pad)), F.pad(idx, (0, pad)), count


def support_lstsq(
    problem: LeastSquares,
    support: Tensor,
    *,
    init: Tensor | None = None,
    ridge: float = 0.0,
    max_iter: int = 200,
    tol: float = 1e-6,
) -> SolverResult:
    """Least squares restricted to a fixed support per row (the "debias" step after a support
    is chosen): ``min_z 0.5 ||x - z D||^2 + 0.5 ridge ||z||^2`` with ``z_j = 0`` off
    ``support`` (a boolean ``(N, K)`` mask).

    Batched conjugate gradient on the masked normal equations ``(G_SS + ridge I) z_S = c_S``:
    every iteration is one ``(N, K) @ (K, K)`` product for all rows, whatever their supports.
    ``init`` (zero off the support) warm-starts it. A row stops when its residual norm is
    ``<= tol * ||c_S||``; ``n_iter`` counts iterations per row.

    >>> import torch
    >>> G = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    >>> c = torch.tensor([[3.0, 3.0]], dtype=torch.float64)
    >>> keep = torch.tensor([[True, False]])
    >>> support_lstsq(LeastSquares.from_gram(G, c), keep).codes
    tensor([[1.5000, 0.0000]], dtype=torch.float64)
    """
    _check_iter(max_iter, tol)
    if not ridge >= 0:
        raise ValueError(f"ridge must be >= 0, got {ridge!r}")
    G, C = problem.gram, problem.cov
    if support.shape != C.shape:
        raise ValueError(f"support has shape {tuple(support.shape)}, expected {tuple(C.shape)}")
    m = support.to(C.dtype)
    z = torch.zeros_like(C) if init is None else init.to(C) * m

    def apply(p: Tensor) -> Tensor:
        return (p @ G + ridge * p) * m

    r = C * m - apply(z)
    p = r.clone()
    rr = (r * r).sum(dim=1)
    stop = (tol * torch.linalg.vector_norm(C * m, dim=1)) ** 2
    n_iter = torch.zeros(C.shape[0], dtype=torch.long, device=C.device)
    live = rr > stop
    tiny = torch.finfo(C.dtype).tiny
    for _ in range(max_iter):
        if not bool(live.any()):
            break
        Ap = apply(p)
        a = torch.where(live, rr / (p * Ap).sum(dim=1).clamp(min=tiny), 0.0)
        z.addcmul_(a[:, None], p)
        r.addcmul_(a[:, None], Ap, value=-1)
        rr_new = (r * r).sum(dim=1)
        n_iter += live.long()
        p = r + (rr_new / rr.clamp(min=tiny))[:, None] * p
        rr = rr_new
        live = live & (rr > stop)
    return SolverResult(z, n_iter)
