"""Triton kernels for the sparse encode / decode operations (used through the dispatch in
:mod:`sparsecode.core.kernels`; this module imports without ``triton`` and then defines nothing).

Kernels
-------
``_topk_candidates_kernel``
    Fused encoder matmul + bias + running top-k. Program ``(m, s)`` owns ``BM`` tokens and the
    ``s``-th slice of the atoms; it streams that slice in tiles of ``BN`` atoms, computes the tile
    ``x_blk @ W_tile^T + b`` with fp32 accumulation (``tl.dot``) and merges it into a running
    top-``KP`` kept in registers (``KP`` = ``k`` rounded up to a power of two). A tile is merged
    only when some row of the block has an entry above its current ``KP``-th best; the merge is
    the tile's own top-``KP`` (``tl.topk``) folded into the sorted running one by a single
    bitonic merge (``_merge_sorted``: ``log2(KP)`` compare-exchange rounds). Each
    (value, atom) pair is one int64 key: the float's order-preserving bits in the high word and
    ``2^32 - 1 - atom`` in the low word, so sorting keys sorts by value and, among equal values,
    puts the lowest atom index first (the tie rule). The kernel writes ``KP`` candidate keys per
    token and slice: ``(N, S, KP)`` int64, never the ``(N, n_atoms)`` pre-activations. A tiny
    second pass (``torch.topk`` on the ``S * KP`` keys per token) finishes the selection.
``_threshold_kernel``
    Fused encoder matmul + bias + per-atom threshold (ReLU: 0, JumpReLU: ``theta``) with a
    variable number of outputs: a counting pass, then a pass that recomputes the tiles and writes
    each row's (atom, value) pairs at its offset (``tl.cumsum`` within a tile, a running count
    across tiles), sorted by row then atom; the row of each pair follows from the counts. Two
    encoder matmuls, no ``(N, n_atoms)`` matrix, no atomics.
``_bag_sum_kernel``
    ``out[b] = sum over p in bag b of w[p] * table[idx[p]]``: ``embedding_bag(mode="sum")`` with
    CSR offsets, one program per (bag, block of columns), accumulation in fp32 (fp64 for fp64
    tables), each output row written once: no atomics, deterministic. It is the sparse decode
    forward, and with the pairs sorted by atom it is the decoder and encoder weight gradients
    (``grad W[j] = sum over pairs (i, j) of g * y[i]``) and the encoder input gradient.
``_pair_dot_kernel``
    ``out[p] = <A[ra[p]], B[rb[p]]>`` for a list of pairs: the gradient of the decoded values
    (k dot products per token), fp32 accumulation.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None
    tl = None

#: Sentinel order bits below every float (``orderable(-inf) - 1``) for masked atoms.
_LOW_BITS = -2139095042
_LOW32 = 4294967295


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


if triton is not None:
    _LOW_BITS_C = tl.constexpr(_LOW_BITS)
    _LOW32_C = tl.constexpr(_LOW32)

    @triton.jit
    def _preact_tile(
        X, W, B, rows64, mask_m, offs_n, mask_n, D,
        sxn, sxd, swn, swd,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr,
    ):
        """Pre-activations ``X[rows] @ W[atoms]^T + B[atoms]`` of one (BM, BN) tile, float32."""
        atoms64 = offs_n.to(tl.int64)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, D, BK):
            offs_k = k0 + tl.arange(0, BK)
            mask_k = offs_k < D
            a = tl.load(X + rows64[:, None] * sxn + offs_k[None, :] * sxd,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            w = tl.load(W + atoms64[:, None] * swn + offs_k[None, :] * swd,
                        mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            if IEEE:
                acc = tl.dot(a, tl.trans(w), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, tl.trans(w), acc)
        bias = tl.load(B + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        return acc + bias[None, :]

    @triton.jit
    def _xor(a, b):
        return a ^ b

    @triton.jit
    def _upper_half(NDIM: tl.constexpr, AXIS: tl.constexpr):
        """``[0, 1]`` along axis ``AXIS`` of an ``NDIM``-d broadcast shape, as booleans."""
        return tl.reshape(tl.arange(0, 2), [1] * AXIS + [2] + [1] * (NDIM - 1 - AXIS)) == 1

    @triton.jit
    def _merge_sorted(a, b, BM: tl.constexpr, KP: tl.constexpr):
        """Top ``KP`` of two rows-wise descending ``(BM, KP)`` key blocks, descending.

        ``max(a[i], b[KP-1-i])`` holds the top ``KP`` of the union and is bitonic (it falls,
        then rises), so one bitonic merge sorts it: ``log2(KP)`` compare-exchange rounds instead
        of sorting the ``2 * KP`` concatenation from scratch. The block is viewed as a hypercube
        ``(BM, 2, ..., 2)``; round ``i`` pairs the entries that differ in axis ``i`` (stride
        ``KP / 2^i``), and a partner is read as ``h ^ xor-reduce(h over that axis)``, which keeps
        every value in its thread (no layout conversion).
        """
        h = tl.maximum(a, tl.flip(b, 1))
        if KP > 1:
            LOG: tl.constexpr = KP.bit_length() - 1
            h = tl.reshape(h, [BM] + [2] * LOG)
            for i in tl.static_range(LOG):
                partner = h ^ tl.reduce(h, 1 + i, _xor, keep_dims=True)
                upper = _upper_half(1 + LOG, 1 + i)
                h = tl.where(upper, tl.minimum(h, partner), tl.maximum(h, partner))
            h = tl.reshape(h, (BM, KP))
        return h

    @triton.jit
    def _topk_candidates_kernel(
        X, W, B, OUT,
        N, D, NA, span,
        sxn, sxd, swn, swd, son, sos,
        KP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_s = tl.program_id(1)
        offs_m = pid_m * BM + tl.arange(0, BM)
        mask_m = offs_m < N
        rows64 = offs_m.to(tl.int64)  # 64-bit offsets: N * d or n_atoms * d may pass 2^31
        lo = pid_s * span
        hi = tl.minimum(lo + span, NA)
        best = tl.full((BM, KP), _LOW_BITS_C, tl.int64) << 32
        for n0 in range(lo, hi, BN):
            offs_n = n0 + tl.arange(0, BN)
            mask_n = offs_n < hi
            acc = _preact_tile(X, W, B, rows64, mask_m, offs_n, mask_n, D,
                               sxn, sxd, swn, swd, BM, BN, BK, IEEE)
            bits = acc.to(tl.int32, bitcast=True)
            bits = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
            bits = tl.where(mask_n[None, :], bits, _LOW_BITS_C)
            low = _LOW32_C - offs_n.to(tl.int64)
            key = (bits.to(tl.int64) << 32) | low[None, :]
            # merge only if some row has an entry above its current KP-th best
            gain = tl.max((tl.max(key, axis=1) > tl.min(best, axis=1)).to(tl.int32), axis=0)
            if gain > 0:
                best = _merge_sorted(best, tl.topk(key, KP, dim=1), BM, KP)
        offs_c = tl.arange(0, KP)
        tl.store(OUT + rows64[:, None] * son + pid_s * sos + offs_c[None, :], best,
                 mask=mask_m[:, None])

    @triton.jit
    def _threshold_kernel(
        X, W, B, THR, COUNT, OFFS, COLS, VALS,
        N, D, NA,
        sxn, sxd, swn, swd,
        WRITE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        offs_m = pid_m * BM + tl.arange(0, BM)
        mask_m = offs_m < N
        rows64 = offs_m.to(tl.int64)
        cnt = tl.zeros((BM,), dtype=tl.int64)
        if WRITE:
            cnt = tl.load(OFFS + offs_m, mask=mask_m, other=0)
        for n0 in range(0, NA, BN):
            offs_n = n0 + tl.arange(0, BN)
            mask_n = offs_n < NA
            atoms64 = offs_n.to(tl.int64)
            acc = _preact_tile(X, W, B, rows64, mask_m, offs_n, mask_n, D,
                               sxn, sxd, swn, swd, BM, BN, BK, IEEE)
            thr = tl.load(THR + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            hit = (acc > thr[None, :]) & mask_n[None, :] & mask_m[:, None]
            h = hit.to(tl.int32)
            if WRITE:
                # rank within the row's pairs of this tile (int32: at most BN), then global
                pos = cnt[:, None] + (tl.cumsum(h, axis=1) - h).to(tl.int64)
                tl.store(COLS + pos, tl.broadcast_to(atoms64[None, :], (BM, BN)), mask=hit)
                tl.store(VALS + pos, acc, mask=hit)
            cnt += tl.sum(h, axis=1).to(tl.int64)
        if not WRITE:
            tl.store(COUNT + offs_m, cnt, mask=mask_m)


    @triton.jit
    def _bag_sum_kernel(
        IDX, WGT, OFF, TABLE, OUT, D,
        st_r, st_d, so_r, so_d,
        HAS_W: tl.constexpr, BD: tl.constexpr, ACC64: tl.constexpr,
    ):
        bag = tl.program_id(0)
        pid_d = tl.program_id(1)
        offs_d = pid_d * BD + tl.arange(0, BD)
        mask_d = offs_d < D
        start = tl.load(OFF + bag)
        end = tl.load(OFF + bag + 1)
        if ACC64:
            acc = tl.zeros((BD,), dtype=tl.float64)
        else:
            acc = tl.zeros((BD,), dtype=tl.float32)
        for p in range(start, end):
            i = tl.load(IDX + p).to(tl.int64)
            row = tl.load(TABLE + i * st_r + offs_d * st_d, mask=mask_d, other=0.0).to(acc.dtype)
            if HAS_W:
                acc += tl.load(WGT + p).to(acc.dtype) * row
            else:
                acc += row
        tl.store(OUT + bag.to(tl.int64) * so_r + offs_d * so_d,
                 acc.to(OUT.dtype.element_ty), mask=mask_d)

    @triton.jit
    def _pair_dot_kernel(
        A, RA, Bt, RB, OUT, P, D,
        sa_r, sa_d, sb_r, sb_d,
        BP: tl.constexpr, BD: tl.constexpr, ACC64: tl.constexpr,
    ):
        offs_p = tl.program_id(0) * BP + tl.arange(0, BP)
        mask_p = offs_p < P
        ra = tl.load(RA + offs_p, mask=mask_p, other=0).to(tl.int64)
        rb = tl.load(RB + offs_p, mask=mask_p, other=0).to(tl.int64)
        if ACC64:
            acc = tl.zeros((BP,), dtype=tl.float64)
        else:
            acc = tl.zeros((BP,), dtype=tl.float32)
        for d0 in range(0, D, BD):
            offs_d = d0 + tl.arange(0, BD)
            m = mask_p[:, None] & (offs_d < D)[None, :]
            a = tl.load(A + ra[:, None] * sa_r + offs_d[None, :] * sa_d, mask=m, other=0.0)
            b = tl.load(Bt + rb[:, None] * sb_r + offs_d[None, :] * sb_d, mask=m, other=0.0)
            acc += tl.sum(a.to(acc.dtype) * b.to(acc.dtype), axis=1)
        tl.store(OUT + offs_p, acc.to(OUT.dtype.element_ty), mask=mask_p)


# ------------------------------------------------------------------------------------------
# host wrappers
# ------------------------------------------------------------------------------------------

#: Compiler options of every launch: fused multiply-add on (Triton 3.9 warns that its default
#: turns off in 3.10; the accumulations here want one rounding per multiply-add).
_OPTIONS = dict(enable_fp_fusion=True)


def topk_supported(xc: Tensor, W: Tensor, k: int) -> bool:
    """Shapes / dtypes the fused top-k kernel covers (otherwise the torch fallback runs)."""
    from .dispatch import interpreter

    if triton is None or xc.dim() != 2 or W.dim() != 2 or xc.shape[1] != W.shape[1]:
        return False
    if interpreter():
        ok_dtypes = (torch.float32,)
    else:
        ok_dtypes = (torch.float16, torch.bfloat16, torch.float32)
    # k <= 256 keeps the register top-k small; atom indices must fit the 32-bit low word
    return (W.dtype in ok_dtypes and 1 <= k <= 256 and W.shape[0] < 2**31
            and xc.shape[1] >= 1 and xc.shape[0] >= 1)


def blocks_for(kp: int) -> tuple[int, int, int, int]:
    """Block sizes ``(BM, BN, BK, num_warps)`` of the fused encoders for a running top-``kp``,
    on the GPU Triton compiles for.

    Chosen on the compiled kernels' resources (``python -m sparsecode.core.kernels.aot``), not
    yet on timings (``bench_kernels.py --sweep`` measures them on a GPU): the running top-k
    lives in registers, so rows per program shrink as ``kp`` grows, down to where nothing
    spills. On Hopper (sm_90) ``BM = 64`` also keeps the encoder matmul on the warp-group
    tensor-core instruction (it needs 64 rows) up to ``kp = 128``; on older GPUs ``kp = 128``
    spills at 64 rows and takes 32.
    """
    from .dispatch import interpreter

    if interpreter():
        return 16, max(32, kp), 32, 4
    from triton.runtime import driver

    arch = driver.active.get_current_target().arch  # an int on NVIDIA (90: H100)
    hopper = isinstance(arch, int) and arch >= 90
    BM = 64 if kp <= (128 if hopper else 64) else (32 if kp <= 128 else 16)
    return BM, max(128, kp), 64, 8


def _splits(N: int, n_atoms: int, BM: int, BN: int, device: torch.device) -> int:
    """Slices of the atoms per row block: enough programs to fill the GPU twice over, each slice
    at least a few tiles long (one slice under the interpreter)."""
    from .dispatch import interpreter

    if interpreter():
        return 1
    n_sms = 132
    if device.type == "cuda":
        n_sms = torch.cuda.get_device_properties(device).multi_processor_count
    fill = triton.cdiv(2 * n_sms, triton.cdiv(N, BM))
    return max(1, min(triton.cdiv(n_atoms, BN) // 4 or 1, fill))


def topk_candidates(xc: Tensor, W: Tensor, b: Tensor, k: int, splits: int | None = None,
                    blocks: tuple[int, int, int, int] | None = None) -> Tensor:
    """Packed int64 keys of each token's top-``k`` atoms per slice, ``(N, S * KP)``.

    ``blocks`` overrides :func:`blocks_for` (``BN`` must be at least ``KP``): for timing sweeps.
    """
    N, D = xc.shape
    NA = W.shape[0]
    kp = _next_pow2(k)
    BM, BN, BK, warps = blocks or blocks_for(kp)
    if BN < kp:
        raise ValueError(f"block of {BN} atoms cannot hold a top-{kp}")
    S = max(1, int(splits)) if splits is not None else _splits(N, NA, BM, BN, xc.device)
    span = triton.cdiv(triton.cdiv(NA, S), BN) * BN
    S = triton.cdiv(NA, span)
    out = torch.empty((N, S, kp), dtype=torch.int64, device=xc.device)
    b = b.to(torch.float32).contiguous()
    grid = (triton.cdiv(N, BM), S)
    _topk_candidates_kernel[grid](
        xc, W, b, out, N, D, NA, span,
        xc.stride(0), xc.stride(1), W.stride(0), W.stride(1), out.stride(0), out.stride(1),
        KP=kp, BM=BM, BN=BN, BK=BK, IEEE=W.dtype == torch.float32, num_warps=warps, **_OPTIONS,
    )
    return out.reshape(N, S * kp)


def threshold_select(xc: Tensor, W: Tensor, b: Tensor, thr: Tensor
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """Pairs with ``xc @ W^T + b > thr`` (per atom), sorted by row then atom, float32 values:
    a counting pass, then a pass that recomputes the tiles and writes each row's pairs at its
    offset (two encoder matmuls, no ``(N, n_atoms)`` matrix, no atomics)."""
    N, D = xc.shape
    NA = W.shape[0]
    BM, BN, BK, warps = blocks_for(1)
    dev = xc.device
    b = b.to(torch.float32).contiguous()
    thr = thr.to(torch.float32).contiguous()
    counts = torch.empty(N, dtype=torch.int64, device=dev)
    grid = (triton.cdiv(N, BM),)
    args = (N, D, NA, xc.stride(0), xc.stride(1), W.stride(0), W.stride(1))
    meta = dict(BM=BM, BN=BN, BK=BK, IEEE=W.dtype == torch.float32, num_warps=warps, **_OPTIONS)
    _threshold_kernel[grid](xc, W, b, thr, counts, counts, counts, counts, *args,
                            WRITE=False, **meta)
    offs = torch.cumsum(counts, 0) - counts
    nnz = int(counts.sum())
    rows = torch.repeat_interleave(torch.arange(N, device=dev), counts, output_size=nnz)
    cols = torch.empty(nnz, dtype=torch.int64, device=dev)
    vals = torch.empty(nnz, dtype=torch.float32, device=dev)
    if nnz:
        _threshold_kernel[grid](xc, W, b, thr, counts, offs, cols, vals, *args,
                                WRITE=True, **meta)
    return rows, cols, vals


def decode_keys(keys: Tensor) -> tuple[Tensor, Tensor]:
    """(float32 values, int64 atom indices) of packed keys."""
    idx = _LOW32 - (keys & _LOW32)
    bits = (keys >> 32).to(torch.int32)
    bits = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return bits.view(torch.float32), idx


def topk_select(xc: Tensor, W: Tensor, b: Tensor, k: int, splits: int | None = None
                ) -> tuple[Tensor, Tensor]:
    """Top-``k`` of ``xc @ W^T + b`` per row, sorted (value descending, then atom ascending)."""
    keys = topk_candidates(xc, W, b, k, splits)
    top = keys.topk(k, dim=1, sorted=True).values
    return decode_keys(top)


def bag_sum(idx: Tensor, table: Tensor, offsets: Tensor, weights: Tensor | None) -> Tensor:
    """``out[b] = sum_{p in [offsets[b], offsets[b+1])} weights[p] * table[idx[p]]``."""
    n_bags = offsets.numel() - 1
    D = table.shape[1]
    out = torch.empty((n_bags, D), dtype=table.dtype, device=table.device)
    if n_bags == 0 or D == 0:
        return out.zero_()
    BD = min(1024, triton.next_power_of_2(D))
    acc64 = table.dtype == torch.float64
    w = weights.contiguous() if weights is not None else idx
    grid = (n_bags, triton.cdiv(D, BD))
    _bag_sum_kernel[grid](
        idx.contiguous(), w, offsets.contiguous(), table, out, D,
        table.stride(0), table.stride(1), out.stride(0), out.stride(1),
        HAS_W=weights is not None, BD=BD, ACC64=acc64, num_warps=4, **_OPTIONS,
    )
    return out


def pair_dot(A: Tensor, ra: Tensor, B: Tensor, rb: Tensor, out_dtype: torch.dtype) -> Tensor:
    """``out[p] = <A[ra[p]], B[rb[p]]>``."""
    P = ra.numel()
    out = torch.empty(P, dtype=out_dtype, device=A.device)
    if P == 0:
        return out
    D = A.shape[1]
    BP, BD = 16, min(128, triton.next_power_of_2(max(D, 1)))
    acc64 = A.dtype == torch.float64 or B.dtype == torch.float64
    _pair_dot_kernel[(triton.cdiv(P, BP),)](
        A, ra.contiguous(), B, rb.contiguous(), out, P, D,
        A.stride(0), A.stride(1), B.stride(0), B.stride(1),
        BP=BP, BD=BD, ACC64=acc64, num_warps=4, **_OPTIONS,
    )
    return out
