"""Penalties and projections: the one place where sparsity is imposed.

Every sparse method in the toolkit is a proximal-gradient step ``z <- prox(z - step * grad, step)``
(see ``docs/architecture.md``). This module holds the ``prox`` of each penalty and the projection
onto each constraint set, batched over rows (the last dimension indexes atoms / latents).

Conventions
-----------
* ``prox(z, step)`` returns ``argmin_u 0.5 * ||u - z||^2 + step * penalty(u)`` row by row.
  ``step`` is a float or a tensor broadcastable against ``z`` (e.g. one step per row, ``(B, 1)``).
* ``value(z)`` returns the penalty of each row, shape ``z.shape[:-1]``.
* A :class:`Projection` is the indicator of a set: ``prox(z, step) == project(z)`` for every
  step and ``value`` is 0 on the set and ``inf`` outside it.
* ``positive=True`` adds the constraint ``u >= 0`` (nonnegative codes, ReLU-style SAEs).

Operators
---------
Separable penalties: :class:`L1`, :class:`L0`, :class:`Lq` (``0 < q < 1``), :class:`MCP`,
:class:`SCAD`, :class:`CEL0`. Group penalty: :class:`GroupL21`. Projections: :class:`TopK`,
:class:`BatchTopK`, :class:`FeatureChoice`, :class:`NM` and the JumpReLU activation
:class:`Jump`. Build one by name with :func:`make_operator` (names in :data:`OPERATORS`).

The nonconvex proxes are exact for every step: where a textbook closed form needs a bound on the
step (MCP ``step < gamma``, SCAD ``step < gamma - 1``, CEL0 ``step * a_i^2 < 1``) the other
regime is derived and handled too (see each class).

Example
-------
>>> import torch
>>> from sparsecode.core.operators import L1, TopK
>>> z = torch.tensor([[3.0, -0.5, 1.0]])
>>> L1(alpha=1.0).prox(z, step=1.0)
tensor([[2., -0., 0.]])
>>> TopK(k=1).project(z)
tensor([[3., 0., 0.]])
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .select import row_pairs, top_budget, topk_rows

Step = float | Tensor


class Operator:
    """Base class: a penalty (or constraint) with a proximal operator, batched over rows."""

    #: True when ``penalty(u) = sum_i p(u_i)`` (the prox acts coordinate by coordinate).
    separable: bool = True
    #: True for convex penalties (FISTA's guarantees hold; nonconvex ones use monotone steps).
    convex: bool = True

    def prox(self, z: Tensor, step: Step) -> Tensor:
        raise NotImplementedError

    def value(self, z: Tensor) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({params})"


class Projection(Operator):
    """Indicator of a set; its prox is the Euclidean projection onto the set."""

    convex = False

    def project(self, z: Tensor) -> Tensor:
        raise NotImplementedError

    def support(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``(rows, cols)`` of the nonzeros of ``project(z)``, with ``z`` viewed as 2-D (leading
        dimensions flattened), sorted by row. Sparse autoencoders keep a code as these pairs
        plus ``z[rows, cols]`` and never build the dense projection."""
        z2 = z.reshape(-1, z.shape[-1])
        return self.project(z2).nonzero(as_tuple=True)

    def prox(self, z: Tensor, step: Step) -> Tensor:
        return self.project(z)

    def contains(self, z: Tensor) -> Tensor:
        """Boolean per row: is the row in the set (up to exact equality with its projection)?"""
        return (self.project(z) == z).all(dim=-1)

    def value(self, z: Tensor) -> Tensor:
        inside = self.contains(z)
        zero = torch.zeros(inside.shape, dtype=z.dtype, device=z.device)
        return torch.where(inside, zero, torch.full_like(zero, math.inf))


def _from_support(op: Projection, z: Tensor) -> Tensor:
    """``project(z)`` built from ``op.support(z)``: kept entries copied, the rest zero."""
    z2 = z.reshape(-1, z.shape[-1])
    rows, cols = op.support(z2.detach())  # an index set: no gradient to record
    out = torch.zeros_like(z2)
    out[rows, cols] = z2[rows, cols]
    return out.reshape(z.shape)


def _kept(vals: Tensor, positive: bool) -> Tensor:
    """Which selected values survive: positive ones for nonnegative sets, nonzero ones otherwise."""
    return vals > 0 if positive else vals != 0


def _check_nonnegative(name: str, value: float) -> None:
    if not value >= 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


