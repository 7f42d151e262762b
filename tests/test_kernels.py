"""Sparse encode / decode kernels: torch paths against plain dense references (float64, gradcheck),
the dispatch rules, and (in a subprocess under ``TRITON_INTERPRET=1``) the Triton kernels."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparsecode.core import operators as ops
from sparsecode.core.kernels import (
    batch_topk_encode,
    dispatch,
    encode,
    feature_choice_encode,
    gather_preact,
    pair_dot,
    preact,
    sparse_decode,
    sparse_preact,
    threshold_encode,
    topk_encode,
    topk_rows,
    use_triton,
)

TESTS = Path(__file__).resolve().parent


def _problem(N=13, d=7, n=29, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, d, generator=g, dtype=dtype)
    W = torch.randn(n, d, generator=g, dtype=dtype)
    b = torch.randn(n, generator=g, dtype=dtype) * 0.1
    bd = torch.randn(d, generator=g, dtype=dtype) * 0.1
    return x, W, b, bd


def _dense(x, W, b, bd):
    return (x - bd) @ W.T + b


# ------------------------------------------------------------------ tie rule
def test_topk_rows_lowest_index_wins_and_canonical_order():
    pre = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 0.0],
                        [5.0, 5.0, 5.0, 5.0, 5.0, 5.0],
                        [0.0, 1.0, 2.0, 2.0, 4.0, 2.0]])
    vals, idx = topk_rows(pre, 2)
    assert idx.tolist() == [[1, 2], [0, 1], [4, 2]]
    assert vals.tolist() == [[3.0, 3.0], [5.0, 5.0], [4.0, 2.0]]
    vals, idx = topk_rows(pre, 4)
    assert idx.tolist() == [[1, 2, 4, 3], [0, 1, 2, 3], [4, 2, 3, 5]]


def test_topk_rows_matches_reference_on_random_ties():
    g = torch.Generator().manual_seed(1)
    pre = torch.randint(0, 4, (40, 23), generator=g).double()
    for k in (1, 3, 5, 23):
        vals, idx = topk_rows(pre, k)
        # reference: sort by (-value, index)
        key = -pre * 1000 + torch.arange(23).double()
        ref = key.argsort(dim=1)[:, :k]
        assert torch.equal(idx, ref)
        assert torch.equal(vals, pre.gather(1, ref))


@pytest.mark.parametrize("shape", [(40, 256), (7, 300), (5, 64), (0, 512), (3, 1000)])
def test_row_max_is_torch_max_with_the_lowest_index_on_ties(shape):
    from sparsecode.core.select import row_max

    g = torch.Generator().manual_seed(2)
    for x in (torch.randint(0, 3, shape, generator=g).float(), torch.randn(shape, generator=g)):
        if shape[0]:
            x[0, -1] = 9.0  # the maximum in the tail past the last whole block
        v, j = row_max(x)
        assert torch.equal(v, x.amax(dim=1)) and torch.equal(j, x.argmax(dim=1))


# ------------------------------------------------------------------ topk_encode (torch path)
@pytest.mark.parametrize("N,d,n,k", [(13, 7, 29, 5), (1, 3, 4, 4), (9, 5, 6, 10), (17, 11, 40, 1)])
def test_topk_encode_matches_dense(N, d, n, k):
    x, W, b, bd = _problem(N, d, n)
    pre = _dense(x, W, b, bd)
    kk = min(k, n)
    vals, idx = topk_encode(x, W, b, bd, k, relu=False)
    ref = pre.topk(kk, dim=1)
    assert vals.shape == idx.shape == (N, kk)
    assert torch.equal(idx, ref.indices)
    torch.testing.assert_close(vals, ref.values)
    v_relu, idx2 = topk_encode(x, W, b, bd, k)
    assert torch.equal(idx2, idx)
    torch.testing.assert_close(v_relu, ref.values.clamp_min(0))


def test_topk_encode_without_b_dec_and_matmul_dtype():
    x, W, b, _ = _problem(dtype=torch.float32)
    vals, idx = topk_encode(x, W, b, None, 4, relu=False, matmul_dtype=torch.float64)
    ref = (x.double() @ W.double().T + b.double()).topk(4, dim=1)
    assert torch.equal(idx, ref.indices)
    assert vals.dtype == torch.float32
    torch.testing.assert_close(vals, ref.values.float())


def test_topk_encode_chunks_rows_within_budget(monkeypatch):
    x, W, b, bd = _problem(N=50, n=31)
    seen = []
    real = encode.preact

    def spy(xc, W_, b_, *a):
        seen.append(xc.shape[0])
        return real(xc, W_, b_, *a)

    monkeypatch.setattr(encode, "preact", spy)
    budget = 8 * 31 * 14  # about 8 rows of float64 pre-activations plus temporaries
    vals, idx = topk_encode(x, W, b, bd, 3, relu=False, max_bytes=budget)
    assert max(seen) <= 8 and sum(seen) == 50 and len(seen) > 1
    ref = _dense(x, W, b, bd).topk(3, dim=1)
    assert torch.equal(idx, ref.indices)
    torch.testing.assert_close(vals, ref.values)


def test_topk_encode_gradients_match_dense_and_gradcheck():
    x, W, b, bd = _problem(N=6, d=4, n=9)
    leaves = [t.clone().requires_grad_() for t in (x, W, b, bd)]
    vals, idx = topk_encode(*leaves, 3)
    w = torch.linspace(-1, 2, vals.numel(), dtype=vals.dtype).reshape(vals.shape)
    (vals * w).sum().backward()
    ref_leaves = [t.clone().requires_grad_() for t in (x, W, b, bd)]
    ref = _dense(*ref_leaves).gather(1, idx).clamp_min(0)
    (ref * w).sum().backward()
    for a, r in zip(leaves, ref_leaves, strict=True):
        torch.testing.assert_close(a.grad, r.grad)

    def f(x_, W_, b_, bd_):
        return topk_encode(x_, W_, b_, bd_, 3, relu=False)[0]

    assert torch.autograd.gradcheck(f, [t.clone().requires_grad_() for t in (x, W, b, bd)])


@pytest.mark.parametrize("encoder", [topk_encode, batch_topk_encode, feature_choice_encode])
def test_encoders_reject_bad_input(encoder):
    x, W, b, bd = _problem()
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        encoder(x, W, b, bd, 0)
    with pytest.raises(ValueError, match=r"expected x \(N, d\) and W_enc \(n_atoms, d\)"):
        encoder(x[:, :3], W, b, bd, 2)


# ------------------------------------------------------------------ feature choice (torch path)
@pytest.mark.parametrize("m,max_bytes", [(1, None), (4, None), (4, 64), (50, None)])
def test_feature_choice_encode_matches_featurechoice_support(m, max_bytes):
    x, W, b, bd = _problem(N=12, d=5, n=17, seed=4)
    pre = _dense(x, W, b, bd)
    rows, cols, vals = feature_choice_encode(x, W, b, bd, m, max_bytes=max_bytes)
    rr, cc = ops.FeatureChoice(m, positive=True).support(pre)
    assert torch.equal(rows, rr) and torch.equal(cols, cc)
    torch.testing.assert_close(vals, pre[rr, cc])
    r2, c2, v2 = feature_choice_encode(x, W, b, bd, m, relu=False, max_bytes=max_bytes)
    r3, c3 = ops.FeatureChoice(m, positive=True).support(pre + 100)  # the m largest per column
    assert torch.equal(r2, r3) and torch.equal(c2, c3)
    assert torch.equal(torch.bincount(c2, minlength=17), torch.full((17,), min(m, 12)))


def test_feature_choice_encode_ties_and_gradcheck():
    g = torch.Generator().manual_seed(5)
    x = torch.randint(-2, 3, (10, 4), generator=g).double()
    W = torch.randint(-2, 3, (7, 4), generator=g).double()
    rows, cols, _ = feature_choice_encode(x, W, torch.zeros(7, dtype=torch.float64), None, 3,
                                          relu=False)
    _, ref_rows = topk_rows((x @ W.T).T, 3)  # per atom: lowest row index first among ties
    assert torch.equal(rows[cols.argsort(stable=True)].reshape(7, 3).sort(1).values,
                       ref_rows.sort(1).values)
    x, W, b, bd = _problem(N=6, d=3, n=5, seed=6)
    leaves = [t.clone().requires_grad_() for t in (x, W, b, bd)]
    assert torch.autograd.gradcheck(
        lambda *a: feature_choice_encode(*a, 2, relu=False)[2], leaves)


# ------------------------------------------------------------------ batch top-k (torch path)
@pytest.mark.parametrize("row_cap", [None, 1, 2, 100])
def test_batch_topk_encode_matches_batchtopk_support(row_cap):
    x, W, b, bd = _problem(N=12, d=5, n=17, seed=3)
    x[4] *= 20  # a massive row that wins far more than k entries: forces the second pass
    pre = _dense(x, W, b, bd)
    rows, cols, vals = batch_topk_encode(x, W, b, bd, 3, row_cap=row_cap)
    rr, cc = ops.BatchTopK(3, positive=True).support(pre)
    assert torch.equal(rows, rr) and torch.equal(cols, cc)
    torch.testing.assert_close(vals, pre[rr, cc])
    r2, c2, v2 = batch_topk_encode(x, W, b, bd, 3, row_cap=row_cap, relu=False)
    r3, c3 = ops.BatchTopK(3, positive=False).support(pre.clamp_min(-1e9) + 100)  # k*N largest
    assert torch.equal(r2, r3) and torch.equal(c2, c3)


def test_batch_topk_encode_gradcheck():
    x, W, b, bd = _problem(N=5, d=3, n=7, seed=4)

    def f(x_, W_, b_, bd_):
        return batch_topk_encode(x_, W_, b_, bd_, 2, row_cap=1)[2]

    assert torch.autograd.gradcheck(f, [t.clone().requires_grad_() for t in (x, W, b, bd)])


# ------------------------------------------------------------------ threshold encode (torch path)
@pytest.mark.parametrize("max_bytes", [None, 200])
def test_threshold_encode_matches_dense_and_gradcheck(max_bytes):
    x, W, b, bd = _problem(N=9, d=4, n=11, seed=8)
    thr = torch.linspace(-0.5, 1.0, 11, dtype=torch.float64)
    pre = _dense(x, W, b, bd)
    for t in (thr, 0.0, 1e9):
        rows, cols, vals = threshold_encode(x, W, b, bd, t, max_bytes=max_bytes)
        rr, cc = (pre > torch.as_tensor(t, dtype=pre.dtype)).nonzero(as_tuple=True)
        assert torch.equal(rows, rr) and torch.equal(cols, cc)
        torch.testing.assert_close(vals, pre[rr, cc])

    def f(x_, W_, b_, bd_):
        return threshold_encode(x_, W_, b_, bd_, thr, max_bytes=max_bytes)[2]

    assert torch.autograd.gradcheck(f, [t.clone().requires_grad_() for t in (x, W, b, bd)])


# ------------------------------------------------------------------ decode / gather (torch path)
def test_sparse_preact_is_gather_preact():
    x, W, b, bd = _problem(N=5, d=3, n=7)
    rows, cols = torch.tensor([0, 0, 2, 4]), torch.tensor([1, 6, 0, 6])
    pre = _dense(x, W, b, bd)

    def f(x_, W_, b_, bd_):
        return sparse_preact(x_, W_, b_, bd_, rows, cols, _dense(x_, W_, b_, bd_)[rows, cols])

    leaves = [t.clone().requires_grad_() for t in (x, W, b, bd)]
    torch.testing.assert_close(f(*leaves), gather_preact(x, W, b, bd, rows, cols))
    torch.testing.assert_close(f(*leaves), pre[rows, cols])
    assert torch.autograd.gradcheck(lambda *a: gather_preact(*a, rows, cols),
                                    [t.clone().requires_grad_() for t in (x, W, b, bd)])


def test_sparse_decode_gradcheck_with_and_without_groups():
    g = torch.Generator().manual_seed(5)
    W = torch.randn(6, 3, dtype=torch.float64, generator=g, requires_grad=True)
    rows, cols = torch.tensor([0, 0, 0, 2, 3, 3]), torch.tensor([5, 0, 3, 1, 4, 2])
    vals = torch.randn(6, dtype=torch.float64, generator=g, requires_grad=True)
    groups = torch.tensor([0, 0, 1, 1, 1, 2])
    out = sparse_decode(vals, rows, cols, W, 4, groups=groups)
    dense = torch.zeros(4, 6, dtype=torch.float64).index_put((rows, cols), vals)
    torch.testing.assert_close(sparse_decode(vals, rows, cols, W, 4), dense @ W)
    assert torch.autograd.gradcheck(lambda v, w: sparse_decode(v, rows, cols, w, 4), [vals, W])
    ref = torch.stack([dense[:, groups == j] @ W[groups == j] for j in range(3)], dim=1)
    torch.testing.assert_close(out, ref)
    assert torch.autograd.gradcheck(
        lambda v, w: sparse_decode(v, rows, cols, w, 4, groups=groups), [vals, W])


def test_pair_dot_is_one_dot_product_per_pair():
    g = torch.Generator().manual_seed(6)
    A, B = (torch.randn(n, 5, dtype=torch.float64, generator=g) for n in (4, 7))
    rows, cols = torch.tensor([0, 0, 1, 3, 3, 3]), torch.tensor([6, 2, 2, 0, 2, 5])
    ref = torch.stack([A[r] @ B[c] for r, c in zip(rows, cols, strict=True)])
    torch.testing.assert_close(pair_dot(A, rows, B, cols, torch.float64), ref)
    assert pair_dot(A, rows[:0], B, cols[:0], torch.float32).shape == (0,)


# ------------------------------------------------------------------ bf16 / fp16 inputs
LOW = pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])


def _low_and_ref(dtype, *ts):
    """Leaves in ``dtype`` and float64 leaves holding exactly the same (rounded) values."""
    low = [t.to(dtype).requires_grad_() for t in ts]
    return low, [t.detach().double().requires_grad_() for t in low]


def _assert_fp32_accurate(got, ref, dtype, what):
    """Within a few roundings to ``dtype`` of the float64 result: what fp32 accumulation gives
    (sums accumulated in ``dtype`` itself are off by far more on these long sums)."""
    assert got.dtype == dtype, what
    err = float((got.detach().double() - ref.detach()).abs().max())
    tol = 2 * torch.finfo(dtype).eps * float(ref.detach().abs().max())
    assert err <= tol, f"{what}: max error {err:.4g} > {tol:.4g}"


def _atom_zero_everywhere(N: int, n: int, seed: int):
    """Two pairs per row, sorted by row: atom 0 and a random other atom (a long sum for atom 0)."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.arange(N).repeat_interleave(2)
    cols = torch.stack([torch.zeros(N, dtype=torch.long),
                        torch.randint(1, n, (N,), generator=g)], 1).reshape(-1)
    return g, rows, cols


