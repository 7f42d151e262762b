"""sae.io: SAELens / sparsify folders written and read by us, by SAELens and by sparsify."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

from sae.architectures import RUNNING_THRESHOLDS
from sae.io import (
    SAELENS_ARCHITECTURES,
    SAELENS_TENSORS,
    load,
    load_sae,
    load_sparsify,
    save_sae,
    save_sparsify,
)
from sae.metrics import log_density
from sae.models import ARCHITECTURES, SAE, SAEConfig

D_IN, D_SAE, K = 16, 64, 6
TOL = {"rtol": 1e-5, "atol": 1e-5}
META = {"hook_name": "model.layers.2", "model_name": "SmolLM2-135M", "context_size": 128}


#: Architectures with a batch-dependent activation (a running inference threshold).
BATCH_ARCHITECTURES = [a for a, row in ARCHITECTURES.items()
                       if row.threshold in RUNNING_THRESHOLDS]


def make_sae(architecture: str, seed: int = 0) -> SAE:
    """An SAE with non-trivial weights, biases, thresholds and firing statistics."""
    g = torch.Generator().manual_seed(seed)
    cfg = SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture=architecture, k=K)
    sae = SAE(cfg, generator=g)

    def rand(*shape):
        return torch.randn(*shape, generator=g)

    with torch.no_grad():
        sae.W_enc.add_(0.3 * rand(D_IN, D_SAE))
        sae.b_enc.copy_(0.2 * rand(D_SAE))
        sae.b_dec.copy_(0.5 * rand(D_IN))
        if architecture in ("jumprelu", "feature_choice"):  # per-latent threshold
            sae.threshold.copy_(0.8 * torch.rand(D_SAE, generator=g))
        elif architecture in BATCH_ARCHITECTURES:  # one global running threshold
            sae.threshold.fill_(0.4)
        sae.threshold_ready.fill_(True)
        alive = torch.rand(D_SAE, generator=g) > 0.2
        sae.fire_rate.copy_(torch.rand(D_SAE, generator=g) * alive)
        sae.tokens_seen.fill_(10_000)
    if sae.arch.tied:  # the encoder was the decoder: a pursuit's atoms stay unit-norm
        sae.constrain()
    return sae.eval()


def latent_scale(sae: SAE, s: float) -> float:
    """Saved latents x this = the module's latents on scaled inputs: 1, but ``s`` for a tied
    pursuit (its atoms stay unit-norm on disk, so its codes scale with the input)."""
    return s if sae.arch.tied else 1.0


def inputs(seed: int = 1, n: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D_IN, generator=g) + 0.5


@pytest.fixture(scope="module")
def sae_lens():
    return pytest.importorskip("sae_lens")


@pytest.fixture(scope="module")
def sparsify():
    return pytest.importorskip("sparsify")


# ------------------------------------------------------------------------------ our round trip
@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_save_load_roundtrip(architecture, tmp_path):
    sae, x = make_sae(architecture), inputs()
    path = save_sae(sae, tmp_path / "sae", metadata=META)
    assert path == tmp_path / "sae"
    assert sorted(os.listdir(path)) == [
        "cfg.json",
        "checksums.json",
        "sae_weights.safetensors",
        "sparsity.safetensors",
    ]
    assert os.listdir(tmp_path) == ["sae"]  # no temporary folder left

    cfg = json.loads((path / "cfg.json").read_text())
    inference = sae.inference_architecture
    assert cfg["architecture"] == inference
    assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"]) == (D_IN, D_SAE, "float32")
    assert cfg["normalize_activations"] == "none" and cfg["apply_b_dec_to_input"] is True
    assert ("k" in cfg) == (inference == "topk")
    meta = cfg["metadata"]
    assert {k: meta[k] for k in META} == META
    assert meta["training_architecture"] == architecture
    assert meta["sae_lens_version"] == "6.0.0"
    config = sae.cfg.to_dict()
    del config["metadata"]
    assert meta["sparsecode"]["config"] == config
    assert meta["sparsecode"]["input_scale"] == 1.0

    weights = load_file(path / "sae_weights.safetensors")
    shapes = {k: tuple(v.shape) for k, v in weights.items()}
    expected = {"W_enc": (D_IN, D_SAE), "W_dec": (D_SAE, D_IN), "b_enc": (D_SAE,), "b_dec": (D_IN,)}
    if inference == "jumprelu":
        expected["threshold"] = (D_SAE,)
        assert_close(weights["threshold"], sae.threshold.detach())
    expected = {k: v for k, v in expected.items() if k in SAELENS_TENSORS[inference]}
    assert shapes == expected
    sparsity = load_file(path / "sparsity.safetensors")["sparsity"]
    assert_close(sparsity, log_density(sae.fire_rate))

    loaded = load_sae(path)
    assert not loaded.training
    # the architecture we saved when it is its own inference form (mp, online_dl, topk, ...),
    # the inference form's otherwise (a batchtopk file is a jumprelu SAE)
    same = ARCHITECTURES[architecture].threshold not in RUNNING_THRESHOLDS
    assert loaded.architecture == (architecture if same else SAELENS_ARCHITECTURES[inference])
    assert loaded.cfg.metadata["training_architecture"] == architecture
    assert loaded.cfg.metadata["hook_name"] == META["hook_name"]
    if inference == "topk":
        assert loaded.cfg.k == K
    if architecture in BATCH_ARCHITECTURES and architecture != "feature_choice":
        assert torch.all(loaded.threshold == 0.4)
    z = sae.encode(x)
    l0 = (z != 0).sum(dim=1).float().mean()
    assert 0 < l0 < D_SAE  # the comparison is not trivial
    assert_close(loaded.encode(x), z)
    assert_close(loaded(x), sae(x))
    assert_close(loaded.fire_rate, sae.fire_rate)

    # saving the loaded SAE again keeps the weights and the training architecture
    again = save_sae(loaded, tmp_path / "again")
    meta2 = json.loads((again / "cfg.json").read_text())["metadata"]
    assert meta2["training_architecture"] == architecture
    assert meta2["hook_name"] == META["hook_name"]
    for name, value in load_file(again / "sae_weights.safetensors").items():
        assert torch.equal(value, weights[name])


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_input_scale_is_folded(architecture, tmp_path):
    """The trainer trains on ``s * x``; the saved SAE works on raw ``x``."""
    s = 3.7
    sae, x = make_sae(architecture, seed=2), inputs(seed=3)
    path = save_sae(sae, tmp_path / "sae", input_scale=s)
    cfg = json.loads((path / "cfg.json").read_text())
    assert cfg["normalize_activations"] == "none"
    assert cfg["metadata"]["sparsecode"]["input_scale"] == s
    loaded = load(path)
    z = sae.encode(s * x)
    assert_close(loaded.encode(x) * latent_scale(sae, s), z, **TOL)
    assert_close(loaded.decode(loaded.encode(x)), sae.decode(z) / s, **TOL)


def test_contradicting_training_architecture_is_replaced(tmp_path):
    sae = make_sae("topk")
    sae.cfg.metadata["training_architecture"] = "batchtopk"  # would be saved as jumprelu
    path = save_sae(sae, tmp_path / "sae")
    meta = json.loads((path / "cfg.json").read_text())["metadata"]
    assert meta["training_architecture"] == "topk"


def test_no_sparsity_file_without_statistics(tmp_path):
    sae = SAE(SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture="relu"))
    path = save_sae(sae, tmp_path / "fresh")
    assert not (path / "sparsity.safetensors").exists()
    assert load(path).fire_rate.eq(0).all()


def test_dtype(tmp_path):
    sae = make_sae("topk")
    path = save_sae(sae, tmp_path / "bf16", dtype=torch.bfloat16)
    assert json.loads((path / "cfg.json").read_text())["dtype"] == "bfloat16"
    assert load_file(path / "sae_weights.safetensors")["W_enc"].dtype == torch.bfloat16
    assert load_sae(path).W_enc.dtype == torch.bfloat16
    widened = load_sae(path, dtype="float32")
    assert widened.W_dec.dtype == torch.float32
    assert_close(widened.W_dec, sae.W_dec.detach(), rtol=1e-2, atol=1e-2)


# ------------------------------------------------------------------------------ SAELens
@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_sae_lens_reads_our_folder(architecture, tmp_path, sae_lens):
    s = 2.5
    sae, x = make_sae(architecture, seed=4), inputs(seed=5)
    path = save_sae(sae, tmp_path / "sae", input_scale=s, metadata=META)
    theirs = sae_lens.SAE.load_from_disk(path)
    assert theirs.cfg.architecture() == sae.inference_architecture
    assert theirs.cfg.metadata.hook_name == META["hook_name"]  # read as a v6 config
    assert theirs.cfg.metadata["sparsecode"]["architecture"] == architecture
    with torch.no_grad():
        z = theirs.encode(x)
        assert_close(z * latent_scale(sae, s), sae.encode(s * x), **TOL)
        assert_close(theirs.decode(z), sae.decode(sae.encode(s * x)) / s, **TOL)


def _their_sae(sae_lens, architecture: str, seed: int, **cfg):
    """A SAELens inference SAE with random weights."""
    cls, cfg_cls = {
        "standard": (sae_lens.StandardSAE, sae_lens.StandardSAEConfig),
        "topk": (sae_lens.TopKSAE, sae_lens.TopKSAEConfig),
        "jumprelu": (sae_lens.JumpReLUSAE, sae_lens.JumpReLUSAEConfig),
    }[architecture]
    theirs = cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, **cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g))
            if name == "threshold":
                p.abs_()
    return theirs


@pytest.mark.parametrize(
    ("architecture", "cfg"),
    [
        ("standard", {}),
        ("standard", {"apply_b_dec_to_input": False}),
        ("topk", {"k": K}),
        ("topk", {"k": K, "rescale_acts_by_decoder_norm": True, "apply_b_dec_to_input": False}),
        ("jumprelu", {"apply_b_dec_to_input": False}),
    ],
)
def test_we_read_sae_lens_folder(architecture, cfg, tmp_path, sae_lens):
    theirs = _their_sae(sae_lens, architecture, seed=6, **cfg)
    theirs.cfg.metadata.hook_name = "blocks.3.hook_resid_pre"
    trained_as = {"jumprelu": "matryoshka_batchtopk"}.get(architecture, architecture)
    theirs.cfg.metadata.training_architecture = trained_as
    theirs.save_model(tmp_path / "theirs")
    ours = load_sae(tmp_path / "theirs")
    assert ours.architecture == SAELENS_ARCHITECTURES[architecture]
    assert ours.cfg.metadata["hook_name"] == "blocks.3.hook_resid_pre"
    resaved = json.loads((save_sae(ours, tmp_path / "ours") / "cfg.json").read_text())
    assert resaved["metadata"]["training_architecture"] == trained_as
    x = inputs(seed=7)
    with torch.no_grad():
        z = theirs.encode(x)
        assert (z != 0).any()
        assert_close(ours.encode(x), z, **TOL)
        assert_close(ours(x), theirs.decode(z), **TOL)


def _with_cfg(path: Path, **changes) -> None:
    cfg = json.loads((path / "cfg.json").read_text())
    cfg.update(changes)
    (path / "cfg.json").write_text(json.dumps(cfg))


def test_expected_average_norm_is_folded(tmp_path, sae_lens):
    s = 0.37
    path = save_sae(make_sae("jumprelu", seed=8), tmp_path / "sae")
    _with_cfg(path, normalize_activations="expected_average_only_in")
    with pytest.raises(ValueError, match="expected_average_only_in.*scaling factor"):
        load_sae(path)
    x = inputs(seed=9)
    explicit = load_sae(path, scaling_factor=s)
    (path / "activation_scaler.json").write_text(json.dumps({"scaling_factor": s}))
    ours = load_sae(path)
    theirs = sae_lens.SAE.load_from_disk(path)
    theirs.fold_activation_norm_scaling_factor(s)
    with torch.no_grad():
        z = theirs.encode(x)
        assert (z != 0).any()
        for model in (ours, explicit):
            assert_close(model.encode(x), z, **TOL)
            assert_close(model(x), theirs.decode(z), **TOL)


def test_covariance_whitening_is_folded(tmp_path, sae_lens):
    path = save_sae(make_sae("topk", seed=10), tmp_path / "sae")
    _with_cfg(path, normalize_activations="covariance_whitening", apply_b_dec_to_input=False)
    g = torch.Generator().manual_seed(11)
    mean = torch.randn(D_IN, generator=g)
    matrix = torch.eye(D_IN) + 0.2 * torch.randn(D_IN, D_IN, generator=g)
    inverse = torch.linalg.inv(matrix)
    save_file(
        {"mean": mean, "matrix": matrix, "inverse_matrix": inverse.contiguous()},
        path / "activation_whitening.safetensors",
    )
    ours = load_sae(path)
    theirs = sae_lens.SAE.load_from_disk(path)
    theirs.fold_activation_whitening(mean, matrix, inverse)
    x = inputs(seed=12)
    with torch.no_grad():
        z = theirs.encode(x)
        assert_close(ours.encode(x), z, **TOL)
        assert_close(ours(x), theirs.decode(z), **TOL)


def test_pre_6_flat_config(tmp_path, sae_lens):
    """Flat pre-6 cfg.json: hook_point and activation_fn_str at the top level."""
    path = save_sae(make_sae("topk", seed=13), tmp_path / "old")
    flat = {
        "d_in": D_IN,
        "d_sae": D_SAE,
        "dtype": "torch.float32",
        "device": "cpu",
        "model_name": "gpt2-small",
        "hook_point": "blocks.3.hook_resid_pre",
        "hook_point_layer": 3,
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": K},
        "apply_b_dec_to_input": True,
        "normalize_activations": False,
        "context_size": 128,
        "sae_lens_training_version": "3.13.0",
    }
    (path / "cfg.json").write_text(json.dumps(flat))
    ours = load_sae(path)
    assert ours.architecture == "topk" and ours.cfg.k == K
    assert ours.cfg.metadata["hook_name"] == "blocks.3.hook_resid_pre"
    assert ours.cfg.metadata["hook_layer"] == 3
    theirs = sae_lens.SAE.load_from_disk(path)
    assert theirs.cfg.architecture() == "topk"
    x = inputs(seed=14)
    with torch.no_grad():
        assert_close(ours.encode(x), theirs.encode(x), **TOL)


def test_log_threshold_and_finetuning_scale(tmp_path):
    """Older jumprelu files store log_threshold; pre-6 files may scale latents before W_dec."""
    sae = make_sae("jumprelu", seed=15)
    path = save_sae(sae, tmp_path / "old")
    weights = load_file(path / "sae_weights.safetensors")
    weights["log_threshold"] = weights.pop("threshold").log()
    scale = torch.rand(D_SAE, generator=torch.Generator().manual_seed(16)) + 0.5
    weights["W_dec"] = weights["W_dec"] / scale.unsqueeze(1)
    weights["scaling_factor"] = scale
    save_file(weights, path / "sae_weights.safetensors")
    (path / "checksums.json").unlink()  # as a file SAELens wrote
    loaded = load_sae(path)
    x = inputs(seed=17)
    assert_close(loaded.threshold.detach(), sae.threshold.detach(), **TOL)
    assert_close(loaded.encode(x), sae.encode(x), **TOL)
    assert_close(loaded(x), sae(x), **TOL)


# ------------------------------------------------------------------------------ sparsify
def _dense(top_acts: torch.Tensor, top_indices: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(top_acts.shape[0], D_SAE, dtype=top_acts.dtype)
    return out.scatter(1, top_indices, top_acts)


def _active_sets(z: torch.Tensor) -> list[set[int]]:
    return [set(row.nonzero().flatten().tolist()) for row in z]


def test_sparsify_reads_our_folder(tmp_path, sparsify):
    s = 1.9
    sae, x = make_sae("topk", seed=18), inputs(seed=19)
    path = save_sparsify(sae, tmp_path / "layers.2", input_scale=s, metadata=META)
    assert sorted(os.listdir(path)) == ["cfg.json", "checksums.json", "sae.safetensors"]
    theirs = sparsify.Sae.load_from_disk(path)
    assert (theirs.num_latents, theirs.cfg.k) == (D_SAE, K)
    with torch.no_grad():
        top_acts, top_indices, _ = theirs.encode(x)
        ours = sae.encode(s * x)
        dense = _dense(top_acts, top_indices)
        assert_close(dense, ours, **TOL)
        assert _active_sets(dense) == _active_sets(ours)
        assert_close(theirs.decode(top_acts, top_indices), sae.decode(ours) / s, **TOL)
    again = load(path)  # our reader, format detected
    assert again.cfg.metadata["hook_name"] == META["hook_name"]
    assert_close(again.encode(x), ours, **TOL)


@pytest.mark.parametrize("transcode", [False, True])
def test_we_read_sparsify_folder(transcode, tmp_path, sparsify):
    torch.manual_seed(20)
    cfg = sparsify.SaeConfig(k=K, num_latents=D_SAE, transcode=transcode)
    theirs = sparsify.Sae(D_IN, cfg)
    g = torch.Generator().manual_seed(21)
    with torch.no_grad():
        theirs.encoder.bias.copy_(0.2 * torch.randn(D_SAE, generator=g))
        theirs.b_dec.copy_(0.5 * torch.randn(D_IN, generator=g))
        if transcode:  # sparsify starts transcoder decoders at zero
            theirs.W_dec.copy_(torch.randn(D_SAE, D_IN, generator=g))
    theirs.save_to_disk(tmp_path / "layers.5")
    ours = load_sparsify(tmp_path / "layers.5")
    assert ours.architecture == "topk" and ours.cfg.k == K and not ours.training
    assert ours.cfg.transcode == transcode
    x = inputs(seed=22)
    with torch.no_grad():
        top_acts, top_indices, _ = theirs.encode(x)
        dense = _dense(top_acts, top_indices)
        z = ours.encode(x)
        assert_close(z, dense, **TOL)
        assert _active_sets(z) == _active_sets(dense)
        assert_close(ours.decode(z), theirs.decode(top_acts, top_indices), **TOL)
    assert_close(load(tmp_path / "layers.5").encode(x), z)


def test_sparsify_rejects(tmp_path):
    with pytest.raises(ValueError, match="top-k SAEs and transcoders only.*'jumprelu'"):
        save_sparsify(make_sae("batchtopk"), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    path = save_sparsify(make_sae("topk"), tmp_path / "group")
    _with_cfg(path, activation="groupmax")
    with pytest.raises(ValueError, match="'groupmax' is not supported"):
        load_sparsify(path)


# ------------------------------------------------------------------------------ atomic writes
class _FailingSave:
    """``safetensors.torch.save_file`` that writes the first file, then fails."""

    def __init__(self, real):
        self.real, self.calls = real, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls > 1:
            raise OSError("disk full (simulated)")
        return self.real(*args, **kwargs)


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    failing = _FailingSave(safetensors.torch.save_file)
    monkeypatch.setattr(safetensors.torch, "save_file", failing)
    with pytest.raises(OSError, match="simulated"):
        save_sae(make_sae("topk"), tmp_path / "sae")
    assert failing.calls == 2  # the weights were written before the failure
    assert os.listdir(tmp_path) == []


def test_failed_write_keeps_existing_folder(tmp_path, monkeypatch):
    old = make_sae("jumprelu", seed=23)
    path = save_sae(old, tmp_path / "sae")
    before = {name: (path / name).read_bytes() for name in os.listdir(path)}
    monkeypatch.setattr(safetensors.torch, "save_file", _FailingSave(safetensors.torch.save_file))
    with pytest.raises(OSError, match="simulated"):
        save_sae(make_sae("topk", seed=24), path)
    assert os.listdir(tmp_path) == ["sae"]
    assert {name: (path / name).read_bytes() for name in os.listdir(path)} == before
    monkeypatch.undo()
    # a successful save replaces the folder as a whole
    new = make_sae("topk", seed=24)
    save_sae(new, path)
    assert os.listdir(tmp_path) == ["sae"]
    assert load(path).architecture == "topk"
    assert_close(load(path).encode(inputs()), new.encode(inputs()))


def test_unserialisable_metadata_writes_nothing(tmp_path):
    with pytest.raises(ValueError, match="JSON-serializable"):
        save_sae(make_sae("topk"), tmp_path / "sae", metadata={"bad": torch.ones(2)})
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------ errors
def test_errors(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_sae(missing)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"cfg\.json"):
        load_sae(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="neither"):
        load(tmp_path / "empty")

    path = save_sae(make_sae("relu"), tmp_path / "sae")
    _with_cfg(path, architecture="gated")
    with pytest.raises(ValueError, match="'gated'.*standard, topk, jumprelu"):
        load_sae(path)
    _with_cfg(path, architecture="standard", normalize_activations="layer_norm")
    with pytest.raises(ValueError, match="layer_norm"):
        load_sae(path)
    _with_cfg(path, normalize_activations="none", d_sae=D_SAE + 1)
    with pytest.raises(ValueError, match="d_sae"):
        load_sae(path)

    (tmp_path / "a_file").write_text("")
    with pytest.raises(OSError, match="a_file"):
        save_sae(make_sae("relu"), tmp_path / "a_file" / "sae")
    with pytest.raises(FileExistsError, match="a_file"):
        save_sae(make_sae("relu"), tmp_path / "a_file")
    for bad in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match="input_scale"):
            save_sae(make_sae("relu"), tmp_path / "scaled", input_scale=bad)
