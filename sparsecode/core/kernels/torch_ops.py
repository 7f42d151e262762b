"""Torch implementations of the sparse encode / decode operations (see the package docstring),
with the Triton kernels plugged in where :mod:`.dispatch` selects them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .dispatch import interpreter_dtype_ok, use_triton


def preact(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor | None = None) -> Tensor:
    """Encoder pre-activations ``(x - b_dec) @ W_enc^T + b_enc``; ``W_enc`` is ``(n_atoms, d)``.

    Computed in the dtype of ``W_enc`` (pass bf16 copies for a bf16 matmul)."""
    xc = x if b_dec is None else x - b_dec.to(x.dtype)
    return F.linear(xc.to(W_enc.dtype), W_enc, b_enc.to(W_enc.dtype))


def row_offsets(rows: Tensor, n_rows: int) -> Tensor:
    """``embedding_bag`` offsets (start of each row's pairs) for pairs sorted by row."""
    counts = torch.bincount(rows, minlength=n_rows)
    return torch.cumsum(counts, 0) - counts


def _bags_by(keys: Tensor, n_bags: int) -> tuple[Tensor, Tensor]:
    """Stable order that groups pairs by ``keys`` and the resulting bag offsets."""
    order = torch.argsort(keys, stable=True)
    return order, row_offsets(keys[order], n_bags)


def _csr(starts: Tensor, nnz: int) -> Tensor:
    """Bag start offsets plus the end: ``(n_bags + 1,)``."""
    return torch.cat([starts, starts.new_tensor([nnz])])


def bag_sum(idx: Tensor, table: Tensor, starts: Tensor, weights: Tensor | None) -> Tensor:
    """``out[b] = sum over p in bag b of weights[p] * table[idx[p]]`` (bags are consecutive runs
    of pairs starting at ``starts``): ``embedding_bag(mode="sum")``, or the deterministic Triton
    kernel (fp32 accumulation, each output row written once) where the dispatch selects it."""
    if use_triton(idx, table, weights) and interpreter_dtype_ok(table, weights):
        from . import triton_ops

        return triton_ops.bag_sum(idx, table, _csr(starts, idx.numel()), weights)
    return F.embedding_bag(idx, table, starts, per_sample_weights=weights, mode="sum")


class _GatherPreact(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, rows, cols, values):  # noqa: D401
        ctx.save_for_backward(x, W_enc, b_dec, rows, cols)
        ctx.b_enc_dtype = b_enc.dtype
        return values

    @staticmethod
    def backward(ctx, g):
        x, W_enc, b_dec, rows, cols = ctx.saved_tensors
        n_atoms = W_enc.shape[0]
        g = g.to(W_enc.dtype)
        grad_x = grad_W = grad_b_enc = grad_b_dec = None
        # gradient per atom: sum of g over the pairs that selected it, accumulated in fp32 at
        # least (a bf16 index_add_ stalls at 256 ones: an atom chosen by 4096 tokens got 256)
        acc = torch.promote_types(g.dtype, torch.float32)
        atom_sum = torch.zeros(n_atoms, dtype=acc, device=g.device).index_add_(0, cols, g.to(acc))
        if ctx.needs_input_grad[2]:
            grad_b_enc = atom_sum.to(ctx.b_enc_dtype)
        if ctx.needs_input_grad[1]:
            # dL/dW_enc[j] = sum over pairs (i, j) of g * (x_i - b_dec): bags grouped by atom
            xc = x if b_dec is None else x - b_dec
            order, offsets = _bags_by(cols, n_atoms)
            grad_W = bag_sum(rows[order], xc.to(g.dtype), offsets, g[order])
        if b_dec is not None and ctx.needs_input_grad[3]:
            # d/db_dec of (x - b_dec) @ W^T: minus the atoms' gradient pushed through W
            grad_b_dec = -(atom_sum.to(W_enc.dtype) @ W_enc).to(b_dec.dtype)
        if ctx.needs_input_grad[0]:
            grad_x = bag_sum(cols, W_enc, row_offsets(rows, x.shape[0]), g).to(x.dtype)
        return grad_x, grad_W, grad_b_enc, grad_b_dec, None, None, None


def gather_preact(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor | None,
    rows: Tensor,
    cols: Tensor,
    pre: Tensor | None = None,
) -> Tensor:
    """Selected pre-activations ``preact(x, W_enc, b_enc, b_dec)[rows, cols]`` with a sparse
    backward.

    ``pre`` may be the pre-activations already computed without gradient (e.g. in bf16 to choose
    ``rows, cols``); its selected entries are reused. Gradients flow to ``x``, ``W_enc``,
    ``b_enc`` and ``b_dec`` exactly as through the dense expression, at O(nnz * d) cost: the
    ``W_enc`` gradient is an ``embedding_bag`` over the pairs grouped by atom (no atomics, no
    ``(N, n_atoms)`` or ``(N, k, d)`` temporary).

    >>> import torch
    >>> x, W, b = torch.randn(4, 3), torch.randn(5, 3, requires_grad=True), torch.zeros(5)
    >>> rows, cols = torch.tensor([0, 0, 2]), torch.tensor([1, 4, 0])
    >>> v = gather_preact(x, W, b, None, rows, cols)
    >>> torch.allclose(v, (x @ W.T)[rows, cols])
    True
    """
    if pre is None:
        with torch.no_grad():
            pre = preact(x, W_enc, b_enc, b_dec)
    values = pre[rows, cols].to(W_enc.dtype)
    return _GatherPreact.apply(x, W_enc, b_enc, b_dec, rows, cols, values)


def sparse_preact(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor | None,
    rows: Tensor,
    cols: Tensor,
    values: Tensor,
) -> Tensor:
    """``values`` (the pre-activations at ``(rows, cols)``, computed elsewhere without gradient,
    e.g. by a fused top-k encode) with the sparse backward of :func:`gather_preact` attached."""
    return _GatherPreact.apply(x, W_enc, b_enc, b_dec, rows, cols, values.to(W_enc.dtype))


def pair_dot(A: Tensor, ra: Tensor, B: Tensor, rb: Tensor, out_dtype: torch.dtype) -> Tensor:
    """``out[p] = <A[ra[p]], B[rb[p]]>`` for pairs grouped by ``ra`` (nondecreasing), accumulated
    in fp32 at least: the gradient of decoded values (k dot products per token). Triton kernel
    where the dispatch selects it; otherwise ``embedding_bag``'s per-sample-weight gradient
    (bags = rows of ``A``), which takes the dot products without gathering the pairs' rows.

    >>> import torch
    >>> A, B = torch.eye(2), torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    >>> pair_dot(A, torch.tensor([0, 1]), B, torch.tensor([1, 1]), torch.float32).tolist()
    [3.0, 4.0]
    """
    if use_triton(A, ra, B, rb) and interpreter_dtype_ok(A, B):
        from . import triton_ops

        return triton_ops.pair_dot(A, ra, B, rb, out_dtype)
    if ra.numel() == 0:
        return torch.empty(0, dtype=out_dtype, device=A.device)
    w = torch.ones(ra.numel(), dtype=B.dtype, device=B.device, requires_grad=True)
    with torch.enable_grad():
        out = F.embedding_bag(rb, B.detach(), row_offsets(ra, A.shape[0]), per_sample_weights=w,
                              mode="sum")
        (grad,) = torch.autograd.grad(out, w, A.to(out.dtype))
    return grad.to(out_dtype)


class _BagDecode(torch.autograd.Function):
    """Sparse decode ``out[b] = sum over pairs p of bag b of w[p] * W[idx[p]]`` with the pairs
    already grouped by bag (:func:`bag_sum`). Backward: ``grad w[p] = <g[bag[p]], W[idx[p]]>``
    (:func:`pair_dot`) and ``grad W[j] = sum over pairs with idx = j of w * g[bag]`` (the pairs
    sorted by atom, one more :func:`bag_sum`: each gradient row written once, deterministic, no
    float atomics). Both accumulate in fp32 at least, also for bf16 / fp16 ``W``
    (``embedding_bag``'s own ``W`` gradient sums a bf16 gradient in bf16: 4096 ones gave 256)."""

    @staticmethod
    def forward(ctx, weights, W, idx, bag, starts):  # noqa: D401
        ctx.save_for_backward(weights, W, idx, bag)
        return bag_sum(idx, W, starts, weights)

    @staticmethod
    def backward(ctx, g):
        weights, W, idx, bag = ctx.saved_tensors
        g = g.contiguous()
        grad_w = grad_W = None
        if ctx.needs_input_grad[0]:
            grad_w = pair_dot(g, bag, W, idx, weights.dtype)
        if ctx.needs_input_grad[1]:
            order, starts = _bags_by(idx, W.shape[0])
            grad_W = bag_sum(bag[order], g, starts, weights[order].to(g.dtype)).to(W.dtype)
        return grad_w, grad_W, None, None, None


def sparse_decode(
    values: Tensor,
    rows: Tensor,
    cols: Tensor,
    W_dec: Tensor,
    n_rows: int,
    bias: Tensor | None = None,
    groups: Tensor | None = None,
) -> Tensor:
    """``sum over pairs (i, j) of values * W_dec[j]`` into row ``i``: a ragged gather of atoms.

    ``rows`` must be sorted (as returned by ``Projection.support``). Differentiable in
    ``values`` and ``W_dec`` (a sparse backward, fp32 accumulation also for bf16 / fp16
    ``W_dec``; see :class:`_BagDecode`); never forms the dense code. With ``groups``
    (a group id per atom, ``0 .. G-1``, nondecreasing in the atom index) the result is
    ``(n_rows, G, d)``: the contribution of each group of atoms separately, so that a cumulative
    sum over ``G`` gives every Matryoshka prefix reconstruction in one pass. ``bias`` is added to
    the ungrouped result only.

    >>> import torch
    >>> W = torch.eye(3)
    >>> sparse_decode(torch.tensor([2.0, 5.0]), torch.tensor([0, 2]), torch.tensor([1, 0]), W, 3)
    tensor([[0., 2., 0.],
            [0., 0., 0.],
            [5., 0., 0.]])
    """
    weights = values.to(W_dec.dtype)
    if groups is None:
        out = _BagDecode.apply(weights, W_dec, cols, rows, row_offsets(rows, n_rows))
        return out if bias is None else out + bias
    n_groups = int(groups.max().item()) + 1 if groups.numel() else 1
    bag = rows * n_groups + groups[cols]  # sorted by row; group order within a row is fixed below
    order, offsets = _bags_by(bag, n_rows * n_groups)
    out = _BagDecode.apply(weights[order], W_dec, cols[order], bag[order], offsets)
    return out.reshape(n_rows, n_groups, W_dec.shape[1])
