"""sae.browser: the HTML feature browser (checked against brute force); sae.plot: L0-FVU."""

import json
import re

import pytest
import torch
from conftest import TINY_SPECIAL_WORDS

from sae.browser import feature_browser, read_browser_data, select_latents
from sae.cli import main
from sae.io import find_sae_folders, save_sae
from sae.models import SAE, SAEConfig
from sae.plot import metric_plot, metric_points

pytest.importorskip("transformers")

HOOK = "model.layers.1"
N_CTX, CTX = 12, 16
SCRIPT = TINY_SPECIAL_WORDS[0]


def make_tokens(seed=0):
    t = torch.randint(3, 128, (N_CTX, CTX), generator=torch.Generator().manual_seed(seed))
    t[:, 0] = 1  # BOS
    t[:, 3] = 3  # the "<script>...</script>" token in every context
    return t


def make_sae(arch="topk", d_sae=64, k=8):
    gen = torch.Generator().manual_seed(1)
    sae = SAE(SAEConfig(d_in=32, d_sae=d_sae, architecture=arch, k=k), generator=gen)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.02, generator=gen)
    return sae.eval()


def brute_latents(model, sae, tokens):
    """Dense latents (n_ctx, ctx, d_sae) over all positions, position 0 zeroed."""
    with torch.no_grad():
        hs = model(tokens, output_hidden_states=True).hidden_states
        z = sae.encode(hs[2])  # output of model.layers.1
    z[:, 0] = 0
    return z


