"""Fused top-k encode: ``select_k((x - b_dec) @ W_enc^T + b_enc)`` without the dense
``(N, n_atoms)`` pre-activation matrix.

On CUDA tensors with ``triton`` installed the selection runs in one fused kernel
(:mod:`.triton_ops`: matmul tiles with a running top-k in registers, then a tiny merge of the
per-slice candidates). Elsewhere the torch fallback computes the pre-activations a chunk of rows
at a time, so that no more than ``max_bytes`` of them (plus selection temporaries) exist at once.

Tie rule (both paths, and the projection operators: :mod:`sparsecode.core.select`): among equal
values the lowest atom index is selected first (batch top-k: the lowest ``(row, atom)``; feature
choice: the lowest row), and each row of a top-k is returned sorted by value (descending), equal
values by atom index (ascending). So both paths return identical results whenever they compute
bit-identical pre-activations.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from ..select import row_pairs, sorted_pairs, top_budget, topk_rows
from .dispatch import use_triton
from .torch_ops import preact, sparse_preact

#: Default memory budget of the torch fallback for one chunk of pre-activations and the
#: selection temporaries (``SPARSECODE_ENCODE_CHUNK_BYTES`` overrides it). On CPU a smaller
#: chunk is faster: the selection reads the chunk while it is still in cache (top-k of 32 over
#: 4096 x 9216 on 2 cores: 172 ms at 256 MiB, 145 ms at 96 MiB; docs/core.md).
DEFAULT_CHUNK_BYTES = 256 * 2**20
CPU_CHUNK_BYTES = 96 * 2**20


def _budget(max_bytes: int | None, device: torch.device) -> int:
    if max_bytes is not None:
        return max(1, int(max_bytes))
    env = os.environ.get("SPARSECODE_ENCODE_CHUNK_BYTES")
    if env:
        return int(env)
    return CPU_CHUNK_BYTES if device.type == "cpu" else DEFAULT_CHUNK_BYTES


def _select_topk(xc: Tensor, W: Tensor, b_enc: Tensor, k: int, max_bytes: int | None
                 ) -> tuple[Tensor, Tensor]:
    """No-grad selection on centred inputs ``xc`` (already in ``W``'s dtype)."""
    if use_triton(xc, W, b_enc):
        from . import triton_ops

        if triton_ops.topk_supported(xc, W, k):
            return triton_ops.topk_select(xc, W, b_enc, k)
    N, n = xc.shape[0], W.shape[0]
    per_row = n * (W.element_size() + 6) + 1  # pre-activations + bool / int32 temporaries
    chunk = max(1, _budget(max_bytes, xc.device) // per_row)
    if chunk >= N:
        return topk_rows(preact(xc, W, b_enc), k)
    vals = torch.empty((N, k), dtype=W.dtype, device=xc.device)
    idx = torch.empty((N, k), dtype=torch.long, device=xc.device)
    for s in range(0, N, chunk):
        v, i = topk_rows(preact(xc[s : s + chunk], W, b_enc), k)
        vals[s : s + chunk], idx[s : s + chunk] = v, i
    return vals, idx


def _selection_weights(W_enc: Tensor, matmul_dtype: torch.dtype | None) -> Tensor:
    """``W_enc`` without gradient, in ``matmul_dtype`` when given: what the selection multiplies
    with (a new copy on every call when the dtype differs)."""
    W = W_enc.detach()
    return W if matmul_dtype is None else W.to(matmul_dtype)


def _centred(x: Tensor, W: Tensor, b_dec: Tensor | None) -> Tensor:
    xc = x if b_dec is None else x - b_dec.to(x.dtype)
    return xc.to(W.dtype)


def _check_shapes(x: Tensor, W_enc: Tensor) -> None:
    if x.dim() != 2 or W_enc.dim() != 2 or x.shape[1] != W_enc.shape[1]:
        raise ValueError(f"expected x (N, d) and W_enc (n_atoms, d), got {tuple(x.shape)} and "
                         f"{tuple(W_enc.shape)}")


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")


def _needs_grad(*ts: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def _no_pairs(W_enc: Tensor, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    e = torch.empty(0, dtype=torch.long, device=device)
    return e, e, torch.empty(0, dtype=W_enc.dtype, device=device)


def _with_backward(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor | None, rows: Tensor,
                   cols: Tensor, vals: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The pairs, their values in ``W_enc``'s dtype carrying the sparse encoder backward."""
    vals = vals.to(W_enc.dtype)
    if _needs_grad(x, W_enc, b_enc, b_dec):
        vals = sparse_preact(x, W_enc, b_enc, b_dec, rows, cols, vals)
    return rows, cols, vals


def topk_encode(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor | None,
    k: int,
    *,
    relu: bool = True,
    matmul_dtype: torch.dtype | None = None,
    max_bytes: int | None = None,
) -> tuple[Tensor, Tensor]:
    """The ``k`` largest pre-activations ``(x - b_dec) @ W_enc^T + b_enc`` of each row of a 2-D
    ``x``: ``(values (N, k), indices (N, k) int64)``, rows sorted by value (see the module's tie
    rule). ``W_enc`` is ``(n_atoms, d)`` (any strides); ``k`` is clipped to ``n_atoms``.

    ``relu=True`` clamps the values at zero (the TopK SAE activation; the selection is over the
    raw values, as ``TopK(k, positive=True)``). ``matmul_dtype`` (e.g. ``torch.bfloat16``) runs
    the selection matmul in that precision. The values carry the sparse encoder backward of
    :func:`gather_preact` (gradients to ``x``, ``W_enc``, ``b_enc``, ``b_dec`` at O(N k d) cost).
    ``max_bytes`` bounds the pre-activation chunk of the torch fallback.

    >>> import torch
    >>> x, W, b = torch.randn(6, 4), torch.randn(10, 4), torch.zeros(10)
    >>> v, i = topk_encode(x, W, b, None, 3, relu=False)
    >>> torch.allclose(v, (x @ W.T).topk(3, dim=1).values)
    True
    """
    _check_shapes(x, W_enc)
    _check_k(k)
    k = min(k, W_enc.shape[0])
    with torch.no_grad():
        W = _selection_weights(W_enc, matmul_dtype)
        b = b_enc.detach().to(W.dtype)
        vals, idx = _select_topk(_centred(x.detach(), W, b_dec), W, b, k, max_bytes)
    vals = vals.to(W_enc.dtype)
    if _needs_grad(x, W_enc, b_enc, b_dec):
        vals = sparse_preact(x, W_enc, b_enc, b_dec, *row_pairs(vals, idx)).reshape(vals.shape)
    return (vals.relu() if relu else vals), idx


def batch_topk_encode(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor | None,
    k: int,
    *,
    relu: bool = True,
    matmul_dtype: torch.dtype | None = None,
    row_cap: int | None = None,
    max_bytes: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Batch top-k without the dense pre-activations: the ``k * N`` largest entries of the
    ``(N, n_atoms)`` pre-activations over the whole batch, as ``(rows, cols, values)`` sorted by
    row then atom (the largest values, not magnitudes; with ``relu`` the positive ones are kept:
    what ``BatchTopK(k, positive=True).support`` selects). Values carry the sparse encoder
    backward.

    Two passes: (1) a fused per-row top-``row_cap`` (default ``min(n_atoms, 4k)``) gives a
    candidate pool and its ``kN``-th largest value ``t``; every row whose ``row_cap``-th candidate
    is below ``t`` cannot hold more winners than its candidates, so the pool's top ``kN`` is exact
    for it. (2) Rows that saturate are re-encoded with a 4x larger cap (up to ``n_atoms``) and
    the threshold is recomputed; ``t`` only grows, so finished rows stay exact. Ties at the cut:
    the lowest ``(row, atom)`` first, as ``BatchTopK``.
    """
    _check_shapes(x, W_enc)
    _check_k(k)
    N, n = x.shape[0], W_enc.shape[0]
    dev = x.device
    if N == 0 or n == 0:
        return _no_pairs(W_enc, dev)
    budget = min(k * N, N * n)
    cap = min(n, row_cap if row_cap is not None else 4 * k)
    with torch.no_grad():
        W = _selection_weights(W_enc, matmul_dtype)
        b = b_enc.detach().to(W.dtype)
        xc = _centred(x.detach(), W, b_dec)
        done_r, done_c, done_v = [], [], []
        pending = torch.arange(N, device=dev)
        while True:
            v, i = _select_topk(xc[pending], W, b, cap, max_bytes)
            pool = torch.cat([*done_v, v.reshape(-1)])
            t = pool.topk(min(budget, pool.numel()), sorted=False).values.min()
            sat = v[:, -1] >= t if cap < n else torch.zeros_like(pending, dtype=torch.bool)
            ok = ~sat
            done_r.append(pending[ok].repeat_interleave(cap))
            done_c.append(i[ok].reshape(-1))
            done_v.append(v[ok].reshape(-1))
            if not bool(sat.any()):
                break
            pending, cap = pending[sat], min(n, 4 * cap)
        rows, cols, vals = torch.cat(done_r), torch.cat(done_c), torch.cat(done_v)
        top = top_budget(vals, budget, order=rows * n + cols)  # ties: lowest (row, atom)
        rows, cols, vals = sorted_pairs(rows[top], cols[top], vals[top], n, relu)
    return _with_backward(x, W_enc, b_enc, b_dec, rows, cols, vals)


def feature_choice_encode(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor | None,
    m: int,
    *,
    relu: bool = True,
    matmul_dtype: torch.dtype | None = None,
    max_bytes: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Feature choice without the dense pre-activations: every atom keeps the ``m`` rows of a
    2-D ``x`` where its pre-activation ``(x - b_dec) @ W_enc^T + b_enc`` is largest, as
    ``(rows, cols, values)`` sorted by row then atom (the largest values, not magnitudes; with
    ``relu`` the positive ones are kept: what ``FeatureChoice(m, positive=True).support``
    selects). ``m`` is clipped to ``N``.

    It is :func:`topk_encode`'s selection on the transposed problem (atoms as rows, the centred
    inputs as atoms: fused on GPU, row chunks elsewhere); ``b_enc`` is constant along each
    transposed row, so it is added after the selection. Ties: the lowest row index first. Values
    carry the sparse encoder backward.

    >>> import torch
    >>> x, W, b = torch.randn(9, 4), torch.randn(6, 4), torch.zeros(6)
    >>> rows, cols, v = feature_choice_encode(x, W, b, None, 2, relu=False)
    >>> torch.equal(torch.bincount(cols), torch.full((6,), 2))
    True
    """
    _check_shapes(x, W_enc)
    _check_k(m)
    N, n = x.shape[0], W_enc.shape[0]
    dev = x.device
    if N == 0 or n == 0:
        return _no_pairs(W_enc, dev)
    m = min(m, N)
    with torch.no_grad():
        W = _selection_weights(W_enc, matmul_dtype)
        xc = _centred(x.detach(), W, b_dec)
        v, tok = _select_topk(W, xc, torch.zeros(N, dtype=W.dtype, device=dev), m, max_bytes)
        cols, rows, vals = row_pairs(v + b_enc.detach().to(W.dtype)[:, None], tok)  # transposed
        rows, cols, vals = sorted_pairs(rows, cols, vals, n, relu)
    return _with_backward(x, W_enc, b_enc, b_dec, rows, cols, vals)


def threshold_encode(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor | None,
    threshold: Tensor | float = 0.0,
    *,
    matmul_dtype: torch.dtype | None = None,
    max_bytes: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Pairs whose pre-activation ``(x - b_dec) @ W_enc^T + b_enc`` exceeds ``threshold`` (a
    number, or one per atom): the ReLU (``0``) / JumpReLU (``theta``) code of a 2-D ``x`` as
    ``(rows, cols, values)`` sorted by row then atom, without the dense pre-activations (fused
    two-pass Triton kernel on GPU; row chunks within ``max_bytes`` in the torch fallback).

    Values carry the sparse encoder backward (to ``x``, ``W_enc``, ``b_enc``, ``b_dec``; there is
    no gradient for ``threshold``: the JumpReLU SAE encodes above ``theta - bandwidth / 2`` and
    applies its straight-through estimator to the pairs).

    >>> import torch
    >>> x, W, b = torch.randn(5, 3), torch.randn(8, 3), torch.zeros(8)
    >>> rows, cols, v = threshold_encode(x, W, b, None, 0.5)
    >>> pre = x @ W.T
    >>> torch.equal(torch.stack([rows, cols]), (pre > 0.5).nonzero().T)
    True
    """
    _check_shapes(x, W_enc)
    N, n = x.shape[0], W_enc.shape[0]
    with torch.no_grad():
        W = _selection_weights(W_enc, matmul_dtype)
        b = b_enc.detach().to(W.dtype)
        thr = torch.as_tensor(threshold, device=x.device).detach().expand(n)
        xc = _centred(x.detach(), W, b_dec)
        out = None
        if use_triton(xc, W, b):
            from . import triton_ops

            if triton_ops.topk_supported(xc, W, 1):
                out = triton_ops.threshold_select(xc, W, b, thr)
        if out is None:
            chunk = max(1, _budget(max_bytes, x.device) // (n * (W.element_size() + 1) + 1))
            parts = []
            for s in range(0, N, chunk):
                pre = preact(xc[s : s + chunk], W, b)
                r, c = (pre > thr.to(pre.dtype)).nonzero(as_tuple=True)
                parts.append((r + s, c, pre[r, c]))
            if parts:
                out = tuple(torch.cat(p) for p in zip(*parts, strict=True))
            else:
                out = _no_pairs(W, x.device)
        rows, cols, vals = out
    return _with_backward(x, W_enc, b_enc, b_dec, rows, cols, vals)
