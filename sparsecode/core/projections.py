"""Projections: the constraint sets and activations that select a sparse support.

Every projection has ``project(z)`` (dense), ``support(z)`` (the kept ``(rows, cols)``) and
``encode(x, W_enc, b_enc, b_dec)``: the code of ``project((x - b_dec) W_enc^T + b_enc)`` as
``(rows, cols, pre)`` pairs, with the pre-activations at the pairs carrying the sparse encoder
backward. That is one step of the proximal-gradient iteration from zero, i.e. a sparse
autoencoder's encoder. :class:`TopK`, :class:`BatchTopK`, :class:`FeatureChoice` and
:class:`Jump` (nonnegative) encode through the fused kernels of :mod:`sparsecode.core.kernels`
without the dense ``(N, n_atoms)`` pre-activations; any other projection falls back to the dense
pre-activations and its ``support``. ``project_pairs(pre, cols)`` gives the code's values at
the pairs (the identity for a selection; the JumpReLU threshold and its straight-through
gradient for :class:`Jump`). Import them from :mod:`sparsecode.core.operators`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .kernels import (
    batch_topk_encode,
    feature_choice_encode,
    preact,
    threshold_encode,
    topk_encode,
)
from .penalties import Operator, Step, _check_nonnegative, _check_positive_int
from .select import row_pairs, top_budget, top_budget_mask, topk_rows

Pairs = tuple[Tensor, Tensor, Tensor]


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

    #: True when the set bounds the number of nonzeros (per row or per batch), so that an
    #: encoded code is sparse whatever the inputs; a threshold is not bounded.
    bounded: bool = True

    def encode(
        self,
        x: Tensor,
        W_enc: Tensor,
        b_enc: Tensor,
        b_dec: Tensor | None = None,
        *,
        matmul_dtype: torch.dtype | None = None,
    ) -> Pairs:
        """The code of a 2-D ``x`` against encoder rows ``W_enc (n_atoms, d)``: the pairs that
        ``project((x - b_dec) @ W_enc.T + b_enc)`` may keep, as ``(rows, cols, pre)`` grouped by
        row, ``pre`` the pre-activations there (in ``W_enc``'s dtype, with the gradient to ``x``,
        ``W_enc``, ``b_enc``, ``b_dec``). :meth:`project_pairs` turns ``pre`` into the code's
        values. ``matmul_dtype`` runs the selecting matmul in that precision.

        This default computes the dense pre-activations and :meth:`support`; the projections
        that sparse autoencoders use select without them (fused kernels).

        >>> import torch
        >>> from sparsecode.core.operators import NM
        >>> x, W, b = torch.randn(3, 5), torch.randn(8, 5), torch.zeros(8)
        >>> rows, cols, pre = NM(1, 4).encode(x, W, b)
        >>> rows.tolist() == [0, 0, 1, 1, 2, 2]
        True
        """
        _check_encode_shapes(x, W_enc)
        W = W_enc if matmul_dtype is None else W_enc.to(matmul_dtype)
        full = preact(x, W, b_enc, b_dec).to(W_enc.dtype)
        rows, cols = self.support(full.detach())
        return rows, cols, full[rows, cols]

    def project_pairs(self, pre: Tensor, cols: Tensor) -> Tensor:
        """The code's values at pairs from :meth:`encode` (``cols`` their atoms): the
        pre-activations themselves, the selection being done."""
        return pre

    def contains(self, z: Tensor) -> Tensor:
        """Boolean per row: is the row in the set (up to exact equality with its projection)?"""
        return (self.project(z) == z).all(dim=-1)

    def value(self, z: Tensor) -> Tensor:
        inside = self.contains(z)
        zero = torch.zeros(inside.shape, dtype=z.dtype, device=z.device)
        return torch.where(inside, zero, torch.full_like(zero, math.inf))


def _check_encode_shapes(x: Tensor, W_enc: Tensor) -> None:
    if x.dim() != 2 or W_enc.dim() != 2 or x.shape[1] != W_enc.shape[1]:
        raise ValueError(f"expected x (N, d) and W_enc (n_atoms, d), got {tuple(x.shape)} and "
                         f"{tuple(W_enc.shape)}")


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

    def encode(self, x, W_enc, b_enc, b_dec=None, *, matmul_dtype=None) -> Pairs:
        """Fused top-k (:func:`~sparsecode.core.kernels.topk_encode`) when ``positive``: pairs
        grouped by row, each row's pairs in decreasing order of value."""
        if not self.positive:
            return super().encode(x, W_enc, b_enc, b_dec, matmul_dtype=matmul_dtype)
        v, idx = topk_encode(x, W_enc, b_enc, b_dec, self.k, matmul_dtype=matmul_dtype)
        return row_pairs(v, idx, keep=v > 0)

    def contains(self, z: Tensor) -> Tensor:
        ok = (z != 0).sum(dim=-1) <= self.k
        if self.positive:
            ok &= (z >= 0).all(dim=-1)
        return ok


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
        # a dense mask from the unsorted selection: the same set as ``support``, without the
        # sort that ordering the pairs costs (this is the inner step of pruning solvers)
        flat, budget = self._budget(z)
        key = (flat if self.positive else flat.abs()).detach()
        kept = flat * top_budget_mask(key, budget)  # a product: a third of torch.where's time
        return (kept.clamp(min=0) if self.positive else kept).reshape(z.shape)

    def _budget(self, z: Tensor) -> tuple[Tensor, int]:
        """``z`` flattened and the number of entries the batch keeps (``k`` per row)."""
        width = z.shape[-1]
        flat = z.reshape(-1)
        rows = flat.numel() // width if width else 0
        return flat, min(self.k * rows, flat.numel())

    def support(self, z: Tensor) -> tuple[Tensor, Tensor]:
        width = z.shape[-1]
        flat, budget = self._budget(z)
        key = flat if self.positive else flat.abs()
        idx = top_budget(key, budget).sort().values  # ties: lowest (row, column)
        idx = idx[_kept(flat[idx], self.positive)]
        return idx // width, idx % width

    def encode(self, x, W_enc, b_enc, b_dec=None, *, matmul_dtype=None) -> Pairs:
        """Fused two-pass batch top-k (:func:`~sparsecode.core.kernels.batch_topk_encode`)
        when ``positive``: pairs sorted by row, then atom."""
        if not self.positive:
            return super().encode(x, W_enc, b_enc, b_dec, matmul_dtype=matmul_dtype)
        return batch_topk_encode(x, W_enc, b_enc, b_dec, self.k, matmul_dtype=matmul_dtype)

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

    Give ``k`` instead of ``m`` for a budget relative to the batch: ``m = ceil(k B / n)`` for
    ``B`` rows and ``n`` features, i.e. ``k`` nonzeros per row on average (Ayonrinde's
    feature choice SAE: the ``k B`` budget of :class:`BatchTopK` shared evenly by the features).
    """

    separable = False

    def __init__(self, m: int | None = None, positive: bool = False, *, k: int | None = None):
        if (m is None) == (k is None):
            raise ValueError("FeatureChoice takes exactly one of m (per feature) and k (per row)")
        _check_positive_int("m" if k is None else "k", m if k is None else k)
        self.m = m
        self.k = k
        self.positive = bool(positive)

    def budget(self, n_rows: int, width: int) -> int:
        """Entries each feature keeps in a batch of ``n_rows`` rows of ``width`` features."""
        if self.m is not None:
            return self.m
        return max(1, math.ceil(self.k * n_rows / max(width, 1)))

    def project(self, z: Tensor) -> Tensor:
        if z.dim() == 0:
            raise ValueError("FeatureChoice needs a tensor with at least one dimension")
        return _from_support(self, z)

    def support(self, z: Tensor) -> tuple[Tensor, Tensor]:
        z2 = z.reshape(-1, z.shape[-1])
        m = min(self.budget(*z2.shape), z2.shape[0])
        key = z2 if self.positive else z2.abs()
        rows = topk_rows(key.T, m)[1].T  # (m, n_features); ties: lowest row
        flat = (rows * z2.shape[1] + torch.arange(z2.shape[1], device=z.device)).reshape(-1)
        flat = flat.sort().values
        rows, cols = flat // z2.shape[1], flat % z2.shape[1]
        keep = _kept(z2[rows, cols], self.positive)
        return rows[keep], cols[keep]

    def encode(self, x, W_enc, b_enc, b_dec=None, *, matmul_dtype=None) -> Pairs:
        """Fused per-feature top-m (:func:`~sparsecode.core.kernels.feature_choice_encode`)
        when ``positive``: pairs sorted by row, then atom."""
        if not self.positive:
            return super().encode(x, W_enc, b_enc, b_dec, matmul_dtype=matmul_dtype)
        m = self.budget(x.shape[0], W_enc.shape[0])
        return feature_choice_encode(x, W_enc, b_enc, b_dec, m, matmul_dtype=matmul_dtype)

    def contains(self, z: Tensor) -> Tensor:
        z2 = z.reshape(-1, z.shape[-1])
        ok = ((z2 != 0).sum(dim=0) <= self.budget(*z2.shape)).all()
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
        a = g.abs().detach()  # the selection only: gradients flow through g
        if self.m <= 16:  # the threshold by a sorting network
            keep = a >= _nth_largest(a, self.n)
            if int(torch.count_nonzero(keep)) == self.n * (a.numel() // self.m):
                return self._ungrouped(g * keep, z)  # no ties at any group's cut
        idx = a.topk(self.n, dim=-1, sorted=False).indices
        kept = torch.zeros_like(g).scatter(-1, idx, g.gather(-1, idx))
        return self._ungrouped(kept, z)

    def contains(self, z: Tensor) -> Tensor:
        g = self._grouped(z)
        group_ok = (g != 0).sum(dim=-1, keepdim=True) <= self.n
        ok = self._ungrouped(group_ok.expand(g.shape), z)
        return ok.all(dim=-1)


def _nth_largest(a: Tensor, n: int) -> Tensor:
    """The ``n``-th largest entry of every group along the last dimension (``(..., 1)``), by
    an odd-even transposition network of elementwise max / min over the ``m`` columns: for the
    small groups of N:M three times faster than ``topk`` (which sorts each group of 4 or 8)."""
    cols = list(a.reshape(-1, a.shape[-1]).unbind(-1))  # strided views: no transposed copy
    m = len(cols)
    for step in range(m):
        for i in range(step % 2, m - 1, 2):
            lo, hi = cols[i], cols[i + 1]
            cols[i], cols[i + 1] = torch.minimum(lo, hi), torch.maximum(lo, hi)
    return cols[m - n].reshape(*a.shape[:-1], 1)


class Support(Projection):
    """Projection onto the subspace of a fixed support: ``z`` where ``mask`` is True, else zero.

    ``mask`` is boolean and broadcasts against ``z`` (one row for every row, or one per row).
    The set a weight update for a given pruning mask lives in (Boža 2024's ADMM weight update).

    >>> import torch
    >>> Support(torch.tensor([True, False, True])).project(torch.tensor([[1.0, 2.0, 3.0]]))
    tensor([[1., 0., 3.]])
    """

    separable = True

    def __init__(self, mask: Tensor):
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise ValueError("Support needs a boolean mask tensor")
        self.mask = mask

    def project(self, z: Tensor) -> Tensor:
        return torch.where(self.mask, z, 0.0)

    def contains(self, z: Tensor) -> Tensor:
        return ((z == 0) | self.mask).all(dim=-1)


class _JumpFn(torch.autograd.Function):
    """``z * H(z - theta)`` with the straight-through threshold gradient of Rajamanoharan et
    al. (2024): ``d/dtheta = -(theta / eps) K((z - theta) / eps)``, ``K`` the rectangle kernel of
    bandwidth ``eps``; ``d/dz = H(z - theta)``. ``theta`` is one per feature (broadcast over the
    rows of ``z``) or one per entry of ``z`` (codes stored as pairs)."""

    @staticmethod
    def forward(ctx, z, theta, bandwidth):
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return z * (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, g):
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_z = g * (z > theta).to(g.dtype)
        grad_theta = None
        if ctx.needs_input_grad[1]:
            grad_theta = _to_theta(-(theta / eps) * _rectangle((z - theta) / eps) * g, theta)
        return grad_z, grad_theta, None


class _StepFn(torch.autograd.Function):
    """Heaviside ``H(z - theta)``: no gradient to ``z``, ``d/dtheta = -(1/eps) K((z-theta)/eps)``
    (the straight-through estimator of an L0 penalty)."""

    @staticmethod
    def forward(ctx, z, theta, bandwidth):
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, g):
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_theta = None
        if ctx.needs_input_grad[1]:
            grad_theta = _to_theta(-(1.0 / eps) * _rectangle((z - theta) / eps) * g, theta)
        return None, grad_theta, None


def _rectangle(u: Tensor) -> Tensor:
    return (u.abs() < 0.5).to(u.dtype)


def _to_theta(grad: Tensor, theta: Tensor) -> Tensor:
    """Sum a threshold gradient over the rows when ``theta`` was broadcast (dense codes); keep
    it per entry when ``theta`` is per entry (one per code pair)."""
    return grad.sum(dim=0) if grad.dim() > theta.dim() else grad


class Jump(Projection):
    """JumpReLU activation (Rajamanoharan et al. 2024): ``u = z * 1{z > theta}`` with a
    per-feature threshold ``theta`` (a float or a tensor broadcast over rows, e.g. ``(n,)``);
    ``positive=False`` keeps ``z * 1{|z| > theta}``. ``Jump(0.0)`` is the ReLU.

    It is the hard threshold of ``sum_i (theta_i^2 / 2) 1{u_i != 0}`` at unit step, but here it
    does not depend on ``step`` (the threshold is learned, not derived from a penalty), so it is
    treated like a projection: ``prox(z, step) = project(z)`` and ``value`` is 0 everywhere
    (the sparsity cost lives in the training loss). ``contains`` tests ``project(z) == z``.
    The threshold tensor is kept by reference, so a learned ``nn.Parameter`` stays live; one
    that requires grad is not range-checked (its optimiser keeps it in range).

    With ``bandwidth`` (a learned threshold, nonnegative) the threshold gets the
    straight-through gradient of the JumpReLU paper through :meth:`project`,
    :meth:`project_pairs` and :meth:`indicator` (its L0), and :meth:`encode` keeps the pairs
    above :attr:`cut` ``= theta - bandwidth / 2``, where the estimator's window starts: pairs in
    the window have value 0 but carry the threshold's gradient.
    """

    separable = True
    bounded = False

    def __init__(self, threshold: float | Tensor, positive: bool = True,
                 bandwidth: float | None = None):
        if isinstance(threshold, Tensor):
            bad = threshold.dim() > 1
            if not bad and not threshold.requires_grad:
                with torch.no_grad():
                    bad = not (bool(torch.isfinite(threshold).all())
                               and bool((threshold >= 0).all()))
            if bad:
                raise ValueError(
                    "threshold must be a finite scalar or 1-D tensor (one per feature) with "
                    f"entries >= 0, got shape {tuple(threshold.shape)}"
                )
            self.threshold: float | Tensor = threshold
        else:
            _check_nonnegative("threshold", threshold)
            self.threshold = float(threshold)
        if bandwidth is not None:
            if not (isinstance(bandwidth, (int, float)) and math.isfinite(bandwidth)
                    and bandwidth > 0):
                raise ValueError(f"bandwidth must be a finite number > 0, got {bandwidth!r}")
            if not positive:
                raise ValueError("the straight-through estimator (bandwidth) needs positive=True")
        self.positive = bool(positive)
        self.bandwidth = None if bandwidth is None else float(bandwidth)

    def _theta(self, like: Tensor, cols: Tensor | None = None) -> Tensor | float:
        theta = self.threshold
        if isinstance(theta, Tensor):
            if cols is not None and theta.dim() == 1:
                theta = theta[cols]
            theta = theta.to(device=like.device, dtype=like.dtype)
        return theta

    @property
    def cut(self) -> Tensor | float:
        """Pre-activations above this take part in the code or its gradient: ``theta``, or
        ``theta - bandwidth / 2`` with the straight-through estimator (no gradient)."""
        theta = self.threshold
        if isinstance(theta, Tensor):
            theta = theta.detach()
        return theta if self.bandwidth is None else theta - self.bandwidth / 2

    def _apply(self, z: Tensor, theta: Tensor | float) -> Tensor:
        if self.bandwidth is not None:
            return _JumpFn.apply(z, torch.as_tensor(theta, dtype=z.dtype, device=z.device),
                                 self.bandwidth)
        key = z if self.positive else z.abs()
        return torch.where(key > theta, z, torch.zeros_like(z))

    def project(self, z: Tensor) -> Tensor:
        return self._apply(z, self._theta(z))

    def project_pairs(self, pre: Tensor, cols: Tensor) -> Tensor:
        return self._apply(pre, self._theta(pre, cols))

    def indicator(self, pre: Tensor, cols: Tensor | None = None) -> Tensor:
        """``1{pre > theta}`` per entry (dense ``pre``, or pairs with their ``cols``), with the
        straight-through gradient to the threshold when ``bandwidth`` is set: the L0 of the
        code, differentiable in ``theta``."""
        theta = self._theta(pre, cols)
        if self.bandwidth is None:
            return (pre > theta).to(pre.dtype)
        return _StepFn.apply(pre, torch.as_tensor(theta, dtype=pre.dtype, device=pre.device),
                             self.bandwidth)

    def encode(self, x, W_enc, b_enc, b_dec=None, *, matmul_dtype=None) -> Pairs:
        """Pairs above :attr:`cut` (fused threshold encode,
        :func:`~sparsecode.core.kernels.threshold_encode`) when ``positive``, sorted by row then
        atom."""
        if not self.positive:
            return super().encode(x, W_enc, b_enc, b_dec, matmul_dtype=matmul_dtype)
        return threshold_encode(x, W_enc, b_enc, b_dec, self.cut, matmul_dtype=matmul_dtype)

    def value(self, z: Tensor) -> Tensor:
        return torch.zeros(z.shape[:-1], dtype=z.dtype, device=z.device)


class ColumnTopK(Projection):
    """Projection onto ``{U : at most k groups of columns of U are nonzero}`` for a batch ``U``
    (leading dimensions flattened), a group being ``groups`` consecutive columns: keep the ``k``
    groups with the largest Frobenius norm over the whole batch, zero the others.

    The l0 counterpart of :class:`~sparsecode.core.penalties.GroupL21` with each group made of
    whole columns shared by every row: with the rows of a weight matrix as the batch, a zero
    column group is an input channel (an MLP neuron, an attention head) removed from the layer,
    i.e. structured pruning. Ties at the cut: the lowest group index wins. Membership is a
    property of the batch: ``contains`` gives every row the batch's answer.

    >>> import torch
    >>> ColumnTopK(1).project(torch.tensor([[1.0, 0.0, 3.0], [1.0, 2.0, 0.0]]))
    tensor([[0., 0., 3.],
            [0., 0., 0.]])
    """

    separable = False

    def __init__(self, k: int, groups: int = 1):
        _check_positive_int("k", k)
        _check_positive_int("groups", groups)
        self.k = k
        self.groups = groups

    def _group_norms(self, z: Tensor) -> Tensor:
        if z.dim() == 0:
            raise ValueError("ColumnTopK needs a tensor with at least one dimension")
        n = z.shape[-1]
        if n % self.groups:
            raise ValueError(
                f"the last dimension ({n}) is not divisible by the group size {self.groups}"
            )
        z2 = z.detach().reshape(-1, n // self.groups, self.groups)
        return z2.square().sum(dim=(0, 2))

    def kept_groups(self, z: Tensor) -> Tensor:
        """Sorted indices of the ``min(k, n_groups)`` kept column groups."""
        norms = self._group_norms(z)
        return top_budget(norms, min(self.k, norms.numel())).sort().values

    def project(self, z: Tensor) -> Tensor:
        n_groups = self._group_norms(z).numel()
        if self.k >= n_groups:
            return z.clone()
        keep = torch.zeros(n_groups, dtype=torch.bool, device=z.device)
        keep[self.kept_groups(z)] = True
        return torch.where(keep.repeat_interleave(self.groups), z, 0.0)

    def contains(self, z: Tensor) -> Tensor:
        n = z.shape[-1]
        nz = (z.reshape(-1, n // self.groups, self.groups) != 0).any(dim=(0, 2)) \
            if n % self.groups == 0 else None
        if nz is None:
            raise ValueError(
                f"the last dimension ({n}) is not divisible by the group size {self.groups}"
            )
        return _per_row(nz.sum() <= self.k, z)
