"""Trainer: planted-feature recovery per architecture, exact resume, interruption."""

import pytest
import torch

from sae.data import ArrayActivations
from sae.initialise import geometric_median
from sae.metrics import evaluate
from sae.models import SAE, SAEConfig
from sae.synthetic import max_cosine, planted_features
from sae.train import TrainConfig, Trainer

D_IN, N_FEATURES, L0 = 32, 64, 4


@pytest.fixture(scope="module")
def planted():
    return planted_features(20_000, D_IN, N_FEATURES, l0=L0, seed=0)


def _train(arch, X, tokens=300_000, **kw):
    sae = SAE(
        SAEConfig(d_in=D_IN, d_sae=128, architecture=arch, k=L0, **kw),
        generator=torch.Generator().manual_seed(0),
    )
    src = ArrayActivations(X, batch_size=256, epochs=100, seed=0)
    trainer = Trainer(
        {arch: sae},
        src,
        TrainConfig(total_tokens=tokens, lr=3e-3, b_dec_init="mean", progress=False),
    )
    trainer.fit()
    return sae, trainer


@pytest.mark.parametrize(
    "arch", ["topk", "batchtopk", "jumprelu", "mutual_choice", "feature_choice", "matryoshka"]
)
def test_recovers_planted_features(planted, arch):
    X, F = planted
    sae, trainer = _train(arch, X)
    cos = max_cosine(F, sae.W_dec.detach())
    assert cos.mean() >= 0.9, f"{arch}: mean max cosine {cos.mean():.3f}"
    m = evaluate(sae, X[:4000] * trainer.scales[arch]["in"][0])
    assert m["l0"] == pytest.approx(L0, rel=0.5)  # inference L0 near the planted L0


def test_relu_recovers_planted_features(planted):
    X, F = planted
    sae, _ = _train("relu", X, l1_coefficient=1.0)
    assert max_cosine(F, sae.W_dec.detach()).mean() >= 0.9


def test_batchtopk_inference_keeps_training_behaviour(planted):
    X, _ = planted
    sae, trainer = _train("batchtopk", X, tokens=150_000)
    x = X[:4096] * trainer.scales["batchtopk"]["in"][0]
    train_out = sae.train().training_forward(x)
    sae.eval()
    m = evaluate(sae, x)
    assert m["l0"] == pytest.approx(train_out.l0, rel=0.15)
    from sae.metrics import fvu

    assert m["fvu"] == pytest.approx(fvu(x, train_out.x_hat.detach()), abs=0.03)


def test_matryoshka_prefixes_improve_with_size(planted):
    X, _ = planted
    sae, trainer = _train("matryoshka", X, tokens=150_000, group_sizes=[8, 8, 16, 32, 64])
    x = X[:4096] * trainer.scales["matryoshka"]["in"][0]
    z = sae.eval().encode(x).detach()
    errs = []
    for hi in (8, 16, 32, 64, 128):
        xh = z[:, :hi] @ sae.W_dec[:hi].detach() + sae.b_dec.detach()
        errs.append(float((x - xh).pow(2).sum(-1).mean()))
    assert all(a > b for a, b in zip(errs, errs[1:], strict=False)), errs


def test_auxk_trains_only_dead_latents_on_the_residual(planted):
    X, _ = planted
    x = X[:512]
    grads = {}
    for coef in (1 / 32, 0.0):
        sae = SAE(
            SAEConfig(d_in=D_IN, d_sae=128, k=L0, dead_tokens=100, aux_coefficient=coef),
            generator=torch.Generator().manual_seed(0),
        )
        dead = torch.zeros(128, dtype=torch.bool)
        dead[64:] = True
        sae.tokens_since_fired[dead] = 1000
        with torch.no_grad():
            sae.b_enc[dead] = -0.5  # dead latents lose the main top-k but have positive pre-acts
        out = sae.training_forward(x)
        out.loss.backward()
        idle = dead & ~out.fired  # dead and not selected by the main top-k on this batch
        grads[coef] = sae.W_dec.grad.norm(dim=1)
    assert idle.sum() > 32
    assert (grads[0.0][idle] == 0).all()  # without AuxK idle dead latents get no gradient
    assert (grads[1 / 32][idle] > 0).float().mean() > 0.5
    torch.testing.assert_close(grads[1 / 32][~dead], grads[0.0][~dead])  # live: unchanged


def _run(X, steps, ckpt_at=None, tmp_path=None, arch="matryoshka"):
    sae = SAE(
        SAEConfig(
            d_in=D_IN, d_sae=64, architecture=arch, k=L0, random_prefixes=True, dead_tokens=500
        ),
        generator=torch.Generator().manual_seed(0),
    )
    src = ArrayActivations(X, batch_size=128, epochs=10, seed=3)
    cfg = TrainConfig(total_tokens=128 * steps, progress=False, log_every=1)
    return Trainer({"a": sae}, src, cfg, out_dir=tmp_path), sae


