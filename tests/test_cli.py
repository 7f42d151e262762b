"""The `sae` command: train / eval on stored activations, bad input, resume, real-model default."""

import json

import numpy as np
import pytest
import torch

from sae.cli import main
from sae.io import load
from sae.synthetic import planted_features


@pytest.fixture(scope="module")
def acts(tmp_path_factory):
    X, _ = planted_features(12_000, 16, 32, l0=3, seed=0)
    path = tmp_path_factory.mktemp("acts") / "acts.npy"
    np.save(path, X.numpy())
    return path


def _train(acts, out, *extra):
    return main(
        [
            "train",
            "--activations",
            str(acts),
            "--d-sae",
            "64",
            "--k",
            "3",
            "--batch-size",
            "256",
            "--tokens",
            "20000",
            "--holdout",
            "1000",
            "--out",
            str(out),
            "--no-progress",
            *extra,
        ]
    )


def test_train_then_eval(acts, tmp_path, capsys):
    assert _train(acts, tmp_path / "run", "--arch", "topk,batchtopk") == 0
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(summary) == {"topk", "batchtopk"}
    for m in summary.values():
        assert {"tokens_per_s", "fvu", "l0", "dead_fraction"} <= set(m)
        assert m["fvu"] < 0.8 and m["l0"] == pytest.approx(3, rel=0.3)
    assert not (tmp_path / "run" / "checkpoint").exists()
    sae = load(tmp_path / "run" / "topk")
    assert sae.cfg.k == 3 and sae.cfg.d_sae == 64
    capsys.readouterr()
    assert (
        main(
            ["eval", str(tmp_path / "run"), "--activations", str(acts), "--json", "--device", "cpu"]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"topk", "batchtopk"}
    # the same SAE on the same activations: eval's figure equals a direct computation
    from sae.metrics import evaluate

    X = torch.from_numpy(np.load(acts))
    assert out["topk"]["fvu"] == pytest.approx(evaluate(sae, X)["fvu"], rel=1e-6)


def test_resume_from_a_checkpoint_reproduces_the_run(acts, tmp_path, capsys):
    assert _train(acts, tmp_path / "a") == 0
    out = tmp_path / "b"
    assert _train(acts, out, "--checkpoint-every", "10", "--keep-checkpoint") == 0
    state = json.loads((out / "checkpoint" / "trainer.json").read_text())
    assert state["step"] == 70  # the last multiple of 10 of the 78 steps
    assert _train(acts, out, "--resume") == 0
    assert "resumed from" in capsys.readouterr().out
    a, b = load(tmp_path / "a" / "topk"), load(out / "topk")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    with pytest.raises(SystemExit, match="no checkpoint"):
        _train(acts, tmp_path / "fresh", "--resume")


@pytest.mark.parametrize(
    "args, match",
    [
        (["--arch", "gated"], "unknown architecture 'gated'; known architectures: relu, topk"),
        (["--k", "100"], "k=100 is larger than d_sae=64"),
    ],
)
def test_train_bad_arguments(acts, tmp_path, args, match):
    with pytest.raises(SystemExit, match=match):
        _train(acts, tmp_path / "run", *args)


def test_train_rejects_nan_and_missing_file(tmp_path):
    X = np.random.default_rng(0).standard_normal((3000, 8)).astype(np.float32)
    X[1234, 5] = np.nan
    np.save(tmp_path / "bad.npy", X)
    with pytest.raises(SystemExit, match="row 1234, column 5") as err:
        main(
            [
                "train",
                "--activations",
                str(tmp_path / "bad.npy"),
                "--d-sae",
                "16",
                "--k",
                "2",
                "--tokens",
                "2000",
                "--batch-size",
                "100",
                "--out",
                str(tmp_path / "r"),
                "--no-progress",
            ]
        )
    assert err.value.code == 2  # a user error: one "error: ..." line, status 2
    with pytest.raises(SystemExit, match="activations file not found"):
        main(["train", "--activations", str(tmp_path / "nope.npy"), "--out", str(tmp_path)])


def test_unwritable_output(acts, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit, match="cannot write to output directory"):
        _train(acts, blocker / "run")


def test_eval_wrong_width(acts, tmp_path):
    assert _train(acts, tmp_path / "run") == 0
    np.save(tmp_path / "wide.npy", np.zeros((100, 20), dtype=np.float32))
    with pytest.raises(SystemExit, match="d_in=20 but SAE .* expects d_in=16"):
        main(["eval", str(tmp_path / "run"), "--activations", str(tmp_path / "wide.npy")])


def test_eval_suite_on_stored_activations(acts, tmp_path, capsys):
    from sae.metrics import evaluate

    assert _train(acts, tmp_path / "run") == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "--activations", str(acts), "--suite",
                 "core,absorption", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "topk absorption: skipped: does not apply: it runs the language model" in printed
    core = json.loads((tmp_path / "run/topk/eval_results/core/run_topk_eval_results.json")
                      .read_text())
    fvu = evaluate(load(tmp_path / "run" / "topk"), torch.from_numpy(np.load(acts)))["fvu"]
    assert core["eval_result_metrics"]["reconstruction_quality"]["fvu"] == pytest.approx(fvu)
    np.save(tmp_path / "wide.npy", np.zeros((100, 20), dtype=np.float32))
    with pytest.raises(SystemExit, match="d_in=20 but SAE .*topk expects d_in=16"):
        main(["eval", str(tmp_path / "run"), "--activations", str(tmp_path / "wide.npy"),
              "--suite", "core"])


@pytest.mark.slow
def test_default_train_on_smollm2_gives_a_loadable_sae(tmp_path):
    pytest.importorskip("transformers")
    from sparsecode.text import builtin_texts

    (tmp_path / "text.txt").write_text("\n\n".join(builtin_texts()[:12]))
    out = tmp_path / "run"
    # every default (model, hook point, architecture, k) but a small text, width and run
    assert (
        main(
            [
                "train",
                "--text",
                str(tmp_path / "text.txt"),
                "--d-sae",
                "1152",
                "--tokens",
                "20000",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    sae = load(out / "topk")
    meta = sae.cfg.metadata
    assert (meta["model_name"], meta["hook_name"], sae.cfg.k) == ("smollm2", "model.layers.15", 32)
    assert sae.cfg.d_in == 576
    sae_lens = pytest.importorskip("sae_lens")
    theirs = sae_lens.SAE.load_from_disk(str(out / "topk"))
    x = torch.randn(8, 576) * 50
    torch.testing.assert_close(theirs.decode(theirs.encode(x)), sae(x), rtol=1e-4, atol=1e-3)


def test_cache_then_train_from_cache(tiny_model_and_texts, tmp_path):
    from sae.cache import CachedActivations, read_manifest

    model_dir, texts = tiny_model_and_texts
    cache = tmp_path / "cache"
    common = ["--model", str(model_dir), "--text", str(texts), "--context-size", "16",
              "--device", "cpu", "--no-progress"]
    assert main(["cache", *common, "--hookpoint", "model.layers.1", "--tokens", "1200",
                 "--shard-tokens", "256", "--out", str(cache)]) == 0
    manifest = read_manifest(cache)
    assert manifest["complete"] and manifest["hookpoints"] == ["model.layers.1"]
    rows = sum(s["rows"] for s in manifest["shards"])
    assert rows >= 1200
    # the cached rows are the model's activations: compare with a direct forward
    from sparsecode import lm, text

    model, tok = lm.load_model(str(model_dir))
    toks = text.pack_tokens(tok, text.load_texts(str(texts)), context_size=16)
    with torch.no_grad():
        ref = model(toks, output_hidden_states=True).hidden_states[2][:, 1:].reshape(-1, 32)
    cached = next(iter(CachedActivations(cache, batch_size=64, shuffle=False)))["model.layers.1"]
    dist = torch.cdist(cached, ref).min(dim=1).values
    assert dist.max() < 1e-4  # every cached row is one of the model's rows

    out = tmp_path / "run"
    assert main(["train", "--cache", str(cache), "--d-sae", "64", "--k", "4",
                 "--batch-size", "128", "--tokens", "2000", "--holdout", "128",
                 "--out", str(out), "--no-progress"]) == 0
    sae = load(out / "topk")
    assert sae.cfg.metadata["hook_name"] == "model.layers.1" and sae.cfg.d_in == 32


def test_live_training_on_a_local_model(tiny_model_and_texts, tmp_path, capsys):
    model_dir, texts = tiny_model_and_texts
    out = tmp_path / "run"
    assert main(["train", "--model", str(model_dir), "--text", str(texts), "--context-size", "16",
                 "--d-sae", "64", "--k", "4", "--batch-size", "128", "--tokens", "3000",
                 "--holdout", "256", "--device", "cpu", "--out", str(out), "--no-progress"]) == 0
    sae = load(out / "topk")
    assert sae.cfg.metadata["hook_name"] == "model.layers.1"  # middle of 3 layers
    capsys.readouterr()
    assert main(["eval", str(out), "--json", "--device", "cpu", "--no-progress"]) == 0
    m = json.loads(capsys.readouterr().out)["topk"]
    assert 0 <= m["fraction_spliced"] <= 1 and m["n_tokens"] > 0
    assert {"ce_loss_recovered", "delta_lm_loss", "kl_sae"} <= set(m)


def test_eval_suite_writes_sae_bench_files_and_skips_what_does_not_apply(
        tiny_model_and_texts, tmp_path, capsys):
    model_dir, texts = tiny_model_and_texts
    out = tmp_path / "run"
    assert main(["train", "--model", str(model_dir), "--text", str(texts), "--context-size", "16",
                 "--d-sae", "64", "--k", "4", "--batch-size", "128", "--tokens", "2000",
                 "--holdout", "256", "--device", "cpu", "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--suite", "all", "--device", "cpu", "--no-progress",
                 "--probe-tokens", "1500"]) == 0
    printed = capsys.readouterr().out
    assert "topk absorption: skipped: does not apply: the tokenizer has only" in printed
    assert "topk synthetic: skipped: does not apply: it needs --synthetic" in printed
    core = json.loads((out / "topk/eval_results/core/run_topk_eval_results.json").read_text())
    assert core["eval_type_id"] == "core" and core["sae_cfg_dict"]["d_sae"] == 64
    perf = core["eval_result_metrics"]["model_performance_preservation"]
    assert set(perf) >= {"ce_loss_score", "ce_loss_with_sae", "ce_loss_without_sae"}
    probing = json.loads(
        (out / "topk/eval_results/sparse_probing/run_topk_eval_results.json").read_text())
    names = {d["dataset_name"] for d in probing["eval_result_details"]}
    assert names == {"document:pydoc_topic", "document:package"}  # "w17"-words: one class only
    assert 0 <= probing["eval_result_metrics"]["sae"]["sae_top_1_test_accuracy"] <= 1
    assert not (out / "topk/eval_results/absorption_first_letter").exists()
    with pytest.raises(SystemExit, match="unknown eval"):
        main(["eval", str(tmp_path / "nothing-here"), "--suite", "core,absorb"])


def test_eval_suite_on_a_transcoder_reads_its_input_and_probes(tiny_model_and_texts, tmp_path,
                                                              capsys):
    model_dir, texts = tiny_model_and_texts
    out = tmp_path / "tc"
    assert main(["train", "--model", str(model_dir), "--text", str(texts), "--context-size", "16",
                 "--transcode", "model.layers.1.mlp", "--d-sae", "64", "--k", "4",
                 "--batch-size", "128", "--tokens", "2000", "--holdout", "256", "--device", "cpu",
                 "--out", str(out), "--no-progress"]) == 0
    assert main(["eval", str(out), "--suite", "core,probing", "--device", "cpu",
                 "--no-progress", "--encoder", "trained,omp"]) == 0
    assert "topk-omp: skipped: does not apply: the 'omp' encoder" in capsys.readouterr().out
    core = json.loads((out / "topk/eval_results/core/tc_topk_eval_results.json").read_text())
    assert 0 < core["eval_result_metrics"]["sparsity"]["l0"] <= 4
    assert core["sae_cfg_dict"]["metadata"]["hook_name"] == "model.layers.1.mlp:input"
    probing = out / "topk/eval_results/sparse_probing/tc_topk_eval_results.json"
    assert json.loads(probing.read_text())["eval_result_details"]


def test_every_config_field_is_a_train_flag_with_the_config_default():
    """``sae train``'s flags are generated from the config dataclasses: every setting a library
    user has can be set, and an untouched flag gives the dataclass default."""
    import dataclasses

    from sae.cli import build_parser
    from sae.config import RunConfig, SAEConfig, TrainConfig
    from sparsecode.lm import ModelConfig

    args = build_parser().parse_args(["train"])
    for cls in (SAEConfig, TrainConfig, RunConfig, ModelConfig):
        for f in dataclasses.fields(cls):
            if f.metadata.get("cli") is False:
                continue
            assert hasattr(args, f.name), f"{cls.__name__}.{f.name} has no flag"
            got = getattr(args, f.name)
            want = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            assert got == want or str(got) == str(want), (cls.__name__, f.name, got, want)
    args = build_parser().parse_args(["train", "--arch", "jumprelu", "--l0-coefficient", "3",
                                      "--group-sizes", "4,12", "--no-normalize-input"])
    assert (args.architecture, args.l0_coefficient, args.group_sizes) == ("jumprelu", 3.0, [4, 12])
    assert args.normalize_input is False


def test_eval_with_pursuit_encoders_reports_the_amortisation_gap(acts, tmp_path, capsys):
    """`sae eval --encoder omp,mp`: each pursuit at the trained encoder's mean L0, its FVU and
    its support agreement with the trained encoder as computed directly; an unknown encoder is
    named with the known ones."""
    import warnings

    from sae.encoders import Encoded
    from sae.metrics import evaluate, support_jaccard

    assert _train(acts, tmp_path / "run", "--arch", "topk", "--matmul-dtype", "float32") == 0
    capsys.readouterr()
    args = ["eval", str(tmp_path / "run"), "--activations", str(acts), "--json", "--device",
            "cpu", "--max-tokens", "2000"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # saved decoder rows carry the input scale
        assert main([*args, "--encoder", "trained,omp,mp"]) == 0
    out = json.loads(capsys.readouterr().out)["topk"]
    assert set(out) == {"trained", "omp", "mp"}
    assert out["omp"]["k"] == round(out["trained"]["l0"]) == 3
    assert out["omp"]["l0"] == pytest.approx(3.0)
    for name in ("omp", "mp"):
        assert 0.0 <= out[name]["support_jaccard"] <= 1.0
    # the same numbers computed directly
    sae = load(tmp_path / "run" / "topk")
    X = torch.from_numpy(np.load(acts)[:2000])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        view = Encoded(sae, "omp", k=3)
        assert out["omp"]["fvu"] == pytest.approx(evaluate(view, X)["fvu"], rel=1e-6)
        assert out["omp"]["support_jaccard"] == pytest.approx(support_jaccard(sae, view, X))
    with pytest.raises(SystemExit, match="unknown encoder 'lista'; known encoders"):
        main([*args, "--encoder", "omp,lista"])


def test_train_and_eval_a_skip_transcoder_and_a_crosscoder(tiny_model_and_texts, tmp_path,
                                                           capsys):
    sae_lens = pytest.importorskip("sae_lens")
    model_dir, texts = tiny_model_and_texts
    common = ["--model", str(model_dir), "--text", str(texts), "--context-size", "16",
              "--device", "cpu", "--no-progress"]
    train = [*common, "--d-sae", "64", "--k", "4", "--batch-size", "128", "--tokens", "2000",
             "--holdout", "256"]
    tc = tmp_path / "tc"
    assert main(["train", *train, "--transcode", "model.layers.1.mlp", "--skip",
                 "--arch", "topk,jumprelu", "--out", str(tc)]) == 0
    sae = load(tc / "jumprelu")
    assert sae.cfg.transcode and sae.cfg.skip
    assert sae.cfg.metadata["hook_name"] == "model.layers.1.mlp:input"
    assert sae.cfg.metadata["hook_name_out"] == "model.layers.1.mlp"
    theirs = sae_lens.SAE.load_from_disk(str(tc / "jumprelu"))
    assert theirs.cfg.architecture() == "jumprelu_skip_transcoder"
    x = torch.randn(5, 32)
    torch.testing.assert_close(theirs(x), sae(x), rtol=1e-4, atol=1e-4)
    cc = tmp_path / "cc"
    assert main(["train", *train, "--crosscode", "model.layers.{0,2}", "--out", str(cc)]) == 0
    cross = load(cc / "topk")
    assert cross.cfg.places == [32, 32]
    assert cross.cfg.metadata["hook_names"] == ["model.layers.0", "model.layers.2"]
    capsys.readouterr()
    for run in (tc, cc):
        assert main(["eval", str(run), "--json", "--device", "cpu", "--no-progress"]) == 0
        results = json.loads(capsys.readouterr().out)
        for m in results.values():
            assert m["ce_zero"] != m["ce_clean"] and 0 < m["fvu"] < 2
    assert results["topk"]["writes"] == ["model.layers.0", "model.layers.2"]
    assert {"fvu_place0", "fvu_place1"} <= set(results["topk"])
    # the feature browsers read what each dictionary reads; a crosscoder's shows where it writes
    from sae.browser import read_browser_data

    for run in (tc, cc):
        page = tmp_path / f"{run.name}.html"
        assert main(["browse", str(run / "topk"), "--text", str(texts), "--tokens", "64",
                     "--n-latents", "4", "--out", str(page), "--device", "cpu",
                     "--no-progress"]) == 0
        data = read_browser_data(page)
        assert data["latents"]
    assert data["meta"]["places"] == ["model.layers.0", "model.layers.2"]
    W = cross.W_dec.detach()
    for entry in data["latents"]:
        want = [float(W[entry["id"], :32].norm()), float(W[entry["id"], 32:].norm())]
        assert entry["place_norms"] == pytest.approx(want, rel=1e-3)


@pytest.mark.parametrize("args, match", [
    (["--transcode", "model.layers.1.mpl"], "close matches: 'model.layers.1.mlp'"),
    (["--transcode", "model.layers"], "'model.layers' \\(ModuleList\\) does not run"),
    (["--transcode", "model.layers.1.mlp", "--crosscode", "model.layers.*"], "choose one of"),
    (["--hookpoint-in", "model.layers.0"], "go together"),
    (["--crosscode", "model.layers.1"], "two or more places"),
    (["--arch", "mp", "--transcode", "model.layers.1.mlp"], "cannot transcode"),
])
def test_bad_places(tiny_model_and_texts, tmp_path, args, match):
    model_dir, texts = tiny_model_and_texts
    with pytest.raises(SystemExit, match=match):
        main(["train", "--model", str(model_dir), "--text", str(texts), "--context-size", "16",
              "--device", "cpu", "--no-progress", "--d-sae", "64", "--k", "4", "--tokens",
              "500", "--out", str(tmp_path / "bad"), *args])


def test_cache_a_transcoder_then_train_it_from_the_cache(tiny_model_and_texts, tmp_path):
    from sae.cache import read_manifest

    model_dir, texts = tiny_model_and_texts
    cache = tmp_path / "cache"
    assert main(["cache", "--model", str(model_dir), "--text", str(texts), "--context-size",
                 "16", "--device", "cpu", "--no-progress", "--transcode", "model.layers.1.mlp",
                 "--tokens", "1200", "--shard-tokens", "256", "--out", str(cache)]) == 0
    assert read_manifest(cache)["hookpoints"] == ["model.layers.1.mlp:input",
                                                  "model.layers.1.mlp"]
    out = tmp_path / "run"
    assert main(["train", "--cache", str(cache), "--transcode", "model.layers.1.mlp",
                 "--d-sae", "64", "--k", "4", "--batch-size", "128", "--tokens", "1000",
                 "--holdout", "128", "--out", str(out), "--no-progress"]) == 0
    tc = load(out / "topk")
    assert tc.cfg.transcode and tc.cfg.metadata["hook_name_out"] == "model.layers.1.mlp"
