"""Proximal-gradient solvers: ISTA / FISTA (any penalty of :mod:`sparsecode.core.operators`,
with restarts and monotone steps for nonconvex ones) and IHT (a projection as the penalty)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .operators import Operator, Projection
from .problem import LeastSquares, SolverResult, _check_iter, _default_chunk


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
