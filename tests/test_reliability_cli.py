"""Reliability of the ``sae`` command and of loading: every bad setting or input is one clean
``error: ...`` line with status 2, found before any work starts; loading never guesses."""

import json
import math

import numpy as np
import pytest
import safetensors.torch as st
import torch

from sae.cli import main
from sae.io import load, load_sae, save_sae
from sae.models import SAE, SAEConfig
from sae.synthetic import planted_features

TRAIN = ["--d-sae", "32", "--k", "3", "--batch-size", "128", "--holdout", "400", "--tokens",
         "1280", "--no-progress"]


@pytest.fixture(scope="module")
def acts(tmp_path_factory):
    X, _ = planted_features(2000, 16, 32, l0=3, seed=0)
    path = tmp_path_factory.mktemp("acts") / "acts.npy"
    np.save(path, X.numpy())
    return path


@pytest.fixture(scope="module")
def run(acts, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    assert main(["train", "--activations", str(acts), "--out", str(out), *TRAIN]) == 0
    return out


def clean_error(capsys, match, argv):
    """``main(argv)`` fails with status 2 and exactly one ``error: ...`` line on stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit, match=match) as err:
        main(argv)
    assert err.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.mark.parametrize("flags, match", [
    (["--d-sae", "0"], "d_sae must be an integer >= 1, got 0"),
    (["--d-sae", "-5"], "d_sae must be an integer >= 1"),
    (["--expansion-factor", "0"], "expansion_factor must be an integer >= 1"),
    (["--batch-size", "0"], "batch_size must be an integer >= 1"),
    (["--holdout", "0"], "holdout must be an integer >= 1"),
    (["--tokens", "0"], "total_tokens must be an integer >= 1"),
    (["--l1-coefficient", "-1"], "l1_coefficient must be a finite number >= 0"),
    (["--l0-coefficient", "nan"], "l0_coefficient must be a finite number >= 0, got nan"),
    (["--aux-coefficient", "nan"], "aux_coefficient must be a finite number"),
    (["--aux-coefficient", "inf"], "aux_coefficient must be a finite number"),
    (["--bandwidth", "0"], "bandwidth must be a finite number > 0"),
    (["--threshold-rate", "2"], "threshold_rate must be a finite number > 0 and <= 1"),
    (["--checkpoint-every", "-1"], "checkpoint_every must be an integer >= 0"),
    (["--eval-every", "-2"], "eval_every must be an integer >= 0"),
    (["--log-every", "0"], "log_every must be an integer >= 1"),
    (["--lr", "nan"], "lr must be a finite number > 0"),
    (["--lr", "-0.001"], "lr must be a finite number > 0"),
    (["--grad-clip", "inf"], "grad_clip must be a finite number >= 0"),
    (["--decay-fraction", "nan"], "decay_fraction must be in"),
    (["--warmup-steps", "-3"], "warmup_steps must be an integer >= 0"),
    (["--divergence-factor", "-1"], "divergence_factor must be a finite number >= 0"),
    (["--arch", "topk,topk"], "--arch lists topk more than once"),
    (["--k", "3,3"], "--k lists 3 more than once"),
    (["--k", "2.5"], "--k takes comma-separated integers"),
    (["--k", "0"], "k must be a positive integer"),
    (["--arch", "gated"], "unknown architecture 'gated'"),
    (["--device", "meta"], "--device meta holds no data"),
    (["--device", "bogus"], "unknown --device 'bogus'"),
    (["--resume", "--force"], "choose one"),
    (["--cache", "somewhere"], "choose one of --activations and --cache"),
    (["--sparsity-warmup-tokens", "-1"], "sparsity_warmup_tokens must be an integer >= 0"),
])
def test_bad_train_flags_fail_before_any_work(acts, tmp_path, capsys, flags, match):
    out = tmp_path / "run"
    clean_error(capsys, match, ["train", "--activations", str(acts), "--out", str(out), *TRAIN,
                                *flags])
    assert not out.exists()  # refused before the run folder was even created


def _npy(tmp_path, name, array):
    path = tmp_path / name
    np.save(path, array)
    return path


@pytest.mark.parametrize("make, match", [
    (lambda p: _npy(p, "int8.npy", np.ones((500, 16), dtype=np.int8)), "must be float16"),
    (lambda p: _npy(p, "complex.npy", np.ones((500, 16), dtype=np.complex64)),
     "must be float16"),
    (lambda p: _npy(p, "flat.npy", np.ones(500, dtype=np.float32)), "must be a 2-D"),
    (lambda p: _npy(p, "empty.npy", np.ones((0, 16), dtype=np.float32)), "are empty"),
    (lambda p: (p / "text.npy").write_text("1,2,3\n4,5,6\n") and p / "text.npy",
     "text.npy is not a .npy file .it lacks the .npy header"),
    (lambda p: (p / "void.npy").write_bytes(b"") or p / "void.npy", "void.npy is an empty file"),
    (lambda p: p, "expected a .npy file, got the directory"),
])
def test_train_and_eval_apply_the_same_input_rules(run, tmp_path, capsys, make, match):
    bad = make(tmp_path)
    clean_error(capsys, match, ["train", "--activations", str(bad), "--out",
                                str(tmp_path / "out"), *TRAIN])
    clean_error(capsys, match, ["eval", str(run), "--activations", str(bad), "--device", "cpu"])


def test_constant_activations_are_refused_in_train_and_eval(run, tmp_path, capsys):
    zeros = _npy(tmp_path, "zeros.npy", np.zeros((2000, 16), dtype=np.float32))
    clean_error(capsys, "do not vary", ["train", "--activations", str(zeros), "--out",
                                        str(tmp_path / "out"), *TRAIN])
    clean_error(capsys, "do not vary.*FVU is undefined",
                ["eval", str(run), "--activations", str(zeros), "--device", "cpu"])


def test_huge_activations_stop_at_once_with_a_clear_error(acts, tmp_path, capsys):
    big = _npy(tmp_path, "big.npy", np.load(acts) * 1e20)
    argv = ["train", "--activations", str(big), "--out", str(tmp_path / "out"), *TRAIN]
    clean_error(capsys, "too large for float32 arithmetic", argv)
    clean_error(capsys, "diverged at step 1 .* loss=", [*argv, "--no-normalize-input"])


@pytest.mark.parametrize("flags, match", [
    (["--batch-size", "0"], "batch_size must be an integer >= 1"),
    (["--k", "0"], "k must be an integer >= 1"),
    (["--device", "meta"], "--device meta"),
    (["--encoder", "omp,lista"], "unknown encoder 'lista'"),
])
def test_bad_eval_flags(run, acts, capsys, flags, match):
    clean_error(capsys, match, ["eval", str(run), "--activations", str(acts), *flags])


# ------------------------------------------------------------------------------ loading
def _saved(tmp_path, arch="topk", **cfg):
    sae = SAE(SAEConfig(d_in=8, d_sae=16, architecture=arch, k=4, **cfg),
              generator=torch.Generator().manual_seed(0))
    return sae, save_sae(sae, tmp_path / arch)


def _edit_cfg(path, drop=(), **changes):
    cfg = json.loads((path / "cfg.json").read_text())
    for key in drop:
        cfg.pop(key)
    cfg.update(changes)
    (path / "cfg.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("drop, changes, match", [
    (["architecture"], {}, r"cfg\.json lacks the required key 'architecture'"),
    (["d_in"], {}, r"cfg\.json lacks the required key 'd_in'"),
    ([], {"d_sae": 16.5}, r"'d_sae' must be a positive integer, got 16\.5"),
    ([], {"k": 7.9}, r"'k' must be a positive integer, got 7\.9"),
    ([], {"k": "4"}, r"'k' must be a positive integer, got '4'"),
    ([], {"k": True}, r"'k' must be a positive integer, got True"),
    ([], {"architecture": "standard"}, "saved from a 'topk' SAE"),
])
def test_cfg_json_is_validated_naming_file_and_key(tmp_path, drop, changes, match):
    _, path = _saved(tmp_path)
    _edit_cfg(path, drop, **changes)
    with pytest.raises(ValueError, match=match) as err:
        load(path)
    assert str(path / "cfg.json") in str(err.value)


def test_empty_cfg_json(tmp_path):
    _, path = _saved(tmp_path)
    (path / "cfg.json").write_text("{}")
    with pytest.raises(ValueError, match="lacks the required key 'd_in'"):
        load(path)


def test_an_integral_float_k_is_read_as_that_integer(tmp_path):
    sae, path = _saved(tmp_path)
    _edit_cfg(path, k=4.0)
    assert load(path).cfg.k == 4


@pytest.mark.parametrize("arch, tensor", [("topk", "W_dec"), ("topk", "b_enc"),
                                          ("jumprelu", "threshold")])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_weights_are_refused_on_load(tmp_path, arch, tensor, value):
    _, path = _saved(tmp_path, arch)
    weights = st.load_file(str(path / "sae_weights.safetensors"))
    weights[tensor].view(-1)[1] = value
    st.save_file(weights, str(path / "sae_weights.safetensors"))
    (path / "checksums.json").unlink()  # as a folder another tool wrote: no checksum to catch it
    with pytest.raises(ValueError, match=f"sae_weights.safetensors: {tensor} holds 1 non-finite"):
        load(path)


def test_truncated_weights_name_the_file(tmp_path):
    _, path = _saved(tmp_path)
    weights = path / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    (path / "checksums.json").unlink()
    with pytest.raises(ValueError, match="sae_weights.safetensors is not a readable safetensors"):
        load_sae(path)


def test_non_finite_weights_are_never_saved(tmp_path):
    sae = SAE(SAEConfig(d_in=8, d_sae=16, k=4))
    with torch.no_grad():
        sae.W_enc[0, 0] = float("nan")
    with pytest.raises(ValueError, match="refusing to save.*W_enc holds 1 non-finite"):
        save_sae(sae, tmp_path / "nan")
    assert not (tmp_path / "nan").exists()


def test_eval_of_a_broken_folder_is_a_clean_error(run, acts, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(run / "topk", broken)
    _edit_cfg(broken, k=2.5)
    clean_error(capsys, "'k' must be a positive integer",
                ["eval", str(broken), "--activations", str(acts), "--device", "cpu"])


# ------------------------------------------------------------------------------ folder checksums
def _flip_bytes(path, n=4):
    """Flip the lowest bit of ``n`` bytes near the end of ``path`` (tensor data: the weights
    stay finite and readable, only wrong)."""
    data = bytearray(path.read_bytes())
    for i in range(len(data) - 40, len(data) - 40 + n):
        data[i] ^= 1
    path.write_bytes(bytes(data))


def _save(kind, folder):
    """A folder of each layout that records checksums, and its weights file."""
    from sae.io import save_sparsify

    if kind == "crosscoder":
        sae = SAE(SAEConfig(d_in=12, d_sae=16, k=4, places=[4, 8]),
                  generator=torch.Generator().manual_seed(0))
        return sae, save_sae(sae, folder), "sae_weights.safetensors"
    sae = SAE(SAEConfig(d_in=8, d_sae=16, architecture="topk", k=4),
              generator=torch.Generator().manual_seed(0))
    if kind == "sparsify":
        return sae, save_sparsify(sae, folder), "sae.safetensors"
    if kind == "sparsity":
        sae.fire_rate.fill_(0.25)
        return sae, save_sae(sae, folder), "sparsity.safetensors"
    return sae, save_sae(sae, folder), "sae_weights.safetensors"


KINDS = ["saelens", "sparsity", "sparsify", "crosscoder"]


@pytest.mark.parametrize("kind", KINDS)
def test_damaged_weights_are_refused_naming_the_file(tmp_path, kind):
    _, path, name = _save(kind, tmp_path / kind)
    _flip_bytes(path / name)
    with pytest.raises(ValueError, match="does not match its checksum") as err:
        load(path)
    assert str(path / name) in str(err.value) and "checksums.json" in str(err.value)


@pytest.mark.parametrize("kind", KINDS)
def test_an_unchanged_folder_loads_verified(tmp_path, kind):
    sae, path, name = _save(kind, tmp_path / kind)
    sums = json.loads((path / "checksums.json").read_text())["sha256"]
    assert name in sums and "cfg.json" not in sums  # cfg.json may be edited by hand
    x = torch.randn(5, sae.cfg.d_in, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(load(path).encode(x), sae.encode(x), atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_a_folder_without_checksums_still_loads(tmp_path, kind):
    sae, path, _ = _save(kind, tmp_path / kind)
    (path / "checksums.json").unlink()  # as saved before checksums, or by SAELens / sparsify
    x = torch.randn(5, sae.cfg.d_in, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(load(path).encode(x), sae.encode(x), atol=1e-6)


@pytest.mark.parametrize("text, match", [
    ("{not json", "checksums.json is damaged"),
    ('{"sha256": ["sae_weights.safetensors"]}', "checksums.json is damaged"),
    ('{"sha256": {"gone.safetensors": "00"}}', "gone.safetensors is listed in .* but missing"),
])
def test_a_damaged_checksums_file_is_named(tmp_path, text, match):
    _, path, _ = _save("saelens", tmp_path / "sae")
    (path / "checksums.json").write_text(text)
    with pytest.raises(ValueError, match=match):
        load(path)


def test_eval_of_a_corrupted_folder_is_a_clean_error(run, acts, tmp_path, capsys):
    import shutil

    broken = tmp_path / "flipped"
    shutil.copytree(run / "topk", broken)
    _flip_bytes(broken / "sae_weights.safetensors")
    clean_error(capsys, "sae_weights.safetensors does not match its checksum",
                ["eval", str(broken), "--activations", str(acts), "--device", "cpu"])


def test_crosscoder_folders_refuse_non_finite_weights_and_a_fractional_k(tmp_path):
    _, path, name = _save("crosscoder", tmp_path / "cc")
    (path / "checksums.json").unlink()
    weights = st.load_file(str(path / name))
    weights["W_dec.1"].view(-1)[0] = math.nan
    st.save_file(weights, str(path / name))
    with pytest.raises(ValueError, match=r"sae_weights\.safetensors: W_dec\.1 holds 1 non-finite"):
        load(path)
    _, path, _ = _save("crosscoder", tmp_path / "cc2")
    _edit_cfg(path, k=7.9)
    with pytest.raises(ValueError, match=r"'k' must be a positive integer, got 7\.9"):
        load(path)
