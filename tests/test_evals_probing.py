"""Sparse probing (sae.evals.sparse_probing), its offline tasks, and the --suite output files:
known answers, sae-bench's own functions on the same data, and sae-bench's result reader."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sae.evals.probes import top_k_mean_diff
from sae.evals.probing_tasks import code_mask, package_docstrings, token_labels
from sae.evals.sparse_probing import KS, ProbingData, _accuracy, llm_probes, sae_probes
from sae.evals.suite import EVALS, parse_suite, write_result
from sae.io import from_dictionary


def _task(n_train: int, n_test: int, offset: int = 0):
    idx = lambda n, o: torch.arange(o, o + 2 * n)  # noqa: E731
    lab = lambda n: torch.tensor([1] * n + [0] * n)  # noqa: E731
    return {"dataset": "t", "train": (idx(n_train, offset), lab(n_train)),
            "test": (idx(n_test, offset + 2 * n_train), lab(n_test))}


def _data(d: int = 16, n_train: int = 60, n_test: int = 20, seed: int = 0):
    """Token samples whose label is carried by dimension 3 (+ noise elsewhere)."""
    g = torch.Generator().manual_seed(seed)
    task = _task(n_train, n_test)
    y = torch.cat([task["train"][1], task["test"][1]]).float()
    rows = torch.randn(len(y), d, generator=g) * 0.3
    rows[:, 3] += 2.0 * y
    n = rows.shape[0]
    return ProbingData(rows, torch.arange(n), n, {"token:x": task}, {})


def test_a_latent_equal_to_the_label_gives_a_perfect_one_sparse_probe():
    data = _data()
    sae = from_dictionary(torch.eye(16), k=1, encoder="topk")
    out = sae_probes(sae, data, llm_probes(data))
    assert out["metrics"]["sae"]["sae_top_1_test_accuracy"] == 1.0
    assert out["metrics"]["llm"]["llm_test_accuracy"] == 1.0
    assert set(out["metrics"]["sae"]) == {"sae_test_accuracy"} | {
        f"sae_top_{k}_test_accuracy" for k in KS}
    assert out["details"][0]["dataset_name"] == "t"


def test_a_label_free_dictionary_probes_at_chance():
    data = _data()
    W = torch.eye(16)
    W[3] = 0.0
    W[3, 0] = 1.0  # no latent reads dimension 3
    out = sae_probes(from_dictionary(W, k=4, encoder="topk"), data, llm_probes(data))
    assert out["metrics"]["sae"]["sae_top_1_test_accuracy"] < 0.75


def test_document_samples_are_means_over_their_tokens():
    rows = torch.tensor([[1.0, 0], [3.0, 2], [5.0, 5]])
    data = ProbingData(rows, torch.tensor([0, 0, 1]), 2, {}, {})
    assert data.pooled().tolist() == [[2.0, 1.0], [5.0, 5.0]]
    assert data.pooled(lambda r: 2 * r, chunk=1).tolist() == [[4.0, 2.0], [10.0, 10.0]]


def test_code_and_token_labels():
    doc = "Use it like this:\n\n   for i in range(3):\n       print(i)\n\n>>> 1 + 1\nDone."
    code = code_mask(doc)
    assert not any(code[: doc.index("\n")])
    assert all(code[doc.index("for") : doc.index("\n\n>>>")])
    assert code[doc.index(">>>")] and not code[doc.index("Done")]
    spans = [("Use", 3), ("range", 5), ("3", 1), (":", 1), ("Done", 4)]
    offsets = [(doc.index(w), doc.index(w) + n) for w, n in spans]
    labels = token_labels(doc, offsets)
    assert labels["code"] == [False, True, True, False, False]
    assert labels["digit"] == [False, False, True, False, False]
    assert labels["capitalised"] == [True, False, False, False, True]
    assert labels["punctuation"] == [False, False, False, True, False]


def test_package_docstrings_come_from_files_of_real_packages():
    packages = package_docstrings()
    assert {"email", "asyncio", "xml"} <= set(packages)
    for name, docs in packages.items():
        assert all(path.startswith(name) and len(doc) >= 40 for path, doc in docs)
        assert len({p for p, _ in docs}) >= 10


def test_selection_and_accuracy_equal_sae_bench():
    pt = pytest.importorskip("sae_bench.evals.sparse_probing.probe_training")
    data = _data(d=24, seed=3)
    task = data.tasks["token:x"]
    (tr, ytr), (te, yte) = task["train"], task["test"]
    x = data.rows
    for k in (1, 2, 5):
        mask = pt.get_top_k_mean_diff_mask(x[tr], ytr.int(), k)
        assert set(top_k_mean_diff(x[tr], ytr.bool(), k).tolist()) == set(
            (~mask).nonzero()[:, 0].tolist())
        xtr = pt.apply_topk_mask_reduce_dim(x[tr], mask)
        xte = pt.apply_topk_mask_reduce_dim(x[te], mask)
        _, acc = pt.train_sklearn_probe(xtr, ytr.int(), xte, yte.int())
        assert _accuracy(x, task, k) == pytest.approx(acc)
    _, acc = pt.train_sklearn_probe(x[tr], ytr.int(), x[te], yte.int())
    assert _accuracy(x, task, None) == pytest.approx(acc)


def test_suite_names():
    assert parse_suite("all") == list(EVALS)
    assert parse_suite("core, probing,core") == ["core", "probing"]
    with pytest.raises(ValueError, match="unknown eval"):
        parse_suite("core,absorb")


def test_result_files_are_read_by_sae_bench(tmp_path):
    gu = pytest.importorskip("sae_bench.sae_bench_utils.graphing_utils")
    folder = tmp_path / "run" / "topk"
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text(json.dumps(
        {"architecture": "topk", "d_sae": 4096, "metadata": {"training_tokens": 2_000_000}}))
    metrics = {"mean": {"mean_absorption_fraction_score": 0.1, "std_dev_x": float("nan")}}
    path = write_result(folder, "topk", "absorption", {"metrics": metrics, "config": {}}, 1.0)
    assert path.name == "run_topk_eval_results.json"
    assert path.parent.name == "absorption_first_letter"
    got = gu.get_eval_results(gu.find_eval_results_files([str(tmp_path)]))
    entry = got["run_topk"]
    assert entry["mean_absorption_fraction_score"] == 0.1 and entry["std_dev_x"] is None
    assert entry["sae_class"] == "topk" and entry["d_sae"] == "4k"
    assert entry["train_tokens"] == 2_000_000
    assert np.isfinite(json.loads(path.read_text())["datetime_epoch_millis"])
