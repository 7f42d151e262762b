"""Torch implementations of the sparse encode / decode operations (see the package docstring)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


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


class _GatherPreact(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, rows, cols, values):  # noqa: D401
        ctx.save_for_backward(x, W_enc, b_dec, rows, cols)
        return values

    @staticmethod
    def backward(ctx, g):
        x, W_enc, b_dec, rows, cols = ctx.saved_tensors
        n_atoms = W_enc.shape[0]
        g = g.to(W_enc.dtype)
        grad_x = grad_W = grad_b_enc = grad_b_dec = None
        # gradient per atom: sum of g over the pairs that selected it
        atom_sum = torch.zeros(n_atoms, dtype=g.dtype, device=g.device).index_add_(0, cols, g)
        if ctx.needs_input_grad[2]:
            grad_b_enc = atom_sum
        if ctx.needs_input_grad[1]:
            # dL/dW_enc[j] = sum over pairs (i, j) of g * (x_i - b_dec): bags grouped by atom
            xc = x if b_dec is None else x - b_dec
            order, offsets = _bags_by(cols, n_atoms)
            grad_W = F.embedding_bag(
                rows[order], xc.to(g.dtype), offsets, per_sample_weights=g[order], mode="sum"
            )
        if b_dec is not None and ctx.needs_input_grad[3]:
            # d/db_dec of (x - b_dec) @ W^T: minus the atoms' gradient pushed through W
            grad_b_dec = -(atom_sum @ W_enc)
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(
                cols, W_enc, row_offsets(rows, x.shape[0]), per_sample_weights=g, mode="sum"
            ).to(x.dtype)
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
    ``values`` and ``W_dec`` (``embedding_bag``); never forms the dense code. With ``groups``
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
        out = F.embedding_bag(
            cols, W_dec, row_offsets(rows, n_rows), per_sample_weights=weights, mode="sum"
        )
        return out if bias is None else out + bias
    n_groups = int(groups.max().item()) + 1 if groups.numel() else 1
    bag = rows * n_groups + groups[cols]  # sorted by row; group order within a row is fixed below
    order, offsets = _bags_by(bag, n_rows * n_groups)
    out = F.embedding_bag(
        cols[order], W_dec, offsets, per_sample_weights=weights[order], mode="sum"
    )
    return out.reshape(n_rows, n_groups, W_dec.shape[1])