@LOW
def test_low_precision_sparse_decode_accumulates_in_fp32(dtype):
    # 4096 tokens all use atom 0: its gradient row sums 4096 terms (a bf16 sum of 4096 ones
    # stalls at 256, an fp16 one at 2048)
    N, d, n = 4096, 16, 9
    g, rows, cols = _atom_zero_everywhere(N, n, seed=0)
    (vals, W), (vals64, W64) = _low_and_ref(
        dtype, torch.rand(2 * N, generator=g) + 0.5, torch.randn(n, d, generator=g))
    G = torch.randn(N, d, generator=g).to(dtype)
    out = sparse_decode(vals, rows, cols, W, N)
    ref = sparse_decode(vals64, rows, cols, W64, N)
    _assert_fp32_accurate(out, ref, dtype, "forward")
    (out * G).sum().backward()
    (ref * G.double()).sum().backward()
    _assert_fp32_accurate(vals.grad, vals64.grad, dtype, "grad values")
    _assert_fp32_accurate(W.grad, W64.grad, dtype, "grad W_dec")
    W.grad = None
    sparse_decode(torch.ones(2 * N, dtype=dtype), rows, cols, W, N).sum().backward()
    assert W.grad[0].tolist() == [float(N)] * d


@LOW
def test_low_precision_encoder_backward_accumulates_in_fp32(dtype):
    N, d, n = 4096, 16, 9
    g, rows, cols = _atom_zero_everywhere(N, n, seed=1)
    leaves, refs = _low_and_ref(dtype, torch.randn(N, d, generator=g),
                                torch.randn(n, d, generator=g), torch.randn(n, generator=g),
                                0.1 * torch.randn(d, generator=g))
    gv = torch.randn(2 * N, generator=g).to(dtype)
    v = gather_preact(*leaves, rows, cols)
    (v * gv).sum().backward()
    x64, W64, b64, bd64 = refs
    ((_dense(x64, W64, b64, bd64)[rows, cols]) * gv.double()).sum().backward()
    # x - b_dec is formed in dtype (as a bf16 forward would): one more rounding, so compare
    # W_enc's gradient against the float64 sum over the same rounded differences
    xc = (leaves[0] - leaves[3]).detach().double()
    grad_W_ref = torch.zeros_like(W64).index_add_(0, cols, gv.double()[:, None] * xc[rows])
    _assert_fp32_accurate(leaves[1].grad, grad_W_ref, dtype, "grad W_enc")
    for name, leaf, ref in zip(["x", "W_enc", "b_enc", "b_dec"], leaves, refs, strict=True):
        if name != "W_enc":
            _assert_fp32_accurate(leaf.grad, ref.grad, dtype, f"grad {name}")
    b = leaves[2].detach().requires_grad_()
    gather_preact(leaves[0].detach(), leaves[1].detach(), b, None, rows, cols).sum().backward()
    assert b.grad[0].item() == N


