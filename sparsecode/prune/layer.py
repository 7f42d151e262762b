"""Pruning one linear layer ``y = x W^T`` from its input Gram ``H = X X^T`` (inputs as columns).

Every method returns new weights and the boolean keep-mask. The layer error of pruned weights
``W'`` is ``||X^T (W - W')^T||_F^2 = tr((W - W') H (W - W')^T)``; per output row it is the
sparse regression ``min ||X^T (w - w')||^2`` over ``k``-sparse or N:M ``w'``.

* ``magnitude``: keep the largest ``|W|`` over the whole matrix (or per N:M group).
* ``wanda``: keep the largest ``|W_ij| * ||x_j||`` per output row (Sun et al. 2023); no update.
* ``sparsegpt``: OBS column sweep with a damped inverse Hessian, masks chosen per block of
  columns from ``w^2 / [H^-1]_jj^2`` (Frantar & Alistarh 2023).
* ``iht`` (this toolkit's method): the per-row regression solved with the solver core. Columns
  are scaled by ``||x_j||`` so the top-k / N:M projection of the scaled weights *is* Wanda's
  mask; from there: least squares on that support (:func:`~sparsecode.core.solvers.
  support_lstsq`), IHT with the TopK / NM projection (:func:`~sparsecode.core.solvers.iht`),
  least squares on the final support. Each row keeps the best of these iterates, so its error
  never exceeds Wanda's.
* ``omp``: the same scaled regression solved greedily by the core's batched
  :func:`~sparsecode.core.solvers.omp` (order-recursive selection by default) on the Gram,
  ``k`` atoms per row, exact least squares on the chosen support; unstructured only. Each row
  keeps OMP's weights or Wanda's mask, whichever has the smaller error.

Selections use the core's :class:`~sparsecode.core.operators.TopK` and
:class:`~sparsecode.core.operators.NM` projections.

>>> import torch
>>> W = torch.tensor([[4.0, -1.0, 0.5, 3.0]])
>>> H = torch.eye(4)
>>> magnitude(W, H, sparsity=0.5)[0]
tensor([[4., -0., 0., 3.]])
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..core.operators import NM, BatchTopK, Support, TopK
from ..core.solvers import LeastSquares, ShiftedGram, admm, iht, omp, support_lstsq

__all__ = [
    "METHODS",
    "layer_error",
    "magnitude",
    "relative_error",
    "prune_layer",
    "sparsegpt",
    "wanda",
    "iht_prune",
    "omp_prune",
    "alps_prune",
    "admm_prune",
]

NMPattern = tuple[int, int] | None


def _positive(score: Tensor) -> Tensor:
    """Scores made strictly positive (zeros -> tiny) so projections keep exactly k entries."""
    return torch.where(score > 0, score, torch.finfo(score.dtype).tiny)


def _n_keep(width: int, sparsity: float) -> int:
    return width - int(round(sparsity * width))


def keep_mask(score: Tensor, sparsity: float, nm: NMPattern, per_row: bool = True) -> Tensor:
    """Boolean mask of the entries kept by the TopK (per row, or over the whole matrix when
    ``per_row=False``) or N:M projection of the nonnegative ``score``."""
    s = _positive(score)
    if nm is not None:
        return NM(*nm).project(s) != 0
    if per_row:
        k = _n_keep(s.shape[1], sparsity)
        return TopK(k).project(s) != 0 if k else torch.zeros_like(s, dtype=torch.bool)
    k = _n_keep(s.numel(), sparsity)
    if not k:
        return torch.zeros_like(s, dtype=torch.bool)
    return (TopK(k).project(s.reshape(1, -1)) != 0).reshape(s.shape)


def layer_error(W: Tensor, W_new: Tensor, H: Tensor) -> Tensor:
    """Per output row ``(w - w') H (w - w')^T``: the squared output error on the calibration set."""
    D = (W - W_new).to(H.dtype)
    return ((D @ H) * D).sum(dim=1)


def relative_error(W: Tensor, W_new: Tensor, H: Tensor) -> float:
    """``tr((W - W') H (W - W')^T) / tr(W H W^T)`` (0 when the layer's output is zero), in
    ``H``'s dtype: the error every pruning report gives.

    >>> import torch
    >>> relative_error(torch.tensor([[3.0, 4.0]]), torch.tensor([[3.0, 0.0]]), torch.eye(2))
    0.64
    """
    base = float(layer_error(W, torch.zeros_like(W), H).sum())
    return float(layer_error(W, W_new, H).sum()) / base if base > 0 else 0.0


def magnitude(W: Tensor, H: Tensor | None, sparsity: float, nm: NMPattern = None):
    """Keep the largest ``|W|`` of the matrix (N:M: of each group of M inputs)."""
    mask = keep_mask(W.abs(), sparsity, nm, per_row=False)
    return W * mask, mask


def wanda(W: Tensor, H: Tensor, sparsity: float, nm: NMPattern = None):
    """Keep the largest ``|W_ij| ||x_j||`` per output row (N:M: per group)."""
    norms = torch.sqrt(torch.diagonal(H).clamp(min=0)).to(W.dtype)
    mask = keep_mask(W.abs() * norms, sparsity, nm)
    return W * mask, mask


def sparsegpt(
    W: Tensor,
    H: Tensor,
    sparsity: float,
    nm: NMPattern = None,
    *,
    blocksize: int = 128,
    percdamp: float = 0.01,
    per_row: bool = False,
):
    """SparseGPT: OBS updates column by column with ``H + percdamp * mean(diag H) * I``.

    Unstructured masks prune ``round(sparsity * rows * cols)`` entries of each block of
    ``blocksize`` columns with the smallest ``w^2 / [H^-1]_jj^2`` (the weights as updated so
    far; ``per_row=True``: ``round(sparsity * cols)`` per row of the block); N:M masks are
    chosen per group of M columns the same way.
    """
    out_dtype = W.dtype
    work = torch.float64 if W.dtype == torch.float64 else torch.float32
    W = W.detach().clone().to(work)
    H = H.detach().clone().to(work)
    rows, cols = W.shape
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += percdamp * torch.diagonal(H).mean() * torch.eye(cols, dtype=H.dtype, device=H.device)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    mask = torch.zeros_like(W, dtype=torch.bool)  # True = kept
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diagonal(Hinv1)
        keep1 = torch.ones_like(W1, dtype=torch.bool)
        if nm is None:
            score = W1**2 / d[None, :] ** 2
            keep1 = keep_mask(score, sparsity, None, per_row=per_row)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                j = slice(i, i + nm[1])
                keep1[:, j] = keep_mask(W1[:, j] ** 2 / d[None, j] ** 2, 0.0, nm)
            w = W1[:, i]
            q = w * keep1[:, i]
            Q1[:, i] = q
            err = (w - q) / d[i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        mask[:, i1:i2] = keep1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return (W * mask).to(out_dtype), mask


def _scaled_problem(W: Tensor, H: Tensor):
    """The per-row regression in column-scaled variables, in float32 (float64 for float64 W).

    ``s_j = ||x_j||`` (1 for inputs that never fire), ``G = H / (s s^T)`` (unit diagonal),
    ``V = W * s``. Returns ``(W, V, G, s, alive, problem)`` with ``problem`` the Gram-domain
    :class:`~sparsecode.core.solvers.LeastSquares` whose rows are those of ``V``.
    """
    work = torch.float64 if W.dtype == torch.float64 else torch.float32
    G, s, alive = _scaled_gram(H, work)
    W = W.detach().to(work)
    V = W * s
    return W, V, G, s, alive, LeastSquares.from_target(G, V)


class _LastGram:
    """The scaled Gram of the last ``H`` seen, and its :class:`ShiftedGram`: the layers fed one
    input (q/k/v, gate/up) share one Gram object, so they share one eigendecomposition."""

    key: tuple | None = None
    value: tuple = ()
    shifted: ShiftedGram | None = None
    ref: Tensor | None = None  # the last H itself: keeps id(H) from being reused

    @classmethod
    def clear(cls) -> None:
        """Drop the cached Gram and inverses (``prune`` calls it when it is done)."""
        cls.key, cls.value, cls.shifted, cls.ref = None, (), None, None


def _scaled_gram(H: Tensor, work: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """``(G, s, alive)`` of :func:`_scaled_problem` for the Gram ``H`` (cached for the last one:
    the same tensor object, unmodified, same dtype)."""
    key = (id(H), H._version, work, H.device)
    if _LastGram.key != key:
        H2 = H.detach().to(work)
        d = torch.diagonal(H2).clamp(min=0)
        alive = d > 0
        s = torch.where(alive, torch.sqrt(d), torch.ones_like(d))
        _LastGram.key, _LastGram.value = None, (H2 / s[:, None] / s[None, :], s, alive)
        _LastGram.shifted, _LastGram.ref, _LastGram.key = None, H, key
    return _LastGram.value


def _shifted(G: Tensor) -> ShiftedGram:
    """The eigendecomposition of the scaled Gram ``G`` returned last by :func:`_scaled_gram`."""
    if _LastGram.shifted is None or _LastGram.value[0] is not G:
        _LastGram.shifted = ShiftedGram(G)
    return _LastGram.shifted


def _row_error(V: Tensor, G: Tensor, Z: Tensor) -> Tensor:
    """``(v - z) G (v - z)^T`` per row: the layer error in scaled variables."""
    D = V - Z
    return ((D @ G) * D).sum(dim=1)


def iht_prune(
    W: Tensor,
    H: Tensor,
    sparsity: float,
    nm: NMPattern = None,
    *,
    max_iter: int = 5,
    cg_iter: int = 30,
    ridge: float = 1e-3,
    init: str | tuple[str, ...] = ("wanda", "sparsegpt"),
):
    """This toolkit's method: per-row sparse regression on the Gram with the solver core.

    In the column-scaled variables ``v = w * ||x||`` (Gram ``G`` with unit diagonal) the TopK /
    NM projection of ``v`` is Wanda's mask. Then: least squares on that support
    (``support_lstsq``, ``cg_iter`` conjugate-gradient steps, ``ridge`` relative damping),
    ``max_iter`` IHT steps (projected gradient with momentum and the monotone safeguard) and
    least squares on the support IHT ends on. Every row keeps whichever of these iterates has
    the smallest error, so no row is worse than with Wanda's mask.

    ``init`` names the starting masks: ``"wanda"`` and/or ``"sparsegpt"`` (SparseGPT's mask
    chosen per row, so every row keeps the same count; least squares on it is never worse than
    SparseGPT's own weights on that mask). By default both run and each row keeps the better.
    On SmolLM2 the least-squares steps give almost all of the gain over the masks' own weights;
    IHT steps from there move the error by well under 1% (hence the small default ``max_iter``).
    """
    out_dtype = W.dtype
    W, V, G, s, alive, prob = _scaled_problem(W, H)
    proj = NM(*nm) if nm is not None else TopK(max(_n_keep(W.shape[1], sparsity), 1))
    k = _n_keep(W.shape[1], sparsity)

    def err(Z: Tensor) -> Tensor:
        return _row_error(V, G, Z)

    keep = keep_mask(V.abs(), sparsity, nm)  # Wanda's mask
    best = V * keep
    best_err = err(best)

    def offer(Z: Tensor, mask: Tensor) -> None:
        nonlocal best, best_err, keep
        e = err(Z)
        better = e < best_err
        best = torch.where(better[:, None], Z, best)
        keep = torch.where(better[:, None], mask, keep)
        best_err = torch.where(better, e, best_err)

    if k == 0 and nm is None:
        return torch.zeros_like(W).to(out_dtype), torch.zeros_like(W, dtype=torch.bool)
    inits = (init,) if isinstance(init, str) else tuple(init)
    if set(inits) - {"wanda", "sparsegpt"} or not inits:
        raise ValueError(f"init must be 'wanda' and/or 'sparsegpt', got {init!r}")
    starts = []
    if "wanda" in inits:
        starts.append((best, keep))
    if "sparsegpt" in inits:
        W_s, keep_s = sparsegpt(W, H, sparsity, nm, per_row=True)
        Z = torch.where(keep_s, W_s * s, torch.zeros_like(W_s))
        starts.append((Z, keep_s))
        if "wanda" not in inits:
            best, keep, best_err = Z, keep_s, err(Z)
        else:
            offer(Z, keep_s)
    for Z0, mask0 in starts:
        if cg_iter:
            Z = support_lstsq(prob, mask0, init=Z0, ridge=ridge, max_iter=cg_iter).codes
            offer(Z, mask0)
    if max_iter:
        Z = iht(prob, proj, fast=True, max_iter=max_iter, init=best, tol=0.0).codes
        mask = Z != 0
        offer(Z, mask)
        if cg_iter:
            Z = support_lstsq(prob, mask, init=Z, ridge=ridge, max_iter=cg_iter).codes
            offer(Z, mask)
    W_new = best / s
    W_new[:, ~alive] = 0.0
    keep = keep & alive[None, :] if nm is None else keep
    return (W_new * keep).to(out_dtype), keep


def omp_prune(
    W: Tensor,
    H: Tensor,
    sparsity: float,
    nm: NMPattern = None,
    *,
    selection: str = "ormp",
):
    """Greedy per-row sparse regression on the Gram with the core's batched OMP.

    Same scaled problem as :func:`iht_prune` (``v = w * ||x||``, unit-diagonal Gram); each row
    selects ``k`` inputs one at a time (``selection``: ``"ormp"``, the input whose addition most
    reduces the error after re-fitting, or ``"omp"``, the one most correlated with the
    residual) and its weights are the least-squares fit on them. A row whose OMP error exceeds
    that of Wanda's mask keeps Wanda's mask instead. Unstructured sparsity only (a greedy
    selection cannot honour N:M groups): use ``iht`` for N:M.

    >>> import torch
    >>> W, H = torch.tensor([[4.0, -1.0, 0.5, 3.0]]), torch.eye(4)
    >>> omp_prune(W, H, sparsity=0.5)[1]
    tensor([[ True, False, False,  True]])
    """
    if nm is not None:
        raise ValueError("method 'omp' prunes unstructured sparsity only; use 'iht' for N:M")
    out_dtype = W.dtype
    k = _n_keep(W.shape[1], sparsity)
    if k == 0:
        return torch.zeros_like(W), torch.zeros_like(W, dtype=torch.bool)
    W, V, G, s, alive, prob = _scaled_problem(W, H)
    keep = keep_mask(V.abs(), sparsity, None)  # Wanda's mask, its own weights
    best = V * keep
    Z = omp(prob, n_nonzero_coefs=k, selection=selection).codes.to_dense()
    better = _row_error(V, G, Z) < _row_error(V, G, best)
    best = torch.where(better[:, None], Z, best)
    keep = torch.where(better[:, None], Z != 0, keep)
    return _finish(best / s, keep, alive, out_dtype)


def _finish(W_new: Tensor, keep: Tensor, alive: Tensor, out_dtype: torch.dtype):
    """Scaled solution back to weights: inputs that never fire get weight 0 and no mask entry."""
    W_new[:, ~alive] = 0.0
    keep = keep & alive[None, :]
    return (W_new * keep).to(out_dtype), keep


_STARTS = ("dense", "magnitude", "wanda", "sparsegpt")


def _start(W: Tensor, H: Tensor, sparsity: float, nm: NMPattern, init: str, s: Tensor):
    """Scaled starting weights and mask: the dense weights (``"dense"``, no mask) or the pruned
    weights of ``magnitude`` / ``wanda`` / ``sparsegpt`` (SparseGPT's mask chosen per row)."""
    if init not in _STARTS:
        raise ValueError(f"init must be one of {', '.join(_STARTS)}, got {init!r}")
    if init == "dense":
        return W * s, None
    fn = {"magnitude": magnitude, "wanda": wanda, "sparsegpt": sparsegpt}[init]
    opts = {"per_row": True} if init == "sparsegpt" else {}
    W0, mask = fn(W, H, sparsity, nm, **opts)
    return W0.to(s.dtype) * s, mask


def admm_prune(
    W: Tensor,
    H: Tensor,
    sparsity: float,
    nm: NMPattern = None,
    *,
    init: str = "dense",
    fix_mask: bool = False,
    per_row: bool = False,
    rho: float | None = None,
    schedule: str | None = None,
    growth: float = 1.3,
    update_every: int | None = None,
    max_iter: int | None = None,
    tol: float = 0.0,
    cg_iter: int = 0,
    ridge: float = 1e-3,
    relax: float | None = None,
):
    """The layer problem solved by the core's ADMM (:func:`~sparsecode.core.admm.admm`) on the
    scaled problem of :func:`iht_prune` (unit-diagonal Gram; the inverses of ``G + rho I`` are
    shared by the layers fed the same input).

    Default (the default pruning method): the constraint set is the layer-wide budget
    (``BatchTopK``: rows keep different counts, like SparseGPT's and ALPS' masks), the per-row
    ``TopK`` (``per_row=True``) or ``NM``; from the dense weights (or the weights of a mask
    method, ``init``), ``max_iter=8`` over-relaxed iterations (``relax=1.5``) with the
    penalty ``rho=0.3`` raised by ``growth=1.3`` per iteration every ``update_every=4``
    iterations (two values of ``rho``: each costs one factorisation of ``G + rho I``, as much
    as three iterations on a down_proj); N:M patterns take 6 iterations from ``rho=0.4``,
    raised after 3 (their per-group selections settle sooner: 0.6% more layer error than 8
    iterations on SmolLM2 at 2:4, for a quarter less time). The answer is the last iterate in
    the set.
    ``cg_iter`` conjugate-gradient steps of least squares on its support may follow (on
    SmolLM2 two steps lower the layer error by about 1.5% for 15-20% more time, so none by
    default).

    ``fix_mask=True`` is Boža (2024)'s ADMM weight update: the mask of ``init`` (``"wanda"``
    if ``init="dense"``) kept fixed, its weights re-solved with a fixed penalty (``rho=1``,
    ``max_iter=20``): least squares on that support, one ``(rows, in) @ (in, in)`` product an
    iteration.

    >>> import torch
    >>> W, H = torch.tensor([[4.0, -1.0, 0.5, 3.0]]), torch.eye(4)
    >>> admm_prune(W, H, sparsity=0.5)[1]
    tensor([[ True, False, False,  True]])
    >>> admm_prune(W, H, sparsity=0.5, fix_mask=True)[0].round(decimals=4)
    tensor([[4., 0., 0., 3.]])
    """
    if fix_mask:
        init = "wanda" if init == "dense" else init
        defaults = dict(rho=1.0, schedule="fixed", max_iter=20, update_every=1, relax=1.0)
    else:
        defaults = dict(rho=0.3, schedule="geometric", max_iter=8, update_every=4, relax=1.5)
        if nm is not None:  # per-group selections settle sooner: 6 iterations from rho=0.4
            defaults.update(rho=0.4, max_iter=6, update_every=3)
    relax = defaults["relax"] if relax is None else relax
    rho = defaults["rho"] if rho is None else rho
    schedule = defaults["schedule"] if schedule is None else schedule
    max_iter = defaults["max_iter"] if max_iter is None else max_iter
    update_every = defaults["update_every"] if update_every is None else update_every
    out_dtype = W.dtype
    k = _n_keep(W.shape[1], sparsity)
    if k == 0 and nm is None:
        return torch.zeros_like(W), torch.zeros_like(W, dtype=torch.bool)
    W, V, G, s, alive, prob = _scaled_problem(W, H)
    Z0, mask = _start(W, H, sparsity, nm, init, s)
    if fix_mask:
        proj = Support(mask)
    else:
        proj = NM(*nm) if nm is not None else TopK(k) if per_row else BatchTopK(k)
    Z = admm(prob, proj, rho=rho, schedule=schedule, growth=growth, max_iter=max_iter, tol=tol,
             update_every=update_every, init=Z0, shifted=_shifted(G), relax=relax).codes
    keep = mask if fix_mask else Z != 0
    if cg_iter:
        Z = support_lstsq(prob, keep, init=Z, ridge=ridge, max_iter=cg_iter).codes
    return _finish(Z / s, keep, alive, out_dtype)


def alps_prune(
    W: Tensor,
    H: Tensor,
    sparsity: float,
    nm: NMPattern = None,
    *,
    max_iter: int = 300,
    cg_iter: int = 10,
    **options,
):
    """ALPS (Meng et al. 2024): :func:`admm_prune` with ALPS' adaptive penalty (``rho`` from
    0.1, raised every 3 iterations by how much of the support changed, stopping once it no
    longer changes; at most ``max_iter`` iterations), then ``cg_iter`` conjugate-gradient steps
    of least squares on the final support (Jacobi-preconditioned: the scaled Gram has a unit
    diagonal). Several times slower than the default ``admm`` for a few percent less error.

    >>> import torch
    >>> W, H = torch.tensor([[4.0, -1.0, 0.5, 3.0]]), torch.eye(4)
    >>> alps_prune(W, H, sparsity=0.5)[1]
    tensor([[ True, False, False,  True]])
    """
    options = {"rho": 0.1, "schedule": "adaptive", "update_every": 3, "relax": 1.0, **options}
    return admm_prune(W, H, sparsity, nm, max_iter=max_iter, cg_iter=cg_iter, **options)


METHODS = {
    "magnitude": magnitude,
    "wanda": wanda,
    "sparsegpt": sparsegpt,
    "iht": iht_prune,
    "omp": omp_prune,
    "alps": alps_prune,
    "admm": admm_prune,
}


def check_sparsity(sparsity: float) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    if not (0.0 <= sparsity < 1.0) or math.isnan(sparsity):
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    return float(sparsity)


def parse_pattern(pattern: str | tuple[int, int] | None) -> NMPattern:
    """``"unstructured"`` / ``None`` -> ``None``; ``"2:4"`` or ``(2, 4)`` -> ``(2, 4)``."""
    if pattern is None or pattern == "unstructured":
        return None
    if isinstance(pattern, str):
        parts = pattern.split(":")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"pattern must be 'unstructured' or 'N:M' like '2:4', got {pattern!r}")
        pattern = (int(parts[0]), int(parts[1]))
    n, m = pattern
    if not (isinstance(n, int) and isinstance(m, int)) or n < 1 or m < 1:
        raise ValueError(f"N:M pattern needs integers N, M >= 1, got {pattern!r}")
    if n >= m:
        raise ValueError(f"N:M pattern needs N < M, got N={n} >= M={m}")
    return (n, m)


def prune_layer(
    W: Tensor,
    H: Tensor | None,
    sparsity: float = 0.5,
    method: str = "admm",
    pattern: str | tuple[int, int] | None = None,
    name: str = "layer",
    **options,
) -> tuple[Tensor, Tensor]:
    """Pruned weights and keep-mask of one ``(out, in)`` weight from its ``(in, in)`` Gram.

    With an N:M ``pattern`` the sparsity is ``1 - N/M`` and ``sparsity`` is ignored.

    >>> import torch
    >>> W, X = torch.randn(4, 8), torch.randn(8, 64)
    >>> W2, keep = prune_layer(W, X @ X.T, method="wanda", pattern="2:4")
    >>> keep.reshape(4, 2, 4).sum(-1).unique().tolist()
    [2]
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    nm = parse_pattern(pattern)
    sparsity = check_sparsity(sparsity)
    if H is None and method != "magnitude":
        raise ValueError(f"{name}: method {method!r} needs the input Gram H")
    if W.dim() != 2 or (H is not None and H.shape != (W.shape[1], W.shape[1])):
        raise ValueError(
            f"{name}: weight {tuple(W.shape)} and Gram {tuple(H.shape)} do not match"
        )
    for what, t in (("weight", W), ("input Gram", H)):
        if t is not None and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name}: the {what} has non-finite values (NaN or inf)")
    if nm is not None and W.shape[1] % nm[1]:
        raise ValueError(
            f"{name}: input width {W.shape[1]} is not divisible by M={nm[1]} of the "
            f"{nm[0]}:{nm[1]} pattern"
        )
    return METHODS[method](W, H, sparsity, nm, **options)
