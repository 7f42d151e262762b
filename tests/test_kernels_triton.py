"""Triton kernels on CPU under Triton's interpreter, against the torch paths.

These tests only run in a process started with ``TRITON_INTERPRET=1`` and
``SPARSECODE_FORCE_TRITON=1`` (``tests/test_kernels.py::test_triton_kernels_under_interpreter``
starts one); in a normal test run they are skipped, so the interpreter never leaks into other
modules. Shapes are tiny and float32 / float64 only (the interpreter is slow and wrong in bf16).
Shapes are ragged on purpose: N, d and n_atoms are not multiples of the interpreter blocks
(BM=16, BK=32, BN=32), k is not a power of two, and slices of atoms end in masked tails.
"""

import os

import pytest

if os.environ.get("TRITON_INTERPRET") != "1" or os.environ.get("SPARSECODE_FORCE_TRITON") != "1":
    pytest.skip("run by test_kernels.py in a subprocess with TRITON_INTERPRET=1",
                allow_module_level=True)

import torch  # noqa: E402

from sparsecode.core import operators as ops  # noqa: E402
from sparsecode.core.kernels import (  # noqa: E402
    bag_sum,
    batch_topk_encode,
    dispatch,
    gather_preact,
    sparse_decode,
    threshold_encode,
    topk_encode,
    topk_rows,
    triton_ops,
)
from sparsecode.core.kernels.torch_ops import row_offsets  # noqa: E402


def _problem(N, d, n, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, d, generator=g, dtype=dtype)
    W = torch.randn(n, d, generator=g, dtype=dtype)
    b = torch.randn(n, generator=g, dtype=dtype) * 0.1
    bd = torch.randn(d, generator=g, dtype=dtype) * 0.1
    return x, W, b, bd


def _torch_path(monkeypatch, fn, *a, **kw):
    monkeypatch.setenv(dispatch.DISABLE_ENV, "1")
    try:
        return fn(*a, **kw)
    finally:
        monkeypatch.delenv(dispatch.DISABLE_ENV)


def test_dispatch_picks_triton_for_cpu_tensors_under_interpreter():
    t = torch.zeros(2)
    assert dispatch.interpreter() and dispatch.use_triton(t)
    assert triton_ops.topk_supported(t.reshape(1, 2), torch.zeros(3, 2), 2)
    # bf16 is wrong in the interpreter: the fused encode must fall back to torch
    W16 = torch.zeros(3, 2, dtype=torch.bfloat16)
    assert not triton_ops.topk_supported(t.reshape(1, 2), W16, 2)


@pytest.mark.parametrize("N,d,n,k,splits", [(19, 40, 150, 5, 1), (19, 40, 150, 5, 3),
                                            (3, 5, 7, 7, None), (17, 33, 20, 1, None),
                                            (5, 8, 70, 12, 2), (4, 6, 90, 40, 1),
                                            # many merges into a full running top-k
                                            (7, 12, 700, 16, 1), (6, 10, 600, 100, 1)])
def test_fused_topk_matches_torch(N, d, n, k, splits):
    x, W, b, _ = _problem(N, d, n)
    vals, idx = triton_ops.topk_select(x, W, b, k, splits=splits)
    ref = (x.double() @ W.double().T + b.double()).topk(k, dim=1)
    assert torch.equal(idx, ref.indices)
    torch.testing.assert_close(vals, ref.values.float(), rtol=1e-5, atol=1e-5)


def test_fused_topk_ties_lowest_index_wins():
    # small integers: every pre-activation is exact in float32, and duplicated atoms tie exactly
    g = torch.Generator().manual_seed(2)
    x = torch.randint(-2, 3, (11, 6), generator=g).float()
    base = torch.randint(-2, 3, (9, 6), generator=g).float()
    W = torch.cat([base, base, base[:4], torch.zeros(3, 6)])  # n = 25, many exact ties
    b = torch.zeros(25)
    pre = x @ W.T
    for k, splits in ((3, 1), (6, 2), (10, 3)):
        vals, idx = triton_ops.topk_select(x, W, b, k, splits=splits)
        rv, ri = topk_rows(pre, k)
        assert torch.equal(idx, ri) and torch.equal(vals, rv)