@LOW
@pytest.mark.parametrize("encoder", ["topk", "batch_topk", "feature_choice", "threshold"])
def test_low_precision_encoders_select_on_their_own_matmul(dtype, encoder):
    # bf16 / fp16 weights: each encoder selects on the pre-activations computed in that dtype,
    # ties (frequent with 8 significant bits) broken by the shared rule: the same pairs and
    # values as the dense operator on those pre-activations
    x, W, b, bd = (t.to(dtype) for t in _problem(N=40, d=12, n=50, seed=3))
    pre = preact(x, W, b, bd)  # the encoders' matmul (bias fused), in dtype
    if encoder == "topk":
        v, i = topk_encode(x, W, b, bd, 5, relu=False)
        rv, ri = topk_rows(pre, 5)
        assert torch.equal(i, ri) and torch.equal(v, rv) and v.dtype == dtype
        return
    if encoder == "batch_topk":
        if dtype == torch.bfloat16:  # a tie at the cut: the rule decides
            assert (pre == pre.flatten().topk(160).values[-1]).sum() > 1
        rows, cols, v = batch_topk_encode(x, W, b, bd, 4)
        ref = ops.BatchTopK(4, positive=True).support(pre)
    elif encoder == "feature_choice":
        # selects on W @ (x - b_dec)^T (b_enc is constant per atom and added afterwards)
        s = torch.nn.functional.linear(W, x - bd).T
        rows, cols, v = feature_choice_encode(x, W, b, bd, 3)
        ref = ops.FeatureChoice(3, positive=True).support(s + b)
        pre = s + b
    else:
        rows, cols, v = threshold_encode(x, W, b, bd, 0.25)
        ref = (pre > 0.25).nonzero(as_tuple=True)
    assert torch.equal(rows, ref[0]) and torch.equal(cols, ref[1])
    assert v.dtype == dtype and torch.equal(v, pre[rows, cols])


