"""Transcoders, skip transcoders and crosscoders: the SAE's sparse training path against a dense
autograd reference for every activation, and planted-feature recovery."""

import pytest
import torch

from sae.models import SAE, SAEConfig
from sparsecode.core import operators as ops

GRADIENT_ARCHS = ["relu", "topk", "batchtopk", "jumprelu", "matryoshka", "mutual_choice",
                  "feature_choice"]


def _coder(arch, d_in=12, d_out=7, d_sae=40, k=3, seed=0, **kw):
    cfg = SAEConfig(d_in=d_in, d_sae=d_sae, architecture=arch, k=k, d_out=d_out, **kw)
    sae = SAE(cfg, generator=torch.Generator().manual_seed(seed)).double()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # non-trivial biases, thresholds and skip term
        sae.b_enc.copy_(0.1 * torch.randn(d_sae, generator=g, dtype=torch.float64))
        sae.b_dec.copy_(0.1 * torch.randn(cfg.d_out, generator=g, dtype=torch.float64))
        if cfg.skip:
            sae.W_skip.copy_(0.1 * torch.randn(cfg.d_out, d_in, generator=g, dtype=torch.float64))
        if cfg.transcode:
            sae.x_centre.copy_(0.2 * torch.randn(d_in, generator=g, dtype=torch.float64))
        if arch == "jumprelu":
            sae.threshold.copy_(torch.linspace(-0.3, 0.6, d_sae, dtype=torch.float64))
    return sae


def _dense_loss(sae, x, y):
    """The loss written densely from the definitions: ``z = act((x - b_in) W_enc + b_enc)``,
    ``y_hat = z W_dec + b_dec (+ x W_skip^T)``, the architecture's penalty with decoder norms
    summed over a crosscoder's places, Matryoshka's prefix errors."""
    cfg, N = sae.cfg, x.shape[0]
    xc = x - (sae.x_centre if cfg.transcode else sae.b_dec)
    pre = xc @ sae.W_enc + sae.b_enc
    act = {
        "relu": lambda p: p.relu(),
        "topk": ops.TopK(cfg.k, positive=True).project,
        "batchtopk": ops.BatchTopK(cfg.k, positive=True).project,
        "matryoshka": ops.BatchTopK(cfg.k, positive=True).project,
        "mutual_choice": ops.BatchTopK(cfg.k, positive=True).project,
        "feature_choice": ops.FeatureChoice(k=cfg.k, positive=True).project,
        "jumprelu": ops.Jump(sae.threshold, bandwidth=cfg.bandwidth).project,
    }[cfg.architecture]
    z = act(pre)
    base = sae.b_dec + (x @ sae.W_skip.T if cfg.skip else 0)
    y_hat = z @ sae.W_dec + base
    loss = (y - y_hat).pow(2).sum(-1).mean()
    places = cfg.places or [cfg.d_out]
    dn = sum(part.norm(dim=1) for part in sae.W_dec.split(places, dim=1))
    if cfg.architecture == "relu":
        loss = loss + cfg.l1_coefficient * (z * dn).sum() / N
    if cfg.architecture == "jumprelu":
        l0 = ops.Jump(sae.threshold, bandwidth=cfg.bandwidth).indicator(pre).sum() / N
        loss = loss + cfg.l0_coefficient * (l0 / cfg.target_l0 - 1) ** 2
    if cfg.architecture == "matryoshka":
        ends = torch.tensor(cfg.group_sizes).cumsum(0).tolist()
        loss = loss + sum((y - z[:, :e] @ sae.W_dec[:e] - base).pow(2).sum(-1).mean()
                          for e in ends[:-1])
    return loss


def _check_against_dense(sae, x, y):
    params = [p for _, p in sae.named_parameters()]
    want = torch.autograd.grad(_dense_loss(sae, x, y), params)
    sae._last_density = 0.0  # the sparse (pairs) path for the unbounded activations too
    out = sae.training_forward(x, y)
    got = torch.autograd.grad(out.loss, params)
    torch.testing.assert_close(out.loss, _dense_loss(sae, x, y))
    for (name, _), a, e in zip(sae.named_parameters(), got, want, strict=True):
        assert e.abs().sum() > 0, name  # every parameter (W_skip too) is trained
        torch.testing.assert_close(a, e, msg=name)
    return out


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("arch", GRADIENT_ARCHS)
def test_transcoder_loss_and_gradients_equal_dense_reference(arch, skip):
    sae = _coder(arch, transcode=True, skip=skip, aux_coefficient=0.0,
                 group_sizes=[8, 8, 24] if arch == "matryoshka" else None)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(32, 12, generator=g, dtype=torch.float64)
    y = torch.randn(32, 7, generator=g, dtype=torch.float64)
    out = _check_against_dense(sae, x, y)
    assert out.x_hat.shape == (32, 7)


