"""Ground-truth recovery (sae.evals.synthetic) against SAELens' SynthSAEBench evaluator
functions on the same tensors, and known answers."""

import pytest
import torch

from sae.evals.synthetic import recovery
from sae.io import from_dictionary


def _samples(seed=0):
    g = torch.Generator().manual_seed(seed)
    F = torch.randn(48, 16, generator=g)
    F /= F.norm(dim=1, keepdim=True)
    c = (torch.rand(3000, 48, generator=g) < 3 / 48) * (0.5 + torch.rand(3000, 48, generator=g))
    return c @ F + 0.05 * torch.randn(3000, 16, generator=g), c, F


@pytest.mark.parametrize("encoder", ["topk", "mp"])
def test_recovery_equals_sae_lens_evaluator_functions(encoder):
    evals = pytest.importorskip("sae_lens.synthetic.evals")
    from sae_lens.evals import ExplainedVarianceCalculator

    x, c, F = _samples()
    g = torch.Generator().manual_seed(1)
    D = torch.cat([F[:40] + 0.3 * torch.randn(40, 16, generator=g),
                   torch.randn(24, 16, generator=g)])  # a partly right, partly wrong dictionary
    sae = from_dictionary(D, k=3, encoder=encoder)
    got = recovery(sae, x, c, F, batch_size=700)  # several batches
    z = sae.encode(x)
    x_hat = sae(x)
    W = sae.W_dec.detach()
    cls = evals.compute_classification_metrics(z, c, W, F)
    shrink, ev = evals.ShrinkageCalculator(), ExplainedVarianceCalculator()
    shrink.add_batch(x_hat, x)
    ev.add_batch(x_hat, x)
    l0 = evals.L0Calculator()
    l0.add_batch(z)
    dead = evals.DeadLatentsCalculator(W.shape[0])
    dead.add_batch(z)
    want = {"mcc": evals.mean_correlation_coefficient(W, F),
            "uniqueness": evals.feature_uniqueness(W, F),
            "precision": cls.precision, "recall": cls.recall, "f1": cls.f1_score,
            "accuracy": cls.accuracy, "shrinkage": shrink.compute(),
            "explained_variance": ev.compute(), "sae_l0": l0.compute(),
            "dead_latents": dead.compute(), "true_l0": float((c > 0).sum(1).float().mean())}
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert 0 < got["f1"] < 1 and 0 < got["mcc"] < 1


def test_the_true_dictionary_recovers_everything():
    """Orthonormal true features (exact in floating point: permuted basis vectors) and the TopK
    SAE whose encoder and decoder are them: every latent detects its feature exactly and the
    samples are reconstructed exactly."""
    g = torch.Generator().manual_seed(3)
    F = torch.eye(16)[torch.randperm(16, generator=g)[:12]]
    c = (torch.rand(2000, 12, generator=g) < 0.2) * (0.5 + torch.rand(2000, 12, generator=g))
    r = recovery(from_dictionary(F, k=12, encoder="topk"), c @ F, c, F)
    assert r["mcc"] == pytest.approx(1.0) and r["uniqueness"] == 1.0
    assert r["f1"] == 1.0 and r["precision"] == 1.0 and r["recall"] == 1.0
    assert r["explained_variance"] == pytest.approx(1.0) and r["shrinkage"] == pytest.approx(1.0)
    assert r["dead_latents"] == 0 and r["sae_l0"] == pytest.approx(r["true_l0"])


def test_width_mismatch_is_reported():
    x, c, F = _samples()
    sae = from_dictionary(torch.randn(8, 10), k=2, encoder="topk")
    with pytest.raises(ValueError, match="width 16 differs from the SAE's"):
        recovery(sae, x, c, F)


def test_sae_eval_synthetic_on_a_saelens_synthetic_model(tmp_path, capsys):
    """``sae eval RUN --synthetic MODEL``: an SAE built from the model's own feature directions
    recovers them (MCC 1), and the numbers are ``recovery`` on the same samples."""
    import json

    synthetic = pytest.importorskip("sae_lens.synthetic")
    from sae_lens.synthetic.synthetic_model import SyntheticModelConfig

    from sae.cli import main
    from sae.io import save_sae

    model = synthetic.SyntheticModel(SyntheticModelConfig(num_features=32, hidden_dim=16,
                                                          seed=0), device="cpu")
    model.save(tmp_path / "model")
    F = model.feature_dict.feature_vectors.detach()
    sae = from_dictionary(F, k=4, encoder="topk", b_dec=model.feature_dict.bias.detach())
    save_sae(sae, tmp_path / "run" / "topk")
    assert main(["eval", str(tmp_path / "run"), "--synthetic", str(tmp_path / "model"),
                 "--synthetic-samples", "3000", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["topk"]
    torch.manual_seed(0)
    x, c = model.sample_with_features(3000)
    want = recovery(sae, x, c, F)
    assert got == pytest.approx(want)
    assert got["mcc"] == pytest.approx(1.0, abs=1e-5) and got["uniqueness"] == 1.0
    with pytest.raises(SystemExit, match="width 16 differs"):
        save_sae(from_dictionary(torch.randn(8, 10), k=2, encoder="topk"), tmp_path / "w" / "a")
        main(["eval", str(tmp_path / "w"), "--synthetic", str(tmp_path / "model")])
    with pytest.raises(SystemExit, match="synthetic model folder not found"):
        main(["eval", str(tmp_path / "run"), "--synthetic", str(tmp_path / "nothing")])