# ------------------------------------------------------------------ dispatch rules
def test_dispatch_rules(monkeypatch):
    t = torch.zeros(2)
    monkeypatch.delenv(dispatch.FORCE_ENV, raising=False)
    assert not use_triton(t)  # CPU tensors never pick Triton by themselves
    monkeypatch.setenv(dispatch.FORCE_ENV, "1")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not use_triton(t)  # forcing needs the interpreter
    monkeypatch.setenv(dispatch.DISABLE_ENV, "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not dispatch.triton_available() and not use_triton(t)


@pytest.mark.parametrize("version,ok", [("3.2.0", False), ("3.3.1", False), ("3.4.0", True),
                                        ("3.9.0+git1a2b", True), ("4.0", True)])
def test_triton_older_than_the_kernels_need_falls_back(monkeypatch, version, ok):
    """Triton < 3.4 has no ``tl.topk``: the kernels would fail to compile on the GPU, so the
    dispatch treats such a Triton as absent and the torch fallback runs."""
    triton = pytest.importorskip("triton")
    monkeypatch.delenv(dispatch.DISABLE_ENV, raising=False)
    monkeypatch.setattr(triton, "__version__", version)
    dispatch._triton_imports.cache_clear()
    try:
        assert dispatch.triton_available() is ok
    finally:
        monkeypatch.undo()
        dispatch._triton_imports.cache_clear()


# ------------------------------------------------------------------ Triton kernels (interpreter)
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_triton_kernels_under_interpreter():
    """Runs tests/test_kernels_triton.py in a fresh interpreter with ``TRITON_INTERPRET=1`` (it
    must be set before triton is imported, and must not leak into the other test modules)."""
    env = dict(os.environ, TRITON_INTERPRET="1", SPARSECODE_FORCE_TRITON="1",
               OMP_NUM_THREADS="1")
    env.pop(dispatch.DISABLE_ENV, None)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
         str(TESTS / "test_kernels_triton.py")],
        cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1]


