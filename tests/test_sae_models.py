"""SAE module: sparse training path against dense references, activations, conversions."""

import pytest
import torch

from sae.models import ARCHITECTURES, SAE, SAEConfig
from sparsecode.core import operators as ops
from sparsecode.core.kernels import gather_preact, sparse_decode


def _sae(arch, d_in=12, d_sae=40, k=3, seed=0, **kw):
    sae = SAE(
        SAEConfig(d_in=d_in, d_sae=d_sae, architecture=arch, k=k, **kw),
        generator=torch.Generator().manual_seed(seed),
    )
    with torch.no_grad():  # non-trivial biases
        g = torch.Generator().manual_seed(seed + 1)
        sae.b_enc.copy_(0.1 * torch.randn(d_sae, generator=g))
        sae.b_dec.copy_(0.1 * torch.randn(d_in, generator=g))
    return sae


def test_gather_preact_gradients_match_dense():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 5, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True)
    c = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    rows, cols = ops.TopK(3).support((x - c) @ W.T + b)
    w = torch.randn(rows.numel(), generator=g, dtype=torch.float64)

    def sparse(x, W, b, c):
        return (gather_preact(x, W, b, c, rows, cols) * w).sum()

    def dense(x, W, b, c):
        return (((x - c) @ W.T + b)[rows, cols] * w).sum()

    got = torch.autograd.grad(sparse(x, W, b, c), (x, W, b, c))
    want = torch.autograd.grad(dense(x, W, b, c), (x, W, b, c))
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e)
    torch.autograd.gradcheck(sparse, (x, W, b, c))


def test_sparse_decode_matches_dense_and_groups():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(10, 4, generator=g, dtype=torch.float64, requires_grad=True)
    z = ops.BatchTopK(3, positive=True).project(
        torch.randn(6, 10, generator=g, dtype=torch.float64)
    )
    rows, cols = z.nonzero(as_tuple=True)
    vals = z[rows, cols].clone().requires_grad_()
    torch.testing.assert_close(sparse_decode(vals, rows, cols, W, 6), z @ W)
    torch.autograd.gradcheck(lambda v, W: sparse_decode(v, rows, cols, W, 6), (vals, W))
    groups = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 2])
    parts = sparse_decode(vals, rows, cols, W, 6, groups=groups)
    for p, (lo, hi) in enumerate([(0, 3), (0, 5), (0, 10)]):
        torch.testing.assert_close(parts[:, : p + 1].sum(1), z[:, lo:hi] @ W[lo:hi])


def _dense_topk_loss(sae, x, dead):
    """Reference: TopK SAE loss with AuxK written densely."""
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    mask = torch.zeros_like(pre, dtype=torch.bool)
    mask.scatter_(1, pre.topk(sae.cfg.k, dim=1).indices, True)
    z = pre * (mask & (pre > 0))
    x_hat = z @ sae.W_dec + sae.b_dec
    loss = (x - x_hat).pow(2).sum(-1).mean()
    pre_dead = pre.masked_fill(~dead, -float("inf"))
    k_aux = min(sae.cfg.aux_k, int(dead.sum()))
    amask = torch.zeros_like(mask)
    amask.scatter_(1, pre_dead.topk(k_aux, dim=1).indices, True)
    za = pre * (amask & (pre > 0) & dead)
    e = (x - x_hat).detach()
    aux = (e - za @ sae.W_dec).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
    return loss + sae.cfg.aux_coefficient * aux


def test_topk_training_gradients_equal_dense_reference():
    sae = _sae("topk", dead_tokens=1).double()
    x = torch.randn(32, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    dead = torch.zeros(40, dtype=torch.bool)
    dead[::3] = True
    sae.tokens_since_fired[dead] = 5  # dead (window 1), the rest just fired
    ref = _dense_topk_loss(sae, x, dead)
    want = torch.autograd.grad(ref, list(sae.parameters())[:4])
    out = sae.training_forward(x)
    assert "auxk" in out.terms
    torch.testing.assert_close(out.loss, ref)
    got = torch.autograd.grad(out.loss, list(sae.parameters())[:4])
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e)


def _dense_threshold_loss(sae, x):
    """ReLU + L1 / JumpReLU loss written densely from the papers' formulas (the STE of the
    core's ``Jump`` applied to the whole ``(N, d_sae)`` matrix)."""
    cfg, N = sae.cfg, x.shape[0]
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    dn = sae.W_dec.norm(dim=1)
    if cfg.architecture == "relu":
        z = pre.relu()
        reg = cfg.l1_coefficient * (z * dn).sum() / N
    else:
        jump = ops.Jump(sae.threshold, bandwidth=cfg.bandwidth)
        z = jump.project(pre)
        if cfg.jumprelu_mode == "tanh":
            l0 = torch.tanh(cfg.tanh_scale * z * dn).sum() / N
        else:
            l0 = jump.indicator(pre).sum() / N
        if cfg.jumprelu_mode == "quadratic":
            l0 = (l0 / cfg.target_l0 - 1) ** 2
        reg = cfg.l0_coefficient * l0
    x_hat = z @ sae.W_dec + sae.b_dec
    return (x - x_hat).pow(2).sum(dim=-1).mean() + reg, (z > 0).sum(dim=0)