class L1(Operator):
    """``alpha * ||u||_1``: soft thresholding (nonnegative soft threshold if ``positive``)."""

    def __init__(self, alpha: float, positive: bool = False):
        _check_nonnegative("alpha", alpha)
        self.alpha = float(alpha)
        self.positive = bool(positive)

    def prox(self, z: Tensor, step: Step) -> Tensor:
        t = self.alpha * step
        if self.positive:
            return torch.clamp(z - t, min=0)
        if isinstance(t, float) and z.dtype in (torch.float32, torch.float64):
            return F.softshrink(z, t)  # one fused pass
        return torch.sign(z) * torch.clamp(z.abs() - t, min=0)

    def value(self, z: Tensor) -> Tensor:
        v = self.alpha * z.abs().sum(dim=-1)
        if self.positive:
            v = torch.where((z < 0).any(dim=-1), torch.full_like(v, math.inf), v)
        return v


class L0(Operator):
    """``alpha * ||u||_0``: hard thresholding at ``sqrt(2 * alpha * step)``."""

    convex = False

    def __init__(self, alpha: float, positive: bool = False):
        _check_nonnegative("alpha", alpha)
        self.alpha = float(alpha)
        self.positive = bool(positive)

    def prox(self, z: Tensor, step: Step) -> Tensor:
        thr = torch.sqrt(torch.as_tensor(2.0 * self.alpha * step, dtype=z.dtype, device=z.device))
        u = torch.clamp(z, min=0) if self.positive else z
        return torch.where(u.abs() > thr, u, torch.zeros_like(u))

    def value(self, z: Tensor) -> Tensor:
        v = self.alpha * (z != 0).sum(dim=-1).to(z.dtype)
        if self.positive:
            v = torch.where((z < 0).any(dim=-1), torch.full_like(v, math.inf), v)
        return v


