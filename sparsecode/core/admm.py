"""ADMM for least squares under a projection constraint: ``min 0.5 ||x - z D||^2, z in S``.

``S`` is any :class:`~sparsecode.core.projections.Projection` (per-row ``TopK``, a batch-wide
``BatchTopK`` budget, ``NM``, a fixed ``Support``); the problem is a
:class:`~sparsecode.core.problem.LeastSquares`, typically given by its Gram ``G`` and
correlations ``C`` (layer-wise pruning). Splitting ``z = u`` with ``u in S`` and the multiplier
``lam``, one iteration for all rows at once is

    z   <- (C - lam + rho u) (G + rho I)^-1      (the rows share G: one factorisation)
    u   <- P_S(z + lam / rho)
    lam <- lam + rho (z - u)

and ``u`` (always in ``S``) is the answer. Over-relaxation (``relax`` in ``(0, 2)``, Boyd et
al. 2011, section 3.4.3) puts ``relax z + (1 - relax) u`` in place of ``z`` in the last two
steps; ``relax=1.5`` lowers the pruning layer error by about 2% at no cost per iteration.
``(G + rho I)^-1`` is formed once per distinct ``rho`` and shared by the problems with the
same Gram (:class:`ShiftedGram`). Schedules:

* ``"fixed"``: ``rho`` constant (Boža 2024's weight update for a given mask uses this).
* ``"adaptive"``: ALPS' rule (Meng et al. 2024): every ``update_every`` iterations, multiply
  ``rho`` by 1.3 / 1.2 / 1.1 when more than 10% / 0.5% / any of the support changed; stop once
  the fraction of the support that changed is at most ``tol``. While the starting support has
  not moved at all, ``rho`` is divided by 5 instead (at most 3 times), as ALPS does, so that
  a start that is not a fixed point is left.
* ``"geometric"``: ``rho`` multiplied by ``growth ** update_every`` every ``update_every``
  iterations (a fixed-length schedule, ``max_iter`` iterations).

>>> import torch
>>> from sparsecode.core.projections import TopK
>>> from sparsecode.core.solvers import LeastSquares, support_lstsq
>>> G = torch.eye(3, dtype=torch.float64)
>>> prob = LeastSquares.from_gram(G, torch.tensor([[3.0, 0.5, -2.0]], dtype=torch.float64))
>>> keep = admm(prob, TopK(2)).codes != 0
>>> keep.tolist()
[[True, False, True]]
>>> support_lstsq(prob, keep).codes
tensor([[ 3.,  0., -2.]], dtype=torch.float64)
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from .problem import LeastSquares, SolverResult
from .projections import Projection

__all__ = ["SCHEDULES", "ShiftedGram", "admm"]

SCHEDULES = ("fixed", "adaptive", "geometric")


class ShiftedGram:
    """Products ``R (G + rho I)^-1`` for the rows of ``R``, the inverse formed once per ``rho``.

    Each distinct ``rho`` costs one Cholesky factorisation and inverse (``~K^3``); every product
    after that is one ``(N, K) @ (K, K)`` matmul. The inverses are cached (the most recent
    ``cache`` values of ``rho``: enough for a geometric schedule's few values, bounded memory for
    an adaptive one's many), so problems sharing a Gram and a penalty schedule (the layers fed
    one input) share them. A ``G + rho I`` too ill-conditioned for Cholesky falls back to
    the eigendecomposition.

    >>> import torch
    >>> G = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    >>> ShiftedGram(G).solve(torch.tensor([[3.0, 3.0]], dtype=torch.float64), rho=1.0)
    tensor([[0.7500, 0.7500]], dtype=torch.float64)
    """

    def __init__(self, gram: Tensor, cache: int = 4):
        if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
            raise ValueError(f"the Gram matrix must be square, got shape {tuple(gram.shape)}")
        if not bool(torch.isfinite(gram).all()):
            raise ValueError("the Gram matrix has non-finite values (NaN or inf)")
        self.gram = gram
        self.cache = cache
        self._inverses: dict[float, Tensor] = {}

    def inverse(self, rho: float) -> Tensor:
        """``(G + rho I)^-1`` (cached)."""
        M = self._inverses.get(rho)
        if M is None:
            shifted = self.gram.clone()
            shifted.diagonal().add_(rho)  # G + rho I without an identity matrix
            L, info = torch.linalg.cholesky_ex(shifted)
            if int(info) == 0:
                M = torch.cholesky_inverse(L)
            else:  # not numerically positive definite: the eigendecomposition, PSD-clamped
                values, Q = torch.linalg.eigh(self.gram)
                shifted = values.clamp(min=0) + rho
                if not bool((shifted > 0).all()):
                    raise ValueError("G + rho I is singular: use rho > 0")
                M = (Q / shifted) @ Q.T
            if len(self._inverses) >= self.cache:
                self._inverses.pop(next(iter(self._inverses)))
            self._inverses[rho] = M
        return M

    def solve(self, R: Tensor, rho: float) -> Tensor:
        """``R (G + rho I)^-1`` for the rows of ``R``."""
        return R @ self.inverse(rho)


def _check(rho: float, schedule: str, growth: float, max_iter: int, update_every: int,
           tol: float, relax: float) -> None:
    if not 0.0 < relax < 2.0:
        raise ValueError(f"relax must be in (0, 2), got {relax!r}")
    if not (rho > 0 and rho < float("inf")):
        raise ValueError(f"rho must be a positive finite number, got {rho!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if not growth >= 1.0:
        raise ValueError(f"growth must be >= 1, got {growth!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}")
    if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
        raise ValueError(f"update_every must be a positive integer, got {update_every!r}")
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol!r}")


def _adaptive(rho: float, changed: float) -> float:
    """ALPS' penalty update from the fraction of the support that changed."""
    if changed > 0.1:
        return rho * 1.3
    if changed > 0.005:
        return rho * 1.2
    return rho * 1.1