@pytest.mark.parametrize("arch,mode", [("relu", None), ("jumprelu", "step"),
                                       ("jumprelu", "tanh"), ("jumprelu", "quadratic")])
@pytest.mark.parametrize("density", [1.0, 0.0])  # last batch dense -> dense path, else pairs
def test_relu_and_jumprelu_sparse_and_dense_paths_equal_dense_formula(arch, mode, density):
    kw = {} if mode is None else {"jumprelu_mode": mode, "bandwidth": 0.2}
    sae = _sae(arch, **kw).double()
    if arch == "jumprelu":  # thresholds spread so that many entries sit in the STE window
        with torch.no_grad():
            sae.threshold.copy_(torch.linspace(-0.3, 0.6, 40, dtype=torch.float64))
    x = torch.randn(32, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ref, counts = _dense_threshold_loss(sae, x)
    params = [p for _, p in sae.named_parameters()]
    want = torch.autograd.grad(ref, params)
    sae._last_density = density
    out = sae.training_forward(x)
    torch.testing.assert_close(out.loss, ref)
    torch.testing.assert_close(out.counts, counts)
    assert out.l0 == pytest.approx(float(counts.sum()) / 32)
    got = torch.autograd.grad(out.loss, params)
    for (name, _), a, e in zip(sae.named_parameters(), got, want, strict=True):
        assert e.abs().sum() > 0, name  # every parameter (threshold too) has a gradient here
        torch.testing.assert_close(a, e, msg=name)
    # the path for the next batch follows the fraction of entries above the cut in this one
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    assert sae._last_density == pytest.approx(float((pre > sae.activation.cut).double().mean()))


def test_relu_switches_to_the_sparse_path_once_the_code_is_sparse(monkeypatch):
    from sae import models
    from sparsecode.core import projections

    sae = _sae("relu")
    calls = []
    encode = projections.threshold_encode
    monkeypatch.setattr(projections, "threshold_encode",
                        lambda *a, **k: calls.append(1) or encode(*a, **k))
    x = torch.randn(16, 12)
    sae.training_forward(x)  # first batch: dense, measures a density of about one half
    assert calls == [] and 0.2 < sae._last_density < 0.8
    with torch.no_grad():
        sae.b_enc.fill_(-2.0)  # almost nothing fires any more
    sae.training_forward(x)
    assert calls == [] and sae._last_density <= models.SPARSE_CODE_MAX_DENSITY
    sae.training_forward(x)
    assert calls == [1]


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_every_architecture_trains_one_step_and_encodes(arch):
    sae = _sae(arch)
    x = torch.randn(64, 12)
    out = sae.training_forward(x)
    out.loss.backward()
    for name, p in sae.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    z = sae.eval().encode(x)
    assert z.shape == (64, 40) and (z >= 0).all()
    torch.testing.assert_close(sae(x), z @ sae.W_dec + sae.b_dec)
    rows, cols, vals = sae.encode_pairs(x)
    torch.testing.assert_close(torch.zeros_like(z).index_put((rows, cols), vals), z)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_evaluate_on_pairs_equals_dense_metrics(arch):
    """``metrics.evaluate`` encodes and decodes pairs; its figures equal the dense
    ``encode`` / ``decode`` formulas (several batches, so the accumulation is checked too)."""
    from sae.metrics import evaluate

    sae = _sae(arch).eval()
    with torch.no_grad():
        sae.threshold.copy_(torch.linspace(-0.1, 0.4, 40))  # negative ones clamp to 0
    x = torch.randn(70, 12, generator=torch.Generator().manual_seed(4))
    z = sae.encode(x).detach()
    x_hat = sae.decode(z).detach()
    m = evaluate(sae, x, batch_size=32)
    err = (x - x_hat).double().pow(2).sum()
    assert m["fvu"] == pytest.approx(float(err / (x.double() - x.double().mean(0)).pow(2).sum()))
    assert m["mse"] == pytest.approx(float(err / 70))
    assert m["l0"] == pytest.approx(float((z != 0).sum()) / 70)
    assert m["dead_fraction"] == pytest.approx(float(((z != 0).sum(0) == 0).double().mean()))
    cos = torch.nn.functional.cosine_similarity(x, x_hat, dim=-1).mean()
    assert m["cosine"] == pytest.approx(float(cos), rel=1e-6)
    assert 0 < m["l0"] < 40


def test_training_l0_matches_budget():
    x = torch.randn(50, 12)
    for arch in ("topk", "batchtopk", "mutual_choice", "matryoshka"):
        out = _sae(arch).training_forward(x)
        assert out.l0 == pytest.approx(3.0, abs=0.05), arch  # k per token (exact when pre > 0)
    out = _sae("feature_choice").training_forward(x)
    m = -(-3 * 50 // 40)  # each latent takes ceil(kB / d_sae) tokens
    assert out.l0 <= m * 40 / 50 + 1e-9


def test_batch_threshold_gives_jumprelu_inference():
    sae = _sae("batchtopk", threshold_rate=1.0)
    x = torch.randn(200, 12)
    out = sae.training_forward(x)
    # with rate 1 the threshold is the smallest selected value of this batch
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    z_train = ops.BatchTopK(3, positive=True).project(pre.detach())
    theta = z_train[z_train > 0].min()
    torch.testing.assert_close(sae.threshold, torch.full((40,), theta.item()))
    z_eval = sae.eval().encode(x)
    # JumpReLU with that threshold keeps the batch's selection, minus the ties at the minimum
    assert ((z_eval > 0) <= (z_train > 0)).all()
    assert (z_train > 0).sum() - (z_eval > 0).sum() == 1
    assert out.l0 == pytest.approx(3.0)


def test_feature_choice_threshold_is_per_latent():
    sae = _sae("feature_choice", threshold_rate=1.0)
    sae.training_forward(torch.randn(80, 12))
    assert sae.threshold.unique().numel() > 1


def test_matryoshka_single_pass_equals_per_prefix_decodes():
    sae = _sae("matryoshka", d_sae=32, group_sizes=[4, 4, 8, 16])
    x = torch.randn(20, 12)
    out = sae.training_forward(x)
    errs = []
    with torch.no_grad():
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        z = ops.BatchTopK(3, positive=True).project(pre)
        for hi in (4, 8, 16, 32):
            xh = z[:, :hi] @ sae.W_dec[:hi] + sae.b_dec
            errs.append((x - xh).pow(2).sum(-1).mean())
    assert out.terms["mse"] == pytest.approx(float(errs[-1]), rel=1e-5)
    assert out.terms["matryoshka"] == pytest.approx(float(sum(errs[:-1])), rel=1e-5)


def test_unit_decoder_constraint():
    sae = _sae("topk")
    sae.training_forward(torch.randn(30, 12)).loss.backward()
    W = sae.W_dec.detach().clone()
    sae.remove_parallel_gradient()
    assert (sae.W_dec.grad * W).sum(1).abs().max() < 1e-5
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    sae.constrain()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(40))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(architecture="gated"), "known architectures: relu, topk"),
        (dict(k=100), "k=100 is larger than d_sae=40"),
        (dict(k=0), "k must be a positive integer"),
        (dict(architecture="matryoshka", group_sizes=[10, 10]), "sum to d_sae=40"),
        (dict(jumprelu_mode="exp"), "unknown jumprelu_mode"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SAEConfig(d_in=12, d_sae=40, **kwargs)


def test_wrong_input_width():
    with pytest.raises(ValueError, match=r"shape \(N, 12\), got \(5, 7\)"):
        _sae("topk").training_forward(torch.randn(5, 7))


def test_matching_pursuit_sae_loss_and_gradients_equal_the_unrolled_reference():
    """``--arch mp``: the loss and every gradient equal autograd through SAELens' own unrolled
    matching pursuit (float64, tiny case; our selection runs in the Gram domain, values along
    the picks with autograd, decode through the sparse decode)."""
    from sae_lens.saes.matching_pursuit_sae import _encode_matching_pursuit

    sae = _sae("mp", k=5).double()
    sae.constrain()
    assert [n for n, _ in sae.named_parameters()] == ["W_dec", "b_dec"]
    x = torch.randn(32, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    z = _encode_matching_pursuit(x - sae.b_dec, sae.W_dec, 0.0, max_iterations=5,
                                 stop_on_duplicate_support=True)
    ref = (x - (z @ sae.W_dec + sae.b_dec)).pow(2).sum(-1).mean()
    want = torch.autograd.grad(ref, [sae.W_dec, sae.b_dec])
    out = sae.training_forward(x)
    torch.testing.assert_close(out.loss, ref)
    assert out.l0 == pytest.approx(float((z != 0).sum()) / 32)
    got = torch.autograd.grad(out.loss, [sae.W_dec, sae.b_dec])
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e)
    torch.testing.assert_close(sae.eval().encode(x), z.detach())