@pytest.fixture(scope="module")
def page(tiny_llama, tiny_tokenizer, tmp_path_factory):
    tokens = make_tokens()
    sae = make_sae()
    z = brute_latents(tiny_llama, sae, tokens)
    counts = (z != 0).sum(dim=(0, 1))
    # three latents: the most frequent, a middle one and the rarest that fires
    order = [int(j) for j in torch.argsort(counts, descending=True) if counts[j] > 0]
    chosen = [order[0], order[len(order) // 2], order[-1]]
    out = tmp_path_factory.mktemp("browser") / "page.html"
    path = feature_browser(
        tiny_llama,
        tiny_tokenizer,
        sae,
        HOOK,
        tokens,
        latents=chosen,
        top_contexts=5,
        window=(3, 2),
        batch_contexts=5,  # 12 contexts: batches of 5, 5, 2 exercise the streaming merge
        out=out,
    )
    return {"path": path, "data": read_browser_data(path), "z": z, "tokens": tokens,
            "sae": sae, "chosen": chosen}


def test_top_contexts_match_brute_force(page):
    z, tokens, data = page["z"], page["tokens"], page["data"]
    assert [entry["id"] for entry in data["latents"]] == page["chosen"]
    for entry in data["latents"]:
        j = entry["id"]
        flat = z[..., j].flatten()
        order = torch.argsort(flat, descending=True)
        want = [(int(i) // CTX, int(i) % CTX) for i in order[:5] if flat[i] > 0]
        got = [(c["c"], c["p"]) for c in entry["contexts"]]
        assert got == want
        for c in entry["contexts"]:
            lo, hi = max(0, c["p"] - 3), min(CTX, c["p"] + 3)
            assert c["start"] == lo
            assert c["t"] == tokens[c["c"], lo:hi].tolist()
            torch.testing.assert_close(
                torch.tensor(c["a"]), z[c["c"], lo:hi, j], rtol=1e-3, atol=1e-6
            )
            assert c["act"] == pytest.approx(float(z[c["c"], c["p"], j]), rel=1e-3)
        assert entry["max"] == pytest.approx(float(flat.max()), rel=1e-3)


def test_density_and_histogram_match_brute_force(page):
    z, data = page["z"], page["data"]
    meta = data["meta"]
    assert meta["n_positions"] == N_CTX * (CTX - 1)
    assert meta["n_excluded_bos"] == N_CTX and meta["n_excluded_massive"] == 0
    dens = (z[:, 1:] != 0).double().mean(dim=(0, 1))
    assert meta["n_dead"] == int((dens == 0).sum())
    assert meta["n_dense"] == int((dens > 0.1).sum())
    assert sum(data["density_hist"]["counts"]) == int((dens > 0).sum())
    for entry in data["latents"]:
        j = entry["id"]
        assert entry["density"] == pytest.approx(float(dens[j]), abs=1e-12)
        assert entry["count"] == int((z[..., j] != 0).sum())
        assert sum(entry["hist"]["counts"]) == entry["count"]
        active = z[..., j][z[..., j] != 0]
        assert entry["mean"] == pytest.approx(float(active.mean()), rel=1e-3)
        lo = entry["hist"]["lo"]  # the first bin holds the smallest activation
        assert 10**lo <= float(active.min()) < 10 ** (lo + entry["hist"]["step"])


def test_logit_effects_apply_final_norm_weight(tiny_llama, tiny_tokenizer, tmp_path):
    import copy

    model = copy.deepcopy(tiny_llama)
    with torch.no_grad():
        model.model.norm.weight.uniform_(0.2, 3.0, generator=torch.Generator().manual_seed(2))
    sae = make_sae()
    out = feature_browser(
        model, tiny_tokenizer, sae, HOOK, make_tokens(), latents=[0, 5], out=tmp_path / "p.html"
    )
    data = read_browser_data(out)
    assert "model.norm" in data["meta"]["logit_note"]
    for entry in data["latents"]:
        with torch.no_grad():
            eff = (sae.W_dec[entry["id"]] * model.model.norm.weight) @ model.lm_head.weight.T
        assert [i for i, _ in entry["logits"]["pos"]] == eff.topk(10).indices.tolist()
        assert [i for i, _ in entry["logits"]["neg"]] == (-eff).topk(10).indices.tolist()
        assert entry["logits"]["pos"][0][1] == pytest.approx(float(eff.max()), rel=1e-3)


def test_token_text_is_escaped(page):
    raw = page["path"].read_text(encoding="utf-8")
    assert "<script>alert" not in raw and "onerror=" not in raw
    assert raw.count("<script") == 2  # the JSON data element and the page's own script
    assert "\\u003cscript\\u003ealert(1)\\u003c/script\\u003e" in raw
    data = page["data"]
    assert data["vocab"]["3"] == SCRIPT  # decodes back to the exact token text
    assert any(3 in c["t"] for e in data["latents"] for c in e["contexts"])
    assert "http://" not in raw.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in raw


def test_massive_positions_never_shown(tiny_llama, tiny_tokenizer, tmp_path):
    tokens = make_tokens()
    layer = tiny_llama.model.layers[1]

    def blow_up(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        h = h.clone()
        h[2, 5] *= 1000.0
        return (h, *output[1:]) if isinstance(output, tuple) else h

    handle = layer.register_forward_hook(blow_up)
    try:
        sae = make_sae()
        out = feature_browser(
            tiny_llama, tiny_tokenizer, sae, HOOK, tokens, latents=list(range(64)),
            top_contexts=20, batch_contexts=N_CTX, out=tmp_path / "m.html",
        )
    finally:
        handle.remove()
    data = read_browser_data(out)
    assert data["meta"]["n_excluded_massive"] == 1
    assert data["meta"]["n_positions"] == N_CTX * (CTX - 1) - 1
    shown = {(c["c"], c["p"]) for e in data["latents"] for c in e["contexts"]}
    assert (2, 5) not in shown and len(shown) > 50
    assert "massive-norm" in out.read_text()


def test_default_selection(tiny_llama, tiny_tokenizer, tmp_path):
    tokens = make_tokens()
    sae = make_sae(d_sae=256, k=4)
    out = feature_browser(
        tiny_llama, tiny_tokenizer, sae, HOOK, tokens, n_latents=8, out=tmp_path / "d.html"
    )
    data = read_browser_data(out)
    z = brute_latents(tiny_llama, sae, tokens)
    dens = (z[:, 1:] != 0).double().mean(dim=(0, 1))
    ids = [e["id"] for e in data["latents"]]
    assert ids == select_latents(dens, 8)
    assert len(ids) == 8 and all(0 < dens[j] <= 0.1 for j in ids)
    ranked = sorted(float(d) for d in dens if 0 < d <= 0.1)[::-1]
    assert [float(dens[j]) for j in ids[:4]] == ranked[:4]  # the most frequent half
    assert float(dens[ids[-1]]) == ranked[-1]  # the spread reaches the rarest latent
    assert meta_ok(data["meta"], dens)


def test_eval_notes_are_shown_with_their_latents(tiny_llama, tiny_tokenizer, tmp_path):
    from sae.evals.suite import latent_notes, write_result

    folder = tmp_path / "run" / "topk"
    write_sae_folder(folder, "topk", 4.0, 0.2)
    details = [{"first_letter": "a", "mean_absorption_fraction": 0.25, "main_latents": [3, 200]}]
    write_result(folder, "topk", "absorption", {"metrics": {"mean": {}}, "details": details,
                                                "unstructured": {"absorbers": {"7": {"a": 2}}}},
                 1.0)
    notes = latent_notes(folder)
    assert notes[3] == ["main latent of first letter 'a' (absorption fraction 0.25, split over "
                        "2 latents)"]
    assert notes[7] == ["absorbs first letter 'a' on 2 words"]
    sae = make_sae(d_sae=256, k=4)
    out = feature_browser(tiny_llama, tiny_tokenizer, sae, HOOK, make_tokens(), n_latents=4,
                          notes=notes, out=tmp_path / "n.html")
    entries = {e["id"]: e for e in read_browser_data(out)["latents"]}
    assert {3, 7, 200} <= set(entries) and len(entries) <= 7  # noted latents always shown
    assert entries[7]["notes"] == notes[7]
    assert latent_notes(tmp_path) == {}


def meta_ok(meta, dens):
    return meta["n_dead"] == int((dens == 0).sum()) and "most frequent half" in meta["selection"]


def test_select_latents_small_cases():
    d = torch.tensor([0.0, 0.5, 0.05, 0.02])
    assert select_latents(d, 10) == [2, 3]
    with pytest.raises(ValueError, match="n_latents"):
        select_latents(d, 0)


def test_bad_arguments(tiny_llama, tiny_tokenizer, tmp_path):
    sae = make_sae()
    with pytest.raises(ValueError, match="latents must be indices"):
        feature_browser(tiny_llama, tiny_tokenizer, sae, HOOK, make_tokens(), latents=[64])
    with pytest.raises(ValueError, match="2-D integer"):
        feature_browser(tiny_llama, tiny_tokenizer, sae, HOOK, make_tokens().float())
    with pytest.raises(ValueError, match="names 3 modules"):
        feature_browser(tiny_llama, tiny_tokenizer, sae, "model.layers.*", make_tokens())
    with pytest.raises(ValueError, match="feature-browser data"):
        (tmp_path / "x.html").write_text("<html></html>")
        read_browser_data(tmp_path / "x.html")


# ------------------------------------------------------------------ L0 vs FVU


def write_sae_folder(folder, arch, l0, fvu):
    folder.mkdir(parents=True)
    meta = {"hook_name": HOOK, "sparsecode": {"architecture": arch}}
    (folder / "cfg.json").write_text(json.dumps({"architecture": "topk", "metadata": meta}))
    (folder / "metrics.json").write_text(json.dumps({"l0": l0, "fvu": fvu, "dead_fraction": 0}))


def test_metric_plot(tmp_path):
    from PIL import Image

    write_sae_folder(tmp_path / "run1" / "topk-k8", "topk", 8.0, 0.3)
    write_sae_folder(tmp_path / "run1" / "topk-k32", "topk", 32.0, 0.15)
    (tmp_path / "run1" / "metrics.json").write_text("{}")  # the run summary is not a point
    write_sae_folder(tmp_path / "run2" / "relu", "relu", 50.0, 0.2)
    single = tmp_path / "run3" / "jr"
    write_sae_folder(single, "jumprelu", 20.0, 0.18)
    runs = [tmp_path / "run1", tmp_path / "run2", single]
    points = metric_points(runs)
    assert [p["label"] for p in points] == ["run1/topk-k32", "run1/topk-k8", "run2/relu", "run3/jr"]
    assert [p["architecture"] for p in points] == ["topk", "topk", "relu", "jumprelu"]
    out = metric_plot(runs, tmp_path / "plots" / "l0_fvu.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out) as im:
        assert im.size[0] > 300 and im.size[1] > 200
        plotted = json.loads(im.text["Description"])
    assert len(plotted) == 4
    assert {(p["l0"], p["fvu"]) for p in plotted} == {(8, 0.3), (32, 0.15), (50, 0.2), (20, 0.18)}


def test_plot_any_eval_metric(tmp_path):
    from PIL import Image

    from sae.evals.suite import write_result

    for name, l0, score in (("topk", 32.0, 0.2), ("relu", 40.0, 0.4)):
        folder = tmp_path / "run" / name
        write_sae_folder(folder, name, l0, 0.2)
        write_result(folder, name, "absorption",
                     {"metrics": {"mean": {"mean_absorption_fraction_score": score}}}, 1.0)
    write_result(tmp_path / "run" / "topk", "topk-omp", "absorption",  # an encoder view: not
                 {"metrics": {"mean": {"mean_absorption_fraction_score": 9.0}}}, 1.0)  # the SAE
    name = "mean_absorption_fraction_score"
    points = metric_points([tmp_path / "run"], f"absorption_first_letter.{name}")
    assert [p[f"absorption_first_letter.{name}"] for p in points] == [0.4, 0.2]
    out = metric_plot([tmp_path / "run"], tmp_path / "a.png", metric=name)
    with Image.open(out) as im:
        plotted = json.loads(im.text["Description"])
    assert {(p["l0"], p[name]) for p in plotted} == {(32, 0.2), (40, 0.4)}
    with pytest.raises(FileNotFoundError, match="no_such_metric"):
        metric_points([tmp_path / "run"], "no_such_metric")


def test_l0_fvu_plot_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no metrics.json"):
        metric_plot([tmp_path / "empty"], tmp_path / "x.png")
    with pytest.raises(FileNotFoundError, match="no such run"):
        metric_points([tmp_path / "missing"])
    assert not (tmp_path / "x.png").exists()


# ------------------------------------------------------------------ CLI


def test_cli_browse_and_plot(tiny_model_and_texts, tmp_path, capsys):
    model_dir, texts = tiny_model_and_texts
    run = tmp_path / "run"
    meta = {"model_name": str(model_dir), "hook_name": HOOK, "context_size": 16}
    for name, k in (("topk-k4", 4), ("topk-k8", 8)):
        save_sae(make_sae(k=k), run / name, metadata=meta)
        (run / name / "metrics.json").write_text(json.dumps({"l0": k, "fvu": 1 / k}))

    out = tmp_path / "b.html"
    args = ["browse", str(run / "topk-k4"), "--text", str(texts), "--tokens", "100",
            "--latents", "1,2,3", "--out", str(out), "--device", "cpu", "--no-progress"]
    assert main(args) == 0
    data = read_browser_data(out)
    assert [e["id"] for e in data["latents"]] == [1, 2, 3]
    assert data["meta"]["hookpoint"] == HOOK and data["meta"]["context_size"] == 16
    assert data["meta"]["n_tokens"] == 112  # ceil(100 / 16) = 7 contexts of 16
    assert "held-out" in json.dumps(data["meta"]["info"])
    assert str(out) in capsys.readouterr().out

    # a whole run: one page per SAE, next to the given name
    assert main(["browse", str(run), "--text", str(texts), "--tokens", "64", "--n-latents", "4",
                 "--out", str(tmp_path / "all.html"), "--device", "cpu", "--no-progress"]) == 0
    assert sorted(p.name for p in tmp_path.glob("all-*.html")) == [
        "all-topk-k4.html",
        "all-topk-k8.html",
    ]

    png = tmp_path / "p.png"
    assert main(["plot", str(run), "--out", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit, match="no metrics.json"):
        main(["plot", str(texts), "--out", str(png)])
    with pytest.raises(SystemExit, match="no SAE folder"):
        main(["browse", str(texts)])


def test_find_sae_folders(tmp_path):
    write_sae_folder(tmp_path / "r" / "a", "topk", 1.0, 0.5)
    assert list(find_sae_folders(tmp_path / "r")) == ["a"]
    assert list(find_sae_folders(tmp_path / "r" / "a")) == ["a"]
    with pytest.raises(ValueError, match="no SAE folder"):
        find_sae_folders(tmp_path)
    assert re.search("no such", str(pytest.raises(FileNotFoundError, find_sae_folders,
                                                  tmp_path / "nope").value))