class TopK(Projection):
    """Projection onto ``{u : ||u||_0 <= k}`` per row: keep the k entries largest in magnitude.

    With ``positive=True`` the set is ``{u >= 0, ||u||_0 <= k}``: keep the k largest values and
    clamp them at zero (the TopK SAE activation). Ties at the cut: the lowest index wins (the
    rule of :mod:`sparsecode.core.select`, shared with the fused encoders).
    """

    separable = False

    def __init__(self, k: int, positive: bool = False):
        _check_positive_int("k", k)
        self.k = k
        self.positive = bool(positive)

    def _selected(self, z2: Tensor) -> Tensor:
        """``(rows, min(k, width))`` column indices of the top-k of each row of a 2-D ``z2``."""
        key = (z2 if self.positive else z2.abs()).detach()
        return topk_rows(key, min(self.k, z2.shape[-1]))[1]

    def project(self, z: Tensor) -> Tensor:
        kept = _kept(z, self.positive)
        if self.k < z.shape[-1]:  # a dense mask: no pairs for a dense result
            z2 = z.reshape(-1, z.shape[-1])
            top = torch.zeros_like(z2, dtype=torch.bool).scatter_(1, self._selected(z2), True)
            kept = kept & top.reshape(z.shape)
        return torch.where(kept, z, 0.0)

    def support(self, z: Tensor) -> tuple[Tensor, Tensor]:
        z2 = z.reshape(-1, z.shape[-1])
        idx = self._selected(z2).sort(dim=1).values  # ties: lowest index
        vals = z2.gather(1, idx)
        rows, cols, _ = row_pairs(vals, idx, keep=_kept(vals, self.positive))
        return rows, cols

    def contains(self, z: Tensor) -> Tensor:
        ok = (z != 0).sum(dim=-1) <= self.k
        if self.positive:
            ok &= (z >= 0).all(dim=-1)
        return ok


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _check_finite_greater(name: str, value: float, bound: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number > {bound}, got {value!r}")
    if not math.isfinite(value) or not value > bound:
        raise ValueError(f"{name} must be a finite number > {bound}, got {value!r}")


def _as_step(step: Step, z: Tensor) -> Tensor:
    """``step`` as a tensor with ``z``'s dtype and device (still broadcastable against ``z``)."""
    return torch.as_tensor(step, dtype=z.dtype, device=z.device)


def _magnitude(z: Tensor, positive: bool) -> Tensor:
    """``|z|``, or ``max(z, 0)`` under ``u >= 0`` (the prox of a symmetric penalty that is
    nondecreasing in ``|u|`` plus ``u >= 0`` is its prox evaluated at ``max(z, 0)``)."""
    return z.clamp(min=0) if positive else z.abs()


def _signed(z: Tensor, s: Tensor, positive: bool) -> Tensor:
    """Put the sign of ``z`` back on the magnitude ``s >= 0``."""
    return s if positive else torch.sign(z) * s


def _inf_if_negative(v: Tensor, z: Tensor, positive: bool) -> Tensor:
    """Penalty ``+inf`` on rows with a negative entry when ``u >= 0`` is imposed."""
    if positive:
        v = torch.where((z < 0).any(dim=-1), torch.full_like(v, math.inf), v)
    return v


def _lq_threshold(lam: Tensor, q: float) -> tuple[Tensor, Tensor]:
    """``(beta, tau)`` for ``min_s 0.5 (s - y)^2 + lam s^q``: the minimiser is nonzero iff
    ``y > tau``, and then it is ``>= beta``.

    At the threshold both ``0`` and ``beta`` are minimisers: equating the objective with its
    value at 0 (``y = s/2 + lam s^(q-1)``) and stationarity (``y = s + lam q s^(q-1)``) gives
    ``beta = (2 lam (1 - q))^(1/(2-q))`` and ``tau = beta (2 - q) / (2 (1 - q))``.
    """
    beta = (2.0 * (1.0 - q) * lam).pow(1.0 / (2.0 - q))
    return beta, beta * ((2.0 - q) / (2.0 * (1.0 - q)))


def _lq_half(y: Tensor, lam: Tensor) -> Tensor:
    """Half thresholding (Xu et al. 2012), ``q = 1/2``, for ``y >= 0`` (``lam`` shaped like ``y``).

    With ``s = w^2`` stationarity is the cubic ``w^3 - y w + lam/2 = 0`` whose largest root is
    ``s = (2y/3) (1 + cos(2 pi/3 - (2/3) arccos((3 sqrt(3)/4) lam y^(-3/2))))``.
    """
    _, tau = _lq_threshold(lam, 0.5)  # tau = 1.5 lam^(2/3)
    keep = y > tau
    ys = torch.where(keep, y, torch.ones_like(y))
    # (3 sqrt 3 / 4) lam y^(-3/2) written with r = y / tau (no overflow, and lam = 0 -> a = 0)
    r = ys / tau
    a = (3.0 * math.sqrt(3.0) / 4.0) * (1.5 * r).pow(-1.5)
    phi = torch.arccos(a.clamp(-1.0, 1.0))
    s = (2.0 / 3.0) * ys * (1.0 + torch.cos(2.0 * math.pi / 3.0 - (2.0 / 3.0) * phi))
    s = torch.where(lam > 0, s, y)  # exact identity for lam = 0
    return torch.where(keep, s, torch.zeros_like(s))


def _lq_two_thirds(y: Tensor, lam: Tensor) -> Tensor:
    """``q = 2/3`` thresholding (Cao et al. 2013), for ``y >= 0`` (``lam`` shaped like ``y``).

    With ``s = w^3`` stationarity is the quartic ``w^4 - y w + c = 0``, ``c = 2 lam / 3``.
    Ferrari: ``m`` is the real root of the resolvent ``m^3 - c m - y^2/8 = 0``,
    ``m = 2 sqrt(c/3) cosh(arccosh(3 sqrt(3) y^2 / (16 c^(3/2))) / 3)``, ``A = sqrt(2 m)``, and the
    largest root is ``w = (A + sqrt(2 y / A - A^2)) / 2``.
    """
    q = 2.0 / 3.0
    _, tau = _lq_threshold(lam, q)  # tau = 2 c^(3/4)
    keep = y > tau
    pos = lam > 0
    c = torch.where(pos, (2.0 / 3.0) * lam, torch.ones_like(lam))
    tau_c = 2.0 * c.pow(0.75)
    ys = torch.where(keep, y, tau_c)
    # the arccosh argument is (3 sqrt 3 / 4) r^2 with r = y / tau >= 1; far above the threshold
    # (r > 1e6) the formula is replaced by s = y (then polished) to avoid overflow
    r = (ys / tau_c).clamp(1.0, 1e6)
    x = (3.0 * math.sqrt(3.0) / 4.0) * r * r
    m = 2.0 * torch.sqrt(c / 3.0) * torch.cosh(torch.arccosh(x) / 3.0)
    A = torch.sqrt(2.0 * m)
    w = 0.5 * (A + torch.sqrt((2.0 * ys / A - A * A).clamp(min=0)))
    s = w * w * w
    far = ys > 1e6 * tau_c
    s = torch.where(far, ys, s)
    # one Newton step polishes the rounding of the formula (a few ulps near the threshold)
    # and, from s = y, is already exact far above it
    s = _lq_newton_step(ys, torch.where(pos, lam, torch.zeros_like(lam)), q, s)
    s = torch.where(pos, s, y)
    return torch.where(keep, s, torch.zeros_like(s))


def _lq_newton_step(y: Tensor, lam: Tensor, q: float, s: Tensor) -> Tensor:
    """One Newton step on ``f(s) = s - y + lam q s^(q-1)`` (stationarity for ``s > 0``)."""
    p = s.pow(q - 1.0)
    f = s - y + lam * q * p
    fp = 1.0 - lam * (q * (1.0 - q)) * p / s
    return s - f / fp


def _lq_newton(y: Tensor, lam: Tensor, q: float, n_iter: int) -> Tensor:
    """Numerical ``lq`` thresholding for any ``q in (0, 1)``, for ``y >= 0`` (``lam`` like ``y``).

    For ``y > tau`` the minimiser is the largest root of ``s + lam q s^(q-1) = y``; the left side
    is convex and increasing for ``s >= beta``, so Newton from ``s = y`` (above the root)
    decreases monotonically to it. Iterates are kept ``>= beta`` (the root is ``>= beta``).
    """
    beta, tau = _lq_threshold(lam, q)
    keep = y > tau
    zero = torch.zeros_like(y)
    ys = torch.where(keep, y, torch.ones_like(y))
    lam_s = torch.where(keep, lam, zero)  # masked entries solve s = 1: no 0^(q-1)
    beta_s = torch.where(keep, beta, zero)
    s = ys
    for _ in range(n_iter):
        s = torch.maximum(_lq_newton_step(ys, lam_s, q, s), beta_s)
    return torch.where(keep, s, zero)


def _firm_threshold(y: Tensor, t: Tensor, a: float | Tensor, g: float | Tensor) -> Tensor:
    """Prox of the MCP ``p(s) = a s - s^2/(2g)`` (``s <= g a``), ``g a^2 / 2`` (beyond), at
    step ``t``, for ``y >= 0``.

    * ``t < g``: firm threshold ``0`` if ``y <= t a``; ``(y - t a) / (1 - t/g)`` if
      ``t a < y <= g a``; ``y`` beyond.
    * ``t >= g``: the objective is concave on ``[0, g a]``, so the minimiser is ``0`` or
      ``max(y, g a)``; comparing them leaves a hard threshold at ``a sqrt(t g)`` (which is
      ``>= g a``): ``y`` if ``y > a sqrt(t g)`` else ``0``. Both branches agree as ``t -> g``.
    """
    zero = torch.zeros_like(y)
    firm_ok = t < g
    den = torch.where(firm_ok, 1.0 - t / g, torch.ones_like(t))
    # min(y, .) is the firm threshold's third piece and guards rounding when t is close to g
    firm = torch.where(y <= t * a, zero, torch.minimum((y - t * a) / den, y))
    hard = torch.where(y > a * torch.sqrt(t * g), y, zero)
    return torch.where(firm_ok, firm, hard)


# --------------------------------------------------------------------------------------------
# separable nonconvex penalties
# --------------------------------------------------------------------------------------------


class Lq(Operator):
    """``alpha * sum_i |u_i|^q`` with ``0 < q < 1`` (bridge / lq quasi-norm penalty).

    Prox: ``u_i = 0`` if ``|z_i| <= tau`` with
    ``tau = (2-q)/(2(1-q)) * (2 (1-q) step alpha)^(1/(2-q))``, else the largest root of
    ``s + step alpha q s^(q-1) = |z_i|`` with the sign of ``z_i``. Closed forms for ``q = 1/2``
    (half thresholding, Xu et al. 2012) and ``q = 2/3`` (Cao et al. 2013); other ``q`` use
    ``n_iter`` Newton steps (exact to rounding). ``method="newton"`` forces the numerical path.
    """

    convex = False

    def __init__(
        self,
        alpha: float,
        q: float,
        positive: bool = False,
        method: str = "auto",
        n_iter: int = 10,
    ):
        _check_nonnegative("alpha", alpha)
        if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0.0 < q < 1.0:
            raise ValueError(f"q must be a number in the open interval (0, 1), got {q!r}")
        if method not in ("auto", "newton"):
            raise ValueError(f"method must be 'auto' or 'newton', got {method!r}")
        _check_positive_int("n_iter", n_iter)
        self.alpha = float(alpha)
        self.q = float(q)
        self.positive = bool(positive)
        self.method = method
        self.n_iter = n_iter

    def prox(self, z: Tensor, step: Step) -> Tensor:
        y = _magnitude(z, self.positive)
        lam = self.alpha * _as_step(step, z)
        lam = lam.expand(torch.broadcast_shapes(lam.shape, y.shape))
        y = y.expand_as(lam)
        if self.method == "auto" and self.q == 0.5:
            s = _lq_half(y, lam)
        elif self.method == "auto" and math.isclose(self.q, 2.0 / 3.0, abs_tol=1e-12):
            s = _lq_two_thirds(y, lam)
        else:
            s = _lq_newton(y, lam, self.q, self.n_iter)
        return _signed(z, s, self.positive)

    def value(self, z: Tensor) -> Tensor:
        v = self.alpha * z.abs().pow(self.q).sum(dim=-1)
        return _inf_if_negative(v, z, self.positive)


class MCP(Operator):
    """Minimax concave penalty (Zhang 2010), per coordinate
    ``alpha |u| - u^2 / (2 gamma)`` if ``|u| <= gamma alpha`` else ``gamma alpha^2 / 2``.

    Prox (firm threshold, Gao & Bruce 1997) for ``step < gamma``:
    ``0`` if ``|z| <= step alpha``; ``sign(z) (|z| - step alpha) / (1 - step/gamma)`` if
    ``step alpha < |z| <= gamma alpha``; ``z`` beyond. For ``step >= gamma`` the problem is
    concave near 0 and the exact prox is the hard threshold ``z 1{|z| > alpha sqrt(step gamma)}``.
    Requires ``gamma > 1`` (so that the unit step, the usual normalised case, gives the firm
    threshold).
    """

    convex = False

    def __init__(self, alpha: float, gamma: float = 3.0, positive: bool = False):
        _check_nonnegative("alpha", alpha)
        _check_finite_greater("gamma", gamma, 1.0)
        self.alpha = float(alpha)
        self.gamma = float(gamma)
        self.positive = bool(positive)

    def prox(self, z: Tensor, step: Step) -> Tensor:
        y = _magnitude(z, self.positive)
        s = _firm_threshold(y, _as_step(step, z), self.alpha, self.gamma)
        return _signed(z, s, self.positive)

    def value(self, z: Tensor) -> Tensor:
        a, g = self.alpha, self.gamma
        x = z.abs()
        inner = a * x - x * x / (2.0 * g)
        v = torch.where(x <= g * a, inner, torch.full_like(x, g * a * a / 2.0)).sum(dim=-1)
        return _inf_if_negative(v, z, self.positive)


class SCAD(Operator):
    """Smoothly clipped absolute deviation (Fan & Li 2001), per coordinate
    ``alpha |u|`` if ``|u| <= alpha``; ``(2 gamma alpha |u| - u^2 - alpha^2) / (2 (gamma - 1))`` if
    ``alpha < |u| <= gamma alpha``; ``alpha^2 (gamma + 1) / 2`` beyond. Requires ``gamma > 2``.

    Prox at step ``t`` when ``gamma > 1 + t`` (the objective is then strictly convex; ``t = 1``
    is Fan & Li's formula): ``0`` if ``|z| <= t alpha``; ``sign(z) (|z| - t alpha)`` if
    ``|z| <= (1 + t) alpha``; ``sign(z) ((gamma - 1) |z| - t gamma alpha) / (gamma - 1 - t)`` if
    ``|z| <= gamma alpha``; ``z`` beyond. When ``gamma <= 1 + t`` the middle piece is concave
    and the exact prox is the better of ``clamp(|z| - t alpha, 0, alpha)`` and
    ``max(|z|, gamma alpha)`` (the minimisers over ``[0, alpha]`` and ``[gamma alpha, inf)``).
    """

    convex = False

    def __init__(self, alpha: float, gamma: float = 3.7, positive: bool = False):
        _check_nonnegative("alpha", alpha)
        _check_finite_greater("gamma", gamma, 2.0)
        self.alpha = float(alpha)
        self.gamma = float(gamma)
        self.positive = bool(positive)

    def prox(self, z: Tensor, step: Step) -> Tensor:
        a, g = self.alpha, self.gamma
        y = _magnitude(z, self.positive)
        t = _as_step(step, z)
        zero = torch.zeros_like(y)
        convex = g - 1.0 - t > 0
        den = torch.where(convex, g - 1.0 - t, torch.ones_like(t))
        mid = y + t * (y - g * a) / den  # = ((g - 1) y - t g a) / (g - 1 - t)
        mid = torch.minimum(mid.clamp(min=a), y)  # in [a, y] exactly; guards t close to g - 1
        closed = torch.where(
            y <= t * a,
            zero,
            torch.where(y <= (1.0 + t) * a, y - t * a, torch.where(y <= g * a, mid, y)),
        )
        # nonconvex case: best of the minimiser over [0, alpha] and over [gamma alpha, inf)
        s1 = torch.minimum((y - t * a).clamp(min=0), torch.full_like(y, a))
        s3 = y.clamp(min=g * a)
        h1 = 0.5 * (s1 - y) ** 2 + t * a * s1
        h3 = 0.5 * (s3 - y) ** 2 + t * (a * a * (g + 1.0) / 2.0)
        other = torch.where(h3 < h1, s3, s1)
        s = torch.where(convex, closed, other)
        return _signed(z, s, self.positive)

    def value(self, z: Tensor) -> Tensor:
        a, g = self.alpha, self.gamma
        x = z.abs()
        mid = (2.0 * g * a * x - x * x - a * a) / (2.0 * (g - 1.0))
        out = torch.full_like(x, a * a * (g + 1.0) / 2.0)
        v = torch.where(x <= a, a * x, torch.where(x <= g * a, mid, out)).sum(dim=-1)
        return _inf_if_negative(v, z, self.positive)


class CEL0(Operator):
    """Continuous exact l0 penalty (Soubies, Blanc-Feraud & Aubert 2015), per coordinate
    ``alpha - (a_i^2 / 2) (|u_i| - sqrt(2 alpha) / a_i)^2 * 1{|u_i| <= sqrt(2 alpha) / a_i}``
    with ``a_i = norms[i]`` (the column norms of the operator, default 1).

    It is the MCP with ``alpha_i' = a_i sqrt(2 alpha)``, ``gamma_i' = 1 / a_i^2``, so its prox is
    the firm threshold ``sign(z) min(|z|, (|z| - sqrt(2 alpha) a_i step)_+ / (1 - a_i^2 step))``
    (Soubies et al. 2015), valid for ``step a_i^2 < 1``; for ``step a_i^2 >= 1`` the exact prox is
    the l0 hard threshold at ``sqrt(2 alpha step)``.
    """

    convex = False

    def __init__(
        self,
        alpha: float,
        norms: Tensor | Sequence[float] | None = None,
        positive: bool = False,
    ):
        _check_nonnegative("alpha", alpha)
        if norms is not None:
            norms = torch.as_tensor(norms, dtype=torch.float64).detach()
            if norms.dim() != 1 or norms.numel() == 0:
                raise ValueError(
                    f"norms must be a 1-D sequence (one norm per atom), got shape "
                    f"{tuple(norms.shape)}"
                )
            if not bool(torch.isfinite(norms).all()) or not bool((norms > 0).all()):
                raise ValueError("norms must be finite and > 0 (column norms of the dictionary)")
        self.alpha = float(alpha)
        self.norms = norms
        self.positive = bool(positive)

    def _norms(self, z: Tensor) -> Tensor | float:
        if self.norms is None:
            return 1.0
        if z.shape[-1] != self.norms.numel():
            raise ValueError(
                f"CEL0 has {self.norms.numel()} norms but z has {z.shape[-1]} entries per row"
            )
        return self.norms.to(dtype=z.dtype, device=z.device)

    def prox(self, z: Tensor, step: Step) -> Tensor:
        a = self._norms(z)
        y = _magnitude(z, self.positive)
        s = _firm_threshold(y, _as_step(step, z), a * math.sqrt(2.0 * self.alpha), 1.0 / a**2)
        return _signed(z, s, self.positive)

    def value(self, z: Tensor) -> Tensor:
        a = self._norms(z)
        x = z.abs()
        theta = math.sqrt(2.0 * self.alpha) / a
        dip = torch.where(x <= theta, 0.5 * a**2 * (x - theta) ** 2, torch.zeros_like(x))
        v = (self.alpha - dip).sum(dim=-1)
        return _inf_if_negative(v, z, self.positive)


# --------------------------------------------------------------------------------------------
# group penalty
# --------------------------------------------------------------------------------------------


class GroupL21(Operator):
    """Group lasso ``alpha * sum_g ||u_g||_2`` over contiguous groups of ``groups`` entries
    along the last dimension (Yuan & Lin 2006).

    Prox: block soft threshold ``u_g = z_g * max(0, 1 - step alpha / ||z_g||_2)`` (applied to
    ``max(z, 0)`` when ``positive``). ``step`` must be a float or have last dimension 1 (one step
    per row).
    """

    separable = False

    def __init__(self, alpha: float, groups: int, positive: bool = False):
        _check_nonnegative("alpha", alpha)
        _check_positive_int("groups", groups)
        self.alpha = float(alpha)
        self.groups = groups
        self.positive = bool(positive)

    def _grouped(self, z: Tensor) -> Tensor:
        n = z.shape[-1] if z.dim() else 1
        if z.dim() == 0 or n % self.groups:
            raise ValueError(
                f"the last dimension ({n}) is not divisible by the group size {self.groups}"
            )
        return z.reshape(*z.shape[:-1], n // self.groups, self.groups)

    def prox(self, z: Tensor, step: Step) -> Tensor:
        t = _as_step(step, z)
        if t.dim() and t.shape[-1] != 1:
            raise ValueError(
                f"GroupL21 needs one step per row (last dimension 1), got step shape "
                f"{tuple(t.shape)}"
            )
        u = z.clamp(min=0) if self.positive else z
        zg = self._grouped(u)
        norm = torch.linalg.vector_norm(zg, dim=-1, keepdim=True)
        thr = self.alpha * (t.unsqueeze(-1) if t.dim() else t)
        scale = (1.0 - thr / norm.clamp(min=torch.finfo(z.dtype).tiny)).clamp(min=0)
        return (zg * scale).reshape(z.shape)

    def value(self, z: Tensor) -> Tensor:
        norms = torch.linalg.vector_norm(self._grouped(z), dim=-1)
        return _inf_if_negative(self.alpha * norms.sum(dim=-1), z, self.positive)


# --------------------------------------------------------------------------------------------
# projections with batch / structured budgets
# --------------------------------------------------------------------------------------------


def _per_row(flag: Tensor, z: Tensor) -> Tensor:
    """A batch-wide boolean repeated for every row (shape ``z.shape[:-1]``)."""
    return flag.expand(z.shape[:-1]).clone()


class BatchTopK(Projection):
    """Projection onto ``{U : ||U||_0 <= k B}`` for a batch ``U`` of ``B`` rows (all leading
    dimensions flattened): keep the ``k B`` entries largest in magnitude across the whole batch
    (Bussmann et al. 2024). ``positive=True``: the ``k B`` largest values, clamped at zero.

    Ties at the cut: the lowest ``(row, column)`` wins (row-major). Membership is a property
    of the batch: ``contains`` / ``value`` give every row the batch's answer.
    """

    separable = False

    def __init__(self, k: int, positive: bool = False):
        _check_positive_int("k", k)
        self.k = k
        self.positive = bool(positive)

    def project(self, z: Tensor) -> Tensor:
        if z.dim() == 0:
            raise ValueError("BatchTopK needs a tensor with at least one dimension")
        return _from_support(self, z)

    def support(self, z: Tensor) -> tuple[Tensor, Tensor]:
        width = z.shape[-1]
        flat = z.reshape(-1)
        rows = flat.numel() // width if width else 0
        budget = min(self.k * rows, flat.numel())
        key = flat if self.positive else flat.abs()
        idx = top_budget(key, budget).sort().values  # ties: lowest (row, column)
        idx = idx[_kept(flat[idx], self.positive)]
        return idx // width, idx % width

    def contains(self, z: Tensor) -> Tensor:
        rows = z.numel() // z.shape[-1] if z.shape[-1] else 0
        ok = (z != 0).sum() <= self.k * rows
        if self.positive:
            ok &= (z >= 0).all()
        return _per_row(ok, z)


class FeatureChoice(Projection):
    """Projection onto ``{U : every column of U has at most m nonzeros}``: each feature (last
    dimension index) keeps its ``m`` largest-magnitude entries over the rows (leading dimensions
    flattened; a 1-D ``z`` is one row). ``positive=True``: the ``m`` largest values, clamped
    at zero. Ties: the lowest row wins. ``contains`` / ``value`` give every row the batch's
    answer.
    """

    separable = False

    def __init__(self, m: int, positive: bool = False):
        _check_positive_int("m", m)
        self.m = m
        self.positive = bool(positive)

    def project(self, z: Tensor) -> Tensor:
        if z.dim() == 0:
            raise ValueError("FeatureChoice needs a tensor with at least one dimension")
        return _from_support(self, z)

    def support(self, z: Tensor) -> tuple[Tensor, Tensor]:
        z2 = z.reshape(-1, z.shape[-1])
        m = min(self.m, z2.shape[0])
        key = z2 if self.positive else z2.abs()
        rows = topk_rows(key.T, m)[1].T  # (m, n_features); ties: lowest row
        flat = (rows * z2.shape[1] + torch.arange(z2.shape[1], device=z.device)).reshape(-1)
        flat = flat.sort().values
        rows, cols = flat // z2.shape[1], flat % z2.shape[1]
        keep = _kept(z2[rows, cols], self.positive)
        return rows[keep], cols[keep]

    def contains(self, z: Tensor) -> Tensor:
        z2 = z.reshape(-1, z.shape[-1])
        ok = ((z2 != 0).sum(dim=0) <= self.m).all()
        if self.positive:
            ok &= (z2 >= 0).all()
        return _per_row(ok, z)


class NM(Projection):
    """N:M structured sparsity: in every consecutive group of ``m`` entries along ``dim`` keep
    the ``n`` largest in magnitude (``1 <= n < m``; 2:4 is the sparse tensor core pattern).
    The size along ``dim`` must be divisible by ``m``. ``contains`` / ``value`` are per row
    (last dimension), like every operator.
    """

    separable = False

    def __init__(self, n: int, m: int, dim: int = -1):
        _check_positive_int("n", n)
        _check_positive_int("m", m)
        if n >= m:
            raise ValueError(f"N:M sparsity needs n < m, got n={n} >= m={m}")
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise ValueError(f"dim must be an integer, got {dim!r}")
        self.n = n
        self.m = m
        self.dim = dim

    def _grouped(self, z: Tensor) -> Tensor:
        if z.dim() == 0:
            raise ValueError("NM needs a tensor with at least one dimension")
        zt = z.movedim(self.dim, -1)
        size = zt.shape[-1]
        if size % self.m:
            raise ValueError(
                f"the size along dim {self.dim} ({size}) is not divisible by m={self.m}"
            )
        return zt.reshape(*zt.shape[:-1], size // self.m, self.m)

    def _ungrouped(self, g: Tensor, z: Tensor) -> Tensor:
        return g.reshape(*g.shape[:-2], -1).movedim(-1, self.dim).reshape(z.shape)

    def project(self, z: Tensor) -> Tensor:
        g = self._grouped(z)
        idx = g.abs().topk(self.n, dim=-1, sorted=False).indices
        kept = torch.zeros_like(g).scatter(-1, idx, g.gather(-1, idx))
        return self._ungrouped(kept, z)

    def contains(self, z: Tensor) -> Tensor:
        g = self._grouped(z)
        group_ok = (g != 0).sum(dim=-1, keepdim=True) <= self.n
        ok = self._ungrouped(group_ok.expand(g.shape), z)
        return ok.all(dim=-1)


class Jump(Projection):
    """JumpReLU activation (Rajamanoharan et al. 2024): ``u = z * 1{z > theta}`` with a
    per-feature threshold ``theta`` (a float or a tensor broadcast over rows, e.g. ``(n,)``);
    ``positive=False`` keeps ``z * 1{|z| > theta}``.

    It is the hard threshold of ``sum_i (theta_i^2 / 2) 1{u_i != 0}`` at unit step, but here it
    does not depend on ``step`` (the threshold is learned, not derived from a penalty), so it is
    treated like a projection: ``prox(z, step) = project(z)`` and ``value`` is 0 everywhere
    (the sparsity cost lives in the training loss). ``contains`` tests ``project(z) == z``.
    The threshold tensor is kept by reference, so a learned ``nn.Parameter`` stays live.
    """

    separable = True

    def __init__(self, threshold: float | Tensor, positive: bool = True):
        if isinstance(threshold, Tensor):
            with torch.no_grad():
                finite = bool(torch.isfinite(threshold).all())
                nonneg = bool((threshold >= 0).all())
            if threshold.dim() > 1 or not finite or not nonneg:
                raise ValueError(
                    "threshold must be a finite scalar or 1-D tensor (one per feature) with "
                    f"entries >= 0, got shape {tuple(threshold.shape)}"
                )
            self.threshold: float | Tensor = threshold
        else:
            _check_nonnegative("threshold", threshold)
            self.threshold = float(threshold)
        self.positive = bool(positive)

    def project(self, z: Tensor) -> Tensor:
        theta = self.threshold
        if isinstance(theta, Tensor):
            theta = theta.to(device=z.device, dtype=z.dtype)
        key = z if self.positive else z.abs()
        return torch.where(key > theta, z, torch.zeros_like(z))

    def value(self, z: Tensor) -> Tensor:
        return torch.zeros(z.shape[:-1], dtype=z.dtype, device=z.device)


# --------------------------------------------------------------------------------------------
# factory
# --------------------------------------------------------------------------------------------

OPERATORS: dict[str, type[Operator]] = {
    "l1": L1,
    "l0": L0,
    "lq": Lq,
    "mcp": MCP,
    "scad": SCAD,
    "cel0": CEL0,
    "group_l21": GroupL21,
    "topk": TopK,
    "batch_topk": BatchTopK,
    "feature_choice": FeatureChoice,
    "nm": NM,
    "jump": Jump,
}


def make_operator(name: str, **params: object) -> Operator:
    """Build an operator by name, e.g. ``make_operator("mcp", alpha=0.1, gamma=3.0)``.

    Names: ``l1, l0, lq, mcp, scad, cel0, group_l21, topk, batch_topk, feature_choice, nm,
    jump``.
    """
    key = name.lower() if isinstance(name, str) else name
    if key not in OPERATORS:
        raise ValueError(
            f"unknown operator {name!r}; known operators: {', '.join(sorted(OPERATORS))}"
        )
    return OPERATORS[key](**params)