def test_topk_encode_triton_values_and_grads_match_torch(monkeypatch):
    x, W, b, bd = _problem(13, 20, 45, seed=1)
    leaves = [t.clone().requires_grad_() for t in (x, W, b, bd)]
    vals, idx = topk_encode(*leaves, 6)
    w = torch.linspace(-1, 1, vals.numel()).reshape(vals.shape)
    (vals * w).sum().backward()  # Triton bag_sum in the sparse encoder backward
    ref_leaves = [t.clone().requires_grad_() for t in (x, W, b, bd)]
    rv, ri = _torch_path(monkeypatch, topk_encode, *ref_leaves, 6)
    (rv * w).sum().backward()
    assert torch.equal(idx, ri)
    torch.testing.assert_close(vals, rv, rtol=1e-5, atol=1e-5)
    for a, r in zip(leaves, ref_leaves, strict=True):
        torch.testing.assert_close(a.grad, r.grad, rtol=1e-5, atol=1e-5)


def test_batch_topk_encode_triton_matches_support():
    x, W, b, bd = _problem(9, 10, 40, seed=3)
    x[2] *= 20  # one row wins far more than k: saturates row_cap, forces the second pass
    pre = (x - bd).double() @ W.double().T + b.double()
    rows, cols, vals = batch_topk_encode(x, W, b, bd, 3, row_cap=2)
    rr, cc = ops.BatchTopK(3, positive=True).support(pre)
    assert torch.equal(rows, rr) and torch.equal(cols, cc)
    torch.testing.assert_close(vals, pre[rr, cc].float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("N,d,n", [(19, 40, 70), (3, 5, 33)])
def test_threshold_encode_triton_matches_dense(monkeypatch, N, d, n):
    x, W, b, bd = _problem(N, d, n, seed=8)
    x[1] = -1e3 * W[:, :].sum(0) / n  # a row with (almost) nothing above threshold
    thr = torch.rand(n, generator=torch.Generator().manual_seed(9)) * 2
    pre = ((x - bd).double() @ W.double().T + b.double()).float()
    for t in (thr, 0.0, 1e30):
        rows, cols, vals = threshold_encode(x, W, b, bd, t)
        rr, cc = (pre > torch.as_tensor(t)).nonzero(as_tuple=True)
        assert torch.equal(rows, rr) and torch.equal(cols, cc)
        torch.testing.assert_close(vals, pre[rr, cc], rtol=1e-5, atol=1e-5)
    leaves = [u.clone().requires_grad_() for u in (x, W, b, bd)]
    threshold_encode(*leaves, thr)[2].sum().backward()
    ref = [u.clone().requires_grad_() for u in (x, W, b, bd)]
    _torch_path(monkeypatch, threshold_encode, *ref, thr)[2].sum().backward()
    for a, r in zip(leaves, ref, strict=True):
        torch.testing.assert_close(a.grad, r.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bag_sum_matches_embedding_bag(dtype):
    g = torch.Generator().manual_seed(4)
    table = torch.randn(9, 37, generator=g, dtype=dtype)  # 37 columns: a masked column tail
    rows = torch.tensor([0, 0, 0, 2, 2, 5, 5, 5, 5])  # bags 1, 3, 4 empty
    idx = torch.tensor([8, 0, 8, 3, 4, 1, 1, 2, 7])
    w = torch.randn(9, generator=g, dtype=dtype)
    starts = row_offsets(rows, 6)
    out = bag_sum(idx, table, starts, w)
    ref = torch.nn.functional.embedding_bag(idx, table, starts, per_sample_weights=w, mode="sum")
    torch.testing.assert_close(out, ref)
    assert torch.equal(out[1], torch.zeros(37, dtype=dtype))


def test_sparse_decode_triton_gradcheck_and_groups():
    g = torch.Generator().manual_seed(5)
    W = torch.randn(6, 3, dtype=torch.float64, generator=g, requires_grad=True)
    rows, cols = torch.tensor([0, 0, 0, 2, 3, 3]), torch.tensor([5, 0, 3, 1, 4, 5])
    vals = torch.randn(6, dtype=torch.float64, generator=g, requires_grad=True)
    dense = torch.zeros(4, 6, dtype=torch.float64).index_put((rows, cols), vals)
    torch.testing.assert_close(sparse_decode(vals, rows, cols, W, 4), dense @ W)
    assert torch.autograd.gradcheck(lambda v, w: sparse_decode(v, rows, cols, w, 4), [vals, W])
    groups = torch.tensor([0, 0, 1, 1, 1, 2])
    out = sparse_decode(vals, rows, cols, W, 4, groups=groups)
    ref = torch.stack([dense[:, groups == j] @ W[groups == j] for j in range(3)], dim=1)
    torch.testing.assert_close(out, ref)
    assert torch.autograd.gradcheck(
        lambda v, w: sparse_decode(v, rows, cols, w, 4, groups=groups).sum(1), [vals, W])


def test_gather_preact_triton_backward_gradcheck():
    x, W, b, bd = _problem(5, 3, 7, seed=6, dtype=torch.float64)
    rows, cols = torch.tensor([0, 0, 2, 4, 4]), torch.tensor([1, 6, 0, 6, 2])
    assert torch.autograd.gradcheck(lambda *a: gather_preact(*a, rows, cols),
                                    [t.clone().requires_grad_() for t in (x, W, b, bd)])


def test_sparse_decode_float32_matches_torch(monkeypatch):
    g = torch.Generator().manual_seed(7)
    W = torch.randn(30, 37, generator=g, requires_grad=True)
    N, k = 11, 3
    rows = torch.arange(N).repeat_interleave(k)
    cols = torch.randint(0, 30, (N * k,), generator=g)
    vals = torch.randn(N * k, generator=g, requires_grad=True)
    gout = torch.randn(N, 37, generator=g)
    out = sparse_decode(vals, rows, cols, W, N)
    gv, gW = torch.autograd.grad(out, [vals, W], gout)
    ref = _torch_path(monkeypatch, sparse_decode, vals, rows, cols, W, N)
    rv, rW = torch.autograd.grad(ref, [vals, W], gout)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(gv, rv)
    torch.testing.assert_close(gW, rW)


@pytest.mark.parametrize("arch,dead", [("topk", slice(None, None, 4)), ("topk", slice(0, 30)),
                                       ("batchtopk", slice(None, None, 4)),
                                       ("feature_choice", slice(None, None, 4)),
                                       ("jumprelu", slice(None, None, 4))])
def test_sae_training_step_on_kernels_matches_torch_path(monkeypatch, arch, dead):
    """A whole SAE step (fused encode -> Triton sparse decode -> sparse backward; AuxK over few
    dead latents' rows, or over all rows with a -inf bias on the live ones when most are dead;
    the JumpReLU pairs path with its straight-through threshold gradient) gives the loss and
    gradients of the same step on the torch fallbacks."""
    from sae.models import SAE, SAEConfig

    def step():
        sae = SAE(SAEConfig(d_in=10, d_sae=40, architecture=arch, k=3, aux_k=4,
                            dead_tokens=5, bandwidth=0.5),
                  generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            sae.b_enc.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
            sae.tokens_since_fired[dead] = 100  # 10 or 30 dead latents: AuxK on
            if arch == "jumprelu":
                sae.threshold.copy_(torch.linspace(0.0, 1.0, 40))
        sae._last_density = 0.0  # JumpReLU: the pairs path
        x = torch.randn(17, 10, generator=torch.Generator().manual_seed(2))
        out = sae.training_forward(x)
        out.loss.backward()
        return out, {n: p.grad for n, p in sae.named_parameters()}

    out, grads = step()
    ref, ref_grads = _torch_path(monkeypatch, step)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-5)
    assert out.terms.keys() == ref.terms.keys() and out.l0 == ref.l0
    assert arch == "jumprelu" or {"auxk", "aux_zipf"} & out.terms.keys()
    for n, g in grads.items():
        torch.testing.assert_close(g, ref_grads[n], rtol=1e-4, atol=1e-4, msg=n)
