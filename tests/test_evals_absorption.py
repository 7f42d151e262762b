"""Feature absorption and splitting (sae.evals.absorption / splitting) on constructed cases with
known answers, and against sae-bench's own functions on the same activations, probes and SAE."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from sae.evals.absorption import absorption, word_absorption
from sae.evals.first_letter import LETTERS, FirstLetterData, probe_f1
from sae.evals.probes import fit_multi_probe
from sae.evals.splitting import k_sparse_probing, split_features, splitting
from sae.io import from_dictionary

D = 64


def _data(per_letter: int, absorbed: int = 0, split_letter: int | None = None, seed: int = 0):
    """Words of 26 letters whose activation is 3 x their letter's basis direction (+ noise).
    ``absorbed`` test words of letter a also carry token direction e_40; ``split_letter``'s
    words alternate between its direction and e_50 + its direction."""
    g = torch.Generator().manual_seed(seed)
    data = FirstLetterData({}, {}, {}, {})
    for split, n in (("train", per_letter), ("test", per_letter // 2)):
        labels = torch.arange(26).repeat_interleave(n)
        y = 3.0 * torch.nn.functional.one_hot(labels, D).float()
        y += 0.05 * torch.randn(y.shape, generator=g)
        if split == "test" and absorbed:
            rows = (labels == 0).nonzero()[:absorbed, 0]
            y[rows, 40] += 3.0
        if split_letter is not None:
            rows = (labels == split_letter).nonzero()[::2, 0]
            y[rows, 50] += 3.0
        data.labels[split], data.x[split], data.y[split] = labels, y, y
        data.words[split] = [LETTERS[j] + str(i) for i, j in enumerate(labels.tolist())]
    # the exact letter directions as the probe (a fitted one also puts negative weight on the
    # other letters, which would tilt the absorber's cosine in these tiny cases)
    data.probe = (torch.eye(D)[:26], torch.full((26,), -1.5))
    return data


def _sae(extra: list[torch.Tensor]):
    rows = torch.cat([torch.eye(D)[:26]] + [e[None] for e in extra])
    return from_dictionary(rows, k=1, encoder="topk")


def _run(data, sae):
    z = {s: sae.encode(data.x[s]).detach() for s in ("train", "test")}
    ks = k_sparse_probing(z["train"], data.labels["train"], z["test"], data.labels["test"])
    return ks, absorption(sae, ks, data, z["test"])


def test_the_fitted_letter_probe_is_perfect_on_separable_letters():
    data = _data(20)
    data.probe = fit_multi_probe(data.y["train"], data.labels["train"], 26, weight_decay=1e-4,
                                 batch_size=64)
    assert np.allclose(probe_f1(data), 1.0)


def test_the_letter_direction_itself_absorbs_nothing_and_a_perfect_probe_scores_one():
    data = _data(20)
    assert np.allclose(probe_f1(data), 1.0)
    ks, out = _run(data, _sae([]))
    assert ks.main == [[j] for j in range(26)]
    assert np.allclose(ks.f1[:, 0], 1.0)
    assert out["metrics"]["mean"]["mean_absorption_fraction_score"] == 0.0
    assert out["metrics"]["mean"]["mean_full_absorption_score"] == 0.0
    assert out["metrics"]["mean"]["mean_num_split_features"] == 1.0
    assert len(out["details"]) == 26


def test_a_planted_absorber_raises_absorption_by_exactly_its_words():
    data = _data(20, absorbed=4)
    absorber = torch.zeros(D)
    absorber[[0, 40]] = 1.0
    ks, out = _run(data, _sae([absorber]))  # latent 26 = "a" + a token direction
    assert ks.main[0] == [0]
    a = out["details"][0]
    assert a["first_letter"] == "a" and a["num_probe_true_positives"] == 10
    assert a["num_full_absorption"] == 4
    assert a["mean_absorption_fraction"] == pytest.approx(0.4)
    assert out["metrics"]["mean"]["mean_full_absorption_score"] == pytest.approx(0.4 / 26)
    assert out["absorbers"] == {"26": {"a": 4}}


def test_a_letter_split_over_two_latents_has_two_main_latents():
    data = _data(20, split_letter=1)
    half = torch.zeros(D)
    half[[1, 50]] = 1.0
    ks, _ = _run(data, _sae([half]))
    assert sorted(ks.main[1]) == [1, 26]
    assert ks.f1[1, 1] > ks.f1[1, 0] + 0.03
    result = splitting(ks, data)
    assert result["metrics"]["mean"]["mean_num_split_features"] == pytest.approx(27 / 26)


def test_split_rule_stops_at_the_first_small_gain():
    assert split_features([0.2, 0.6, 0.62, 0.9], [[1], [1, 2], [1, 2, 3], [1, 2, 3, 4]]) == [1, 2]
    assert split_features([0.0], [[7]]) == [7]


def test_word_absorption_branches():
    W = torch.eye(4)
    p = torch.tensor([1.0, 0, 0, 0])
    y = torch.tensor([[2.0, 0, 0, 0], [2.0, 0, 0, 0], [-1.0, 0, 0, 0]])
    # row 0: main fires fully; row 1: main silent, latent 1 (cos 0.8) carries it; row 2: a < 0
    W[1] = torch.tensor([0.8, 0.6, 0, 0])
    z = torch.tensor([[2.0, 0, 0, 0], [0, 2.5, 0, 0], [0, 0, 0, 0]])
    frac, full, best = word_absorption(y, z, p, W, main=[0])
    assert frac.tolist() == [0.0, 1.0, 0.0]
    assert full.tolist() == [False, True, False]
    assert best.tolist()[:2] == [0, 1]


# ---------------------------------------------------------------------------------------------
# agreement with sae-bench (installed without its dependencies: see README's test command)
# ---------------------------------------------------------------------------------------------


def _random_case(seed: int = 0, n: int = 300, d: int = 24, d_sae: int = 60):
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(d_sae, d, generator=g)
    p = torch.randn(d, generator=g)
    W_dec[:8] = p + 0.6 * torch.randn(8, d, generator=g)  # latents aligned with the probe
    y = torch.randn(n, d, generator=g) + 1.5 * p
    W_enc = torch.randn(d, d_sae, generator=g) * 0.4
    z = torch.relu(y @ W_enc - 0.8)
    return y, z, p, W_dec


def test_word_absorption_equals_sae_bench_calculator():
    calc_mod = pytest.importorskip("sae_bench.evals.absorption.feature_absorption_calculator")
    y, z, p, W_dec = _random_case()
    main = [0, 3]
    z[::2, main] = 0.0  # main latents silent on half the words: absorption is possible there

    class Model:  # run_with_cache gives our activations at the word position (-2)
        i = 0

        def to_tokens(self, text):
            return torch.zeros(1, 4)

        def run_with_cache(self, prompts, names_filter):
            rows = y[self.i : self.i + len(prompts)]
            self.i += len(prompts)
            full = torch.zeros(len(prompts), 3, y.shape[1])
            full[:, -2] = rows
            return None, {names_filter[0]: full}

    table = dict(zip(map(tuple, y.tolist()), z, strict=True))
    sae = types.SimpleNamespace(W_dec=W_dec, device=torch.device("cpu"),
                                encode=lambda x: torch.stack([table[tuple(r)] for r in x.tolist()]))
    calc = calc_mod.FeatureAbsorptionCalculator(
        model=Model(), icl_word_list=[f"w{i}" for i in range(20)], max_icl_examples=3,
        full_absorption_probe_cos_sim_threshold=0.025,
        absorption_fraction_probe_cos_sim_threshold=0.1,
        probe_projection_proportion_threshold=0.4, absorption_fraction_max_absorbing_latents=3)
    words = [f"word{i}" for i in range(y.shape[0])]
    ref = calc.calculate_absorption(sae, words, p, main, layer=0, show_progress=False)
    frac, full, best = word_absorption(y, z, p, W_dec, main)
    theirs = [r.absorption_fraction for r in ref.word_results]
    assert np.allclose(frac.numpy(), theirs, atol=1e-5)
    assert full.tolist() == [r.is_full_absorption for r in ref.word_results]
    assert 0 < sum(full.tolist()) and 0 < (frac > 0).sum() < len(words)  # branches exercised
    assert best.tolist() == [r.top_projection_feature_scores[0].feature_id
                             for r in ref.word_results]


def test_k_sparse_probing_equals_sae_bench(monkeypatch):
    ksp = pytest.importorskip("sae_bench.evals.absorption.k_sparse_probing")
    probing = pytest.importorskip("sae_bench.evals.absorption.probing")
    import sae.evals.splitting as ours

    data = _data(12, split_letter=3, seed=1)
    half = torch.zeros(D)
    half[[3, 50]] = 1.0
    sae = _sae([half])
    z = {s: sae.encode(data.x[s]).detach() for s in ("train", "test")}
    W, b = fit_multi_probe(z["train"], data.labels["train"], 26, l1=0.01, batch_size=64)
    monkeypatch.setattr(ours, "fit_multi_probe", lambda *a, **k: (W, b))
    mine = ours.k_sparse_probing(z["train"], data.labels["train"], z["test"], data.labels["test"])

    lin = probing.LinearProbe(27, 26)
    with torch.no_grad():
        lin.fc.weight.copy_(W)
        lin.fc.bias.copy_(b)
    monkeypatch.setattr(ksp, "train_sparse_multi_probe", lambda *a, **k: lin)
    bench_sae = types.SimpleNamespace(
        device=torch.device("cpu"), dtype=torch.float32, cfg=types.SimpleNamespace(d_sae=27),
        encode=lambda x: sae.encode(x).detach(), W_enc=sae.W_enc.detach(),
        W_dec=sae.W_dec.detach())
    train = list(zip(data.words["train"], data.labels["train"].tolist(), strict=True))
    test = list(zip(data.words["test"], data.labels["test"].tolist(), strict=True))
    probes = ksp.train_k_sparse_probes(bench_sae, train, data.x["train"], ks=range(1, 11),
                                       precalc_sae_acts=True)
    letter_probe = probing.LinearProbe(D, 26)
    with torch.no_grad():
        letter_probe.fc.weight.copy_(data.probe[0])
        letter_probe.fc.bias.copy_(data.probe[1])
    raw = ksp.eval_probe_and_sae_k_sparse_raw_scores(bench_sae, letter_probe, probes, test,
                                                     data.x["test"])
    meta = ksp.sae_k_sparse_metadata(bench_sae, letter_probe, probes, "s", 0)
    metrics = ksp.build_metrics_df(raw, meta, max_k_value=10)
    ksp.add_feature_splits_to_metrics_df(metrics, max_k_value=10)
    for j, letter in enumerate(LETTERS):
        row = metrics[metrics["letter"] == letter].iloc[0]
        assert np.allclose([row[f"f1_sparse_sae_{k}"] for k in range(1, 11)], mine.f1[j])
        assert list(row["split_feats"]) == mine.main[j]
    assert sorted(mine.main[3]) == [3, 26]


def test_letters_the_model_does_not_represent_are_reported_and_skipped():
    from sae.evals.suite import skipped_letters

    data = _data(20)
    data.y["test"][data.labels["test"] == 25] = 0.0  # no "z" signal left
    assert skipped_letters(data) == {"z": "activation probe F1 0.00 <= 0.6 on 10 test words"}
    _, out = _run(data, _sae([]))
    assert [d["first_letter"] for d in out["details"]] == list(LETTERS[:25])


def test_a_synthetic_model_of_another_width_does_not_apply():
    from sae.evals.suite import EVALS, Context, NotApplicable

    def recovery(view):
        raise ValueError("the synthetic model has d=32 but the SAE d_in=64")

    ctx = Context(None, None, synthetic=recovery)
    with pytest.raises(NotApplicable, match="d=32 but the SAE d_in=64"):
        EVALS["synthetic"].run(_sae([]), ctx)
    with pytest.raises(NotApplicable, match="needs --synthetic"):
        EVALS["synthetic"].run(_sae([]), Context(None, None))
