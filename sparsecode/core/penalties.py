"""Penalties with a proximal operator: l1, l0, lq, MCP, SCAD, CEL0 and the group lasso.

``prox(z, step)`` returns ``argmin_u 0.5 * ||u - z||^2 + step * penalty(u)`` row by row (the last
dimension indexes atoms / latents); ``value(z)`` the penalty of each row. The nonconvex proxes are
exact for every step: where a textbook closed form needs a bound on the step (MCP
``step < gamma``, SCAD ``step < gamma - 1``, CEL0 ``step * a_i^2 < 1``) the other regime is
derived and handled too (see each class). Import them from :mod:`sparsecode.core.operators`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

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