# ------------------------------------------------------------------ the SAE's fused TopK path
@pytest.mark.parametrize("aux_path", ["dense", "pairs"])
@pytest.mark.parametrize("dead", [slice(None, None, 3), slice(0, 20)])  # 8 or 20 of 24
def test_sae_topk_fused_path_matches_support_path(dead, aux_path, monkeypatch):
    """``SAE.training_forward`` for ``topk`` (fused encode; AuxK densely over the dead latents'
    rows, or as pairs encoded against those rows, or against all rows with the live ones masked
    when most are dead) gives the loss and gradients of the generic path (dense
    pre-activations -> support -> gather)."""
    from sae import aux, losses
    from sae.models import SAE, SAEConfig

    if aux_path == "pairs":
        monkeypatch.setattr(aux, "DENSE_AUX_MAX_ENTRIES", 0)

    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=6, d_sae=24, architecture="topk", k=3, aux_k=4, dead_tokens=5))
    sae = sae.double()
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
        sae.tokens_since_fired[dead] = 100
    x = torch.randn(10, 6, dtype=torch.float64)
    dead = sae.dead_mask().nonzero(as_tuple=True)[0]  # before the step updates the counters
    out = sae.training_forward(x)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None}
    sae.zero_grad()

    W_rows = sae.W_enc.T
    pre = (x - sae.b_dec) @ W_rows.T + sae.b_enc
    rows, cols = ops.TopK(3, positive=True).support(pre.detach())
    vals = gather_preact(x, W_rows, sae.b_enc, sae.b_dec, rows, cols)
    x_hat = sparse_decode(vals, rows, cols, sae.W_dec, 10, bias=sae.b_dec)
    assert dead.numel() in (8, 20)
    ar, al = ops.TopK(4, positive=True).support(pre.detach()[:, dead])
    avals = gather_preact(x, W_rows, sae.b_enc, sae.b_dec, ar, dead[al])
    e_hat = sparse_decode(avals, ar, dead[al], sae.W_dec, 10)
    loss = losses.mse(x, x_hat) + sae.cfg.aux_coefficient * losses.normalized_mse(
        (x - x_hat).detach(), e_hat)
    loss.backward()
    torch.testing.assert_close(out.loss, loss)
    assert "auxk" in out.terms
    for n, p in sae.named_parameters():
        if n in grads:
            torch.testing.assert_close(grads[n], p.grad)