def test_exact_resume(planted, tmp_path):
    X = planted[0][:3000]
    full, sae_full = _run(X, 30)
    full.fit()

    class Stop(Exception):
        pass

    part, _ = _run(X, 30, tmp_path=tmp_path)
    orig = part._train_step

    def step_then_stop(batch):  # a stop request during step 13 (mid-epoch, mid-warm-up)
        if part.step == 12:
            part.request_stop()
            part.request_stop()  # a second request changes nothing
        return orig(batch)

    part._train_step = step_then_stop
    with pytest.raises(KeyboardInterrupt):
        part.fit()
    assert (tmp_path / "checkpoint" / "trainer.json").exists()

    resumed, sae_res = _run(X, 30, tmp_path=tmp_path)
    resumed.resume()
    assert resumed.step == 13
    resumed.fit()
    for (name, a), b in zip(
        sae_full.state_dict().items(), sae_res.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    assert resumed.tokens == full.tokens


def test_resume_rejects_other_config(planted, tmp_path):
    X = planted[0][:2000]
    t, _ = _run(X, 3, tmp_path=tmp_path)
    t.fit()
    t.checkpoint()
    other, _ = _run(X, 3, tmp_path=tmp_path, arch="topk")
    with pytest.raises(ValueError, match="architecture='matryoshka'"):
        other.resume()


def test_several_saes_side_by_side_see_the_same_batches(planted):
    X = planted[0][:4000]
    saes = {f"k{k}": SAE(SAEConfig(d_in=D_IN, d_sae=64, k=k)) for k in (2, 8)}
    trainer = Trainer(
        saes,
        ArrayActivations(X, batch_size=500, epochs=2),
        TrainConfig(total_tokens=8000, progress=False, log_every=1),
    )
    hist = trainer.fit()
    assert len(hist) == 16
    assert hist[-1]["k8/fvu"] < hist[-1]["k2/fvu"]  # more latents per token reconstruct better
    assert set(trainer.scales) == {"k2", "k8"}


def test_input_scale_and_geometric_median():
    x = torch.randn(1000, 8) * 30 + 5
    sae = SAE(SAEConfig(d_in=8, d_sae=16, k=2))
    t = Trainer(
        {"s": sae},
        ArrayActivations(x, batch_size=1000),
        TrainConfig(total_tokens=1000, progress=False),
    )
    t.fit()
    assert (x * t.scales["s"]["in"][0]).norm(dim=1).mean() == pytest.approx(8**0.5, rel=1e-4)
    # Weiszfeld fixed point: the gradient of the sum of distances vanishes
    pts = torch.randn(200, 3, dtype=torch.float64)
    m = geometric_median(pts, n_iter=1000, tol=1e-12)
    grad = ((m - pts) / (m - pts).norm(dim=1, keepdim=True)).sum(0)
    assert grad.norm() < 1e-6


def test_source_too_short():
    sae = SAE(SAEConfig(d_in=8, d_sae=16, k=2))
    t = Trainer(
        {"s": sae},
        ArrayActivations(torch.randn(100, 8), batch_size=50),
        TrainConfig(total_tokens=1000, progress=False),
    )
    with pytest.raises(ValueError, match="ran out after 100 tokens"):
        t.fit()


def test_wandb_offline_logging(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    sae = SAE(SAEConfig(d_in=8, d_sae=16, k=2))
    t = Trainer({"s": sae}, ArrayActivations(torch.randn(2000, 8), batch_size=100),
                TrainConfig(total_tokens=2000, progress=False, wandb=True, log_every=5),
                out_dir=tmp_path)
    t.fit()
    run_dir = t._wandb.dir
    t.close()
    assert wandb.run is None
    assert (tmp_path / "wandb").exists() and "offline-run" in str(run_dir)


@pytest.mark.parametrize("arch, pursuit", [("mp", "mp"), ("online_dl", "mp"),
                                           ("online_dl", "nnomp")])
def test_pursuit_architectures_recover_planted_features(planted, arch, pursuit):
    """The matching-pursuit SAE (tied, gradient-trained) and online dictionary learning (the
    decoder updated from the code statistics, coded by matching pursuit or non-negative OMP)
    all find the planted directions (measured: 0.993, 0.994 and 0.996 mean max cosine)."""
    X, F = planted
    sae, trainer = _train(arch, X, pursuit=pursuit)
    assert max_cosine(F, sae.W_dec.detach()).mean() >= 0.9
    m = evaluate(sae, X[:4000] * trainer.scales[arch]["in"][0])
    assert m["l0"] <= L0 and m["fvu"] < 0.2
    if arch == "online_dl":
        assert not any(p.requires_grad and p.grad is not None for p in sae.parameters())
        assert trainer.optimizers == {} and int(sae.online_steps) == trainer.step