def admm(
    problem: LeastSquares,
    projection: Projection,
    *,
    rho: float = 0.1,
    schedule: str = "adaptive",
    growth: float = 1.3,
    max_iter: int = 300,
    update_every: int = 3,
    tol: float = 0.0,
    init: Tensor | None = None,
    shifted: ShiftedGram | None = None,
    max_rho: float = 1e6,
    relax: float = 1.0,
) -> SolverResult:
    """Least squares constrained to ``projection``'s set, by ADMM (see the module docstring).

    All rows are solved together (a batch-wide projection such as ``BatchTopK`` couples them).
    ``init`` is the starting point (default zero): ``u`` starts at its projection, ``lam`` at
    zero. ``shifted`` reuses the factorisation of ``problem.gram`` across problems sharing it.
    ``relax`` is the over-relaxation factor (1: plain ADMM).
    ``n_iter`` is the number of iterations run (the same for every row), ``residual`` the final
    ``||z - u|| / ||u||``. The result is in the set; a least-squares refit on its support
    (:func:`~sparsecode.core.pursuit.support_lstsq`) finishes the job where the exact minimiser
    on the support is wanted. A non-finite residual (divergence, non-finite data) raises
    ``ValueError``; an adaptive run that reaches ``max_iter`` before its support settles warns
    (``RuntimeWarning``, with the residual) and returns its last point in the set.
    """
    if not isinstance(projection, Projection):
        raise TypeError(f"admm needs a Projection (TopK, BatchTopK, NM, ...), "
                        f"got {type(projection).__name__}")
    _check(rho, schedule, growth, max_iter, update_every, tol, relax)
    V = problem.target  # with it, z = V + (rho (u - V) - lam) M needs no C = V G
    C = V if V is not None else problem.cov
    inv = shifted if shifted is not None else ShiftedGram(problem.gram)
    z = torch.zeros_like(C) if init is None else init.to(C)
    u = projection.project(z)
    lam = torch.zeros_like(C)
    support = u != 0
    size = max(int(support.sum()), 1)
    settled, residual = schedule != "adaptive", 0.0
    grown, shrunk = False, 0  # adaptive schedule: has rho been raised / lowered yet
    for it in range(1, max_iter + 1):
        if V is None:
            z = inv.solve(torch.add(C, u, alpha=rho).sub_(lam), rho)
        else:
            z = torch.addmm(V, torch.sub(u, V).mul_(rho).sub_(lam), inv.inverse(rho))
        if relax != 1.0:  # over-relaxation: relax z + (1 - relax) u stands for z below
            z.mul_(relax).add_(u, alpha=1.0 - relax)
        y = z.add_(lam, alpha=1.0 / rho)  # z + lam / rho, in z's memory
        u = projection.project(y)
        lam_new = (y - u).mul_(rho)  # lam + rho (z - u)
        check = it % update_every == 0 or it == max_iter
        if check:  # ||z - u|| = ||lam_new - lam|| / rho
            residual = _residual(lam_new.sub(lam).div_(rho), u)
        lam = lam_new
        if not check:
            continue
        if residual != residual or residual == float("inf"):
            raise ValueError(f"ADMM diverged: the primal residual ||z - u|| / ||u|| is {residual} "
                             f"after {it} iterations (rho={rho:g}); check the data for "
                             "non-finite values or use a larger rho")
        if schedule == "geometric":
            rho = min(rho * growth**update_every, max_rho)
        elif schedule == "adaptive":
            new = u != 0
            changed = float((new ^ support).sum()) / size
            support, size = new, max(int(new.sum()), 1)
            if changed > tol:
                grown = True
                rho = min(_adaptive(rho, changed), max_rho)
            elif grown or shrunk == 3:
                settled = True
                break
            else:  # the start's support has not moved yet: a smaller penalty lets it
                rho, shrunk = rho / 5, shrunk + 1
    if not settled:
        warnings.warn(f"ADMM stopped after max_iter={max_iter} iterations with the support still "
                      f"changing (primal residual {residual:.3g}); the result is in the set but "
                      "may be improved by more iterations", RuntimeWarning, stacklevel=2)
    n_iter = torch.full((C.shape[0],), it, dtype=torch.long, device=C.device)
    return SolverResult(u, n_iter, residual=residual)


def _residual(gap: Tensor, u: Tensor) -> float:
    """``||z - u|| / ||u||`` (``||z - u||`` when ``u`` is zero)."""
    scale = float(torch.linalg.vector_norm(u))
    return float(torch.linalg.vector_norm(gap)) / (scale if scale > 0 else 1.0)