@pytest.mark.parametrize("aux_path", ["dense", "pairs"])
@pytest.mark.parametrize("arch", ["batchtopk", "mutual_choice", "feature_choice"])
def test_sae_batch_fused_path_matches_dense_reference(arch, aux_path, monkeypatch):
    """The batch architectures train without the ``(N, d_sae)`` pre-activations
    (``batch_topk_encode`` / ``feature_choice_encode``; AuxK / aux_zipf encoded against the
    candidate latents only) and give the loss, every gradient and the running threshold of the
    dense reference (pre-activations -> ``BatchTopK`` / ``FeatureChoice`` support -> gather; aux
    pairs: the top ``aux_k`` of the (weighted) candidates' columns of the same matrix), with
    the auxiliary code computed densely over the candidates or as pairs."""
    import math

    from sae import aux, losses
    from sae.models import SAE, SAEConfig

    if aux_path == "pairs":
        monkeypatch.setattr(aux, "DENSE_AUX_MAX_ENTRIES", 0)

    torch.manual_seed(1)
    sae = SAE(SAEConfig(d_in=6, d_sae=24, architecture=arch, k=3, aux_k=4, dead_tokens=5))
    sae = sae.double()
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
        sae.tokens_since_fired[::3] = 100  # 8 dead latents
        sae.fire_rate.copy_(torch.rand(24, dtype=torch.float64) * 0.3)  # some under-used
    x = torch.randn(10, 6, dtype=torch.float64)
    W_rows = sae.W_enc.T
    pre = ((x - sae.b_dec) @ W_rows.T + sae.b_enc).detach()
    cand, u = aux.CANDIDATES[sae.arch.aux](sae)  # before the step moves the statistics
    assert cand.numel() > 0 and (u is not None) == (arch != "batchtopk")
    sub = pre[:, cand] if u is None else pre[:, cand] * u[cand]
    aux_rows, local = ops.TopK(4, positive=True).support(sub)
    aux_cols = cand[local]
    out = sae.training_forward(x)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None}
    threshold = sae.threshold.clone()
    sae.zero_grad()

    if arch == "feature_choice":
        op = ops.FeatureChoice(math.ceil(3 * 10 / 24), positive=True)
    else:
        op = ops.BatchTopK(3, positive=True)
    rows, cols = op.support(pre)
    vals = gather_preact(x, W_rows, sae.b_enc, sae.b_dec, rows, cols)
    x_hat = sparse_decode(vals, rows, cols, sae.W_dec, 10, bias=sae.b_dec)
    avals = gather_preact(x, W_rows, sae.b_enc, sae.b_dec, aux_rows, aux_cols)
    if u is not None:
        avals = avals * u[aux_cols]
    e_hat = sparse_decode(avals, aux_rows, aux_cols, sae.W_dec, 10)
    loss = losses.mse(x, x_hat) + sae.cfg.aux_coefficient * losses.normalized_mse(
        (x - x_hat).detach(), e_hat)
    loss.backward()
    torch.testing.assert_close(out.loss, loss)
    assert ("auxk" if arch == "batchtopk" else "aux_zipf") in out.terms
    assert out.l0 == rows.numel() / 10
    v = vals.detach()
    if arch == "feature_choice":  # per latent: the smallest value it selected
        low = torch.full((24,), torch.inf, dtype=v.dtype).scatter_reduce(0, cols, v, "amin")
        want = torch.where(torch.isfinite(low), low, 0.0)
    else:
        want = torch.full_like(threshold, float(v.min()))
    torch.testing.assert_close(threshold, want)
    for n, p in sae.named_parameters():
        if n in grads:
            torch.testing.assert_close(grads[n], p.grad)


def test_empty_batches():
    x, W, b = torch.randn(0, 4), torch.randn(6, 4), torch.zeros(6)
    vals, idx = topk_encode(x, W, b, None, 2)
    assert vals.shape == idx.shape == (0, 2)
    assert all(t.numel() == 0 for t in batch_topk_encode(x, W, b, None, 2))
    assert all(t.numel() == 0 for t in threshold_encode(x, W, b, None))


def test_merge_topk_of_slices_equals_topk_of_the_row():
    """Per-slice top-k results (as latent shards produce) merge into the row's top-k, ties
    included (small integers make many exact ties; the lowest index wins)."""
    from sparsecode.core.kernels import merge_topk, topk_rows

    g = torch.Generator().manual_seed(0)
    pre = torch.randint(0, 6, (50, 30), generator=g).float()
    k = 7
    vs, ix = [], []
    for lo in range(0, 30, 10):
        v, i = topk_rows(pre[:, lo : lo + 10], k)
        vs.append(v)
        ix.append(i + lo)
    v, i = merge_topk(torch.cat(vs, 1), torch.cat(ix, 1), k)
    ref_v, ref_i = topk_rows(pre, k)
    assert torch.equal(v, ref_v) and torch.equal(i, ref_i)