@pytest.mark.parametrize("arch", GRADIENT_ARCHS)
def test_crosscoder_with_three_places_equals_dense_reference(arch):
    sae = _coder(arch, d_in=12, d_out=None, places=[3, 4, 5], aux_coefficient=0.0,
                 group_sizes=[8, 8, 24] if arch == "matryoshka" else None)
    x = torch.randn(32, 12, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    _check_against_dense(sae, x, x)


def test_crosscoder_l1_weighs_by_the_sum_of_per_place_norms():
    sae = _coder("relu", d_in=6, d_out=None, d_sae=4, places=[2, 4])
    with torch.no_grad():
        sae.W_dec.copy_(torch.tensor([[3.0, 4, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0],
                                      [1, 0, 0, 2, 2, 1], [0, 0, 0, 0, 0, 0]]))
    assert sae.decoder_norms().tolist() == [5.0, 1.0, 4.0, 0.0]


def test_topk_transcoder_auxk_equals_dense_reference():
    """AuxK of a transcoder reconstructs the residual of the target, from the input's
    pre-activations over the dead latents."""
    sae = _coder("topk", transcode=True, skip=True, dead_tokens=1)
    dead = torch.zeros(40, dtype=torch.bool)
    dead[::3] = True
    sae.tokens_since_fired[dead] = 5
    g = torch.Generator().manual_seed(5)
    x = torch.randn(32, 12, generator=g, dtype=torch.float64)
    y = torch.randn(32, 7, generator=g, dtype=torch.float64)
    pre = (x - sae.x_centre) @ sae.W_enc + sae.b_enc
    z = ops.TopK(3, positive=True).project(pre)
    y_hat = z @ sae.W_dec + sae.b_dec + x @ sae.W_skip.T
    k_aux = min(sae.cfg.aux_k, int(dead.sum()))
    za = ops.TopK(k_aux, positive=True).project(pre.masked_fill(~dead, -float("inf")))
    e = (y - y_hat).detach()
    aux = (e - za @ sae.W_dec).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
    ref = (y - y_hat).pow(2).sum(-1).mean() + sae.cfg.aux_coefficient * aux
    out = sae.training_forward(x, y)
    assert sae.cfg.aux_k == 3  # d_out // 2: the written width, as sparsify
    torch.testing.assert_close(out.loss, ref)
    params = list(sae.parameters())
    for a, b in zip(torch.autograd.grad(out.loss, params), torch.autograd.grad(ref, params),
                    strict=True):
        torch.testing.assert_close(a, b)


def test_inference_forward_and_pairs_agree_with_the_definition():
    sae = _coder("jumprelu", transcode=True, skip=True).eval()
    x = torch.randn(9, 12, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    pre = (x - sae.x_centre) @ sae.W_enc + sae.b_enc
    z = torch.where(pre > sae.threshold.clamp_min(0), pre, 0.0)
    want = z @ sae.W_dec + sae.b_dec + x @ sae.W_skip.T
    torch.testing.assert_close(sae(x), want)
    rows, cols, vals = sae.encode_pairs(x)
    torch.testing.assert_close(sae.decode_pairs(rows, cols, vals, 9, x=x), want)
    with pytest.raises(ValueError, match="needs its input"):
        sae.decode_pairs(rows, cols, vals, 9)


@pytest.mark.parametrize("kwargs,match", [
    ({"d_out": 5}, "only a transcoder"),
    ({"skip": True}, "skip needs a transcoder"),
    ({"architecture": "mp", "transcode": True}, "cannot transcode"),
    ({"places": [4, 4]}, "sum to 8, not d_in=12"),
    ({"places": [12]}, "two or more"),
    ({"places": [6, 6], "transcode": True}, "cannot also transcode"),
    ({"architecture": "mp", "places": [6, 6]}, "cannot be a crosscoder"),
    ({"d_out": 0, "transcode": True}, "d_out must be a positive integer"),
])
def test_shape_config_errors(kwargs, match):
    base = {"d_in": 12, "d_sae": 24, "k": 2}
    with pytest.raises(ValueError, match=match):
        SAEConfig(**{**base, **kwargs})


def test_transcoder_needs_its_target_and_checks_its_shape():
    sae = _coder("topk", transcode=True)
    x = torch.randn(4, 12, dtype=torch.float64)
    with pytest.raises(ValueError, match="needs its target"):
        sae.training_forward(x)
    with pytest.raises(ValueError, match=r"targets of shape \(4, 7\)"):
        sae.training_forward(x, torch.randn(4, 12, dtype=torch.float64))


# ---------------------------------------------------------------------------- training
def _trainer(sae, data, places, tokens, out_dir=None):
    from sae.data import ArrayActivations
    from sae.train import TrainConfig, Trainer

    src = ArrayActivations(data, batch_size=256, holdout=2000, epochs=None, places=places)
    cfg = TrainConfig(total_tokens=tokens, progress=False, lr=3e-3, checkpoint_every=0)
    return Trainer({"tc": sae}, src, cfg, heldout=src.heldout_batch(), out_dir=out_dir)


def _float_coder(arch, seed=0, **kw):
    return SAE(SAEConfig(d_sae=128, k=3, architecture=arch, **kw),
               generator=torch.Generator().manual_seed(seed))


def test_topk_transcoder_recovers_a_planted_sparse_map():
    """x = c F_in, y = c F_out: the transcoder's decoder rows are the F_out directions."""
    from sae.synthetic import max_cosine, planted_transcoder

    x, y, _, F_out = planted_transcoder(30000, 24, 16, 64, l0=3, seed=0)
    meta = {"hook_name": "in", "hook_name_out": "out"}
    sae = _float_coder("topk", d_in=24, d_out=16, transcode=True, metadata=meta)
    trainer = _trainer(sae, torch.cat([x, y], 1), {"in": 24, "out": 16}, 240_000)
    trainer.fit()
    cos = max_cosine(F_out, sae.W_dec.detach())
    assert int((cos > 0.95).sum()) >= 60  # of 64 (measured: 64)
    m = trainer.evaluate()
    assert m["tc/heldout/fvu"] < 0.35 and m["tc/heldout/l0"] == pytest.approx(3, abs=0.3)


def test_topk_crosscoder_recovers_features_and_where_they_live():
    """Features that write to a subset of three places: the crosscoder finds them and its
    per-place decoder norms say which places each lives in."""
    from sae.synthetic import planted_crosscoder

    widths = [12, 16, 20]
    x, F, lives = planted_crosscoder(30000, widths, 64, l0=3, seed=0)
    sae = _float_coder("topk", d_in=48, places=widths,
                       metadata={"hook_names": ["a", "b", "c"]})
    trainer = _trainer(sae, x, dict(zip("abc", widths, strict=True)), 240_000)
    trainer.fit()
    W = sae.W_dec.detach()
    cos, best = (F / F.norm(dim=1, keepdim=True) @ (W / W.norm(dim=1, keepdim=True)).T).max(1)
    assert int((cos > 0.95).sum()) >= 58  # of 64 (measured: 62)
    norms = torch.stack([p.norm(dim=1) for p in W.split(widths, dim=1)], 1)[best]
    found = norms / norms.sum(dim=1, keepdim=True) > 0.1
    assert float((found == lives).all(dim=1)[cos > 0.95].float().mean()) > 0.95
    m = trainer.evaluate()
    assert {"tc/heldout/fvu_place0", "tc/heldout/fvu_place2"} <= set(m)
    assert trainer.scales["tc"]["in"] == trainer.scales["tc"]["out"]
    assert len(trainer.scales["tc"]["in"]) == 3


def test_skip_transcoder_resumes_exactly(tmp_path):
    from sae.synthetic import planted_transcoder

    x, y, _, _ = planted_transcoder(8000, 10, 6, 32, l0=3, seed=1)
    data, places = torch.cat([x, 3 * y], 1), {"in": 10, "out": 6}
    meta = {"hook_name": "in", "hook_name_out": "out"}

    def run(out_dir):
        sae = _float_coder("batchtopk", d_in=10, d_out=6, transcode=True, skip=True,
                           metadata=dict(meta))
        return _trainer(sae, data, places, 256 * 24, out_dir=out_dir), sae

    full, sae_full = run(None)
    full.fit()
    part, _ = run(tmp_path)
    orig = part._train_step

    def step_then_stop(batch):  # a stop request during step 9: checkpoint at its end
        if part.step == 8:
            part.request_stop()
        return orig(batch)

    part._train_step = step_then_stop
    with pytest.raises(KeyboardInterrupt):
        part.fit()
    resumed, sae_res = run(tmp_path)
    resumed.resume()
    assert resumed.scales == full.scales and full.scales["tc"]["in"] != full.scales["tc"]["out"]
    resumed.fit()
    for (name, a), b in zip(sae_full.state_dict().items(), sae_res.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name
