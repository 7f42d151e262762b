"""Sparse probing (Gurnee et al. 2023, "Finding Neurons in a Haystack"; SAEBench's
``sparse_probing``, docs/metrics.md "Sparse probing").

For each binary task of :mod:`sae.evals.probing_tasks` (balanced classes, documents split
80/20): a logistic regression on the model's activations (``llm_test_accuracy``), on the ``k``
activation dimensions and on the ``k`` latents whose class means differ most (``llm_top_k``,
``sae_top_k`` for k = 1, 2, 5, 10, 20), and on all latents (``sae_test_accuracy``); test
accuracy each. A document-level sample is the mean over its tokens (of activations, or of the
latents of each token), as in SAEBench. Positions 0 and massive-norm positions
(:mod:`sae.massive`) are left out: dictionaries never train on them. The scores are means over
the datasets (``package`` is one dataset: the mean of its one-vs-rest tasks).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..massive import MASSIVE_FACTOR, massive_mask
from .activations import Places, latents, read
from .probes import fit_logistic, top_k_mean_diff
from .probing_tasks import TOKEN_TASKS, package_docstrings, token_labels

__all__ = ["KS", "ProbingData", "llm_probes", "probing_data", "sae_probes"]

KS = (1, 2, 5, 10, 20)


@dataclass
class ProbingData:
    """Token activations (what the dictionary reads), which sample each row belongs to, and
    each task's balanced train / test samples with their labels."""

    rows: Tensor  # (n_rows, d_in)
    owner: Tensor  # (n_rows,) sample of each row
    n_samples: int
    tasks: dict[str, dict[str, Any]]  # name -> {"dataset", "train": (idx, y), "test": (idx, y)}
    config: dict[str, Any]

    def pooled(self, encode: Callable[[Tensor], Tensor] | None = None,
               chunk: int = 4096) -> Tensor:
        """Per sample, the mean over its token rows of the activations, or of ``encode`` of them
        (e.g. a dictionary's latents), computed ``chunk`` rows at a time (the encoded rows are
        never all held at once)."""
        out = None
        for s in range(0, self.rows.shape[0], chunk):
            part = self.rows[s : s + chunk]
            part = part if encode is None else encode(part)
            if out is None:
                out = part.new_zeros(self.n_samples, part.shape[1])
            out.index_add_(0, self.owner[s : s + chunk], part)
        count = torch.bincount(self.owner, minlength=self.n_samples).clamp_min(1)
        return out / count[:, None].to(out.dtype)


class _Builder:
    """Collects token sequences and sample labels, then reads them in one model pass."""

    def __init__(self, tokenizer: Any, context: int, seed: int):
        self.tok, self.context, self.rng = tokenizer, context, random.Random(seed)
        bos = getattr(tokenizer, "bos_token_id", None)
        self.head = [bos] if bos is not None else []
        self.seqs: list[list[int]] = []
        self.per_row: list[bool] = []  # sequence gives one sample per token (vs one in all)
        self.samples: list[tuple[str, dict[str, bool]]] = []  # (group, labels)
        self.split: dict[str, str] = {}

    def group_split(self, group: str) -> str:
        if group not in self.split:
            self.split[group] = "test" if self.rng.random() < 0.2 else "train"
        return self.split[group]

    def encode(self, doc: str, offsets: bool = False):
        enc = self.tok(doc, add_special_tokens=False, return_offsets_mapping=offsets,
                       truncation=False, verbose=False)
        n = self.context - len(self.head)
        return enc["input_ids"][:n], (enc["offset_mapping"][:n] if offsets else None)

    def add_tokens(self, doc: str, group: str) -> None:
        ids, offsets = self.encode(doc, offsets=True)
        if not ids:
            return
        labels = token_labels(doc, offsets)
        self.seqs.append(self.head + list(ids))
        self.per_row.append(True)
        self.samples += [(group, {f"token:{t}": labels[t][i] for t in labels})
                         for i in range(len(ids))]

    def add_document(self, ids: list[int], group: str, labels: dict[str, bool]) -> None:
        self.seqs.append(self.head + list(ids))
        self.per_row.append(False)
        self.samples.append((group, labels))


def probing_data(
    model: nn.Module,
    tokenizer: Any,
    places: Places,
    texts: list[str],
    *,
    n_tokens: int = 12_000,
    docs_per_class: int = 160,
    package_docs: int = 60,
    context: int = 128,
    max_per_class: int = 1000,
    seed: int = 42,
    progress: bool = False,
) -> ProbingData:
    """Build every task's samples from ``texts`` (token tasks) and the built-in text (document
    tasks), read the activations at ``places`` once, and balance each task's classes."""
    from sparsecode.text import builtin_texts

    b = _Builder(tokenizer, context, seed)
    order = b.rng.sample(range(len(texts)), len(texts))
    for i in order:
        if len(b.samples) >= n_tokens:
            break
        b.add_tokens(texts[i], f"text{i}")
    _add_topics(b, builtin_texts(), docs_per_class)
    for name, docs in package_docstrings().items():
        for path, doc in b.rng.sample(docs, min(package_docs, len(docs))):
            b.add_document(b.encode(doc)[0], path, {"package": name})
    lengths = torch.tensor([len(s) - len(b.head) for s in b.seqs])
    x, _ = read(model, places, b.seqs, lambda a, i: a[len(b.head):], progress=progress,
                desc="probing texts")
    per_row = torch.tensor(b.per_row)
    n_samples_seq = torch.where(per_row, lengths, torch.ones_like(lengths))
    first = torch.cumsum(torch.cat([torch.zeros(1, dtype=torch.long), n_samples_seq]), 0)[:-1]
    spans = zip(first.tolist(), lengths.tolist(), b.per_row, strict=True)
    owner = torch.cat([torch.arange(f, f + n) if r else torch.full((n,), f) for f, n, r in spans])
    keep = massive_mask(x, MASSIVE_FACTOR)
    data = ProbingData(x[keep], owner[keep], len(b.samples), {}, config={
        "n_tokens": n_tokens, "docs_per_class": docs_per_class, "package_docs": package_docs,
        "context_length": context, "max_per_class": max_per_class, "random_seed": seed,
        "k_values": list(KS)})
    present = torch.zeros(len(b.samples), dtype=torch.bool)
    present[data.owner] = True
    _balance_tasks(data, b, present, max_per_class)
    return data


def _add_topics(b: _Builder, texts: list[str], per_class: int) -> None:
    """``document:pydoc_topic`` windows: up to 4 windows of each help topic vs module docstring
    windows (the built-in text lists the topics first)."""
    from pydoc_data.topics import topics

    n_topics = len([t for t in topics.values() if t.strip()])
    windows: dict[bool, list[tuple[str, list[int]]]] = {True: [], False: []}
    body = b.context - len(b.head)
    for i, doc in enumerate(texts):
        ids = b.tok(doc, add_special_tokens=False, verbose=False)["input_ids"]
        chunks = [ids[s : s + body] for s in range(0, len(ids), body)]
        chunks = [c for c in chunks if len(c) > 16]
        for c in b.rng.sample(chunks, min(4, len(chunks))):
            windows[i < n_topics].append((f"builtin{i}", c))
    for is_topic, items in windows.items():
        for group, ids in b.rng.sample(items, min(per_class, len(items))):
            b.add_document(ids, group, {"pydoc_topic": is_topic})


def _balance_tasks(data: ProbingData, b: _Builder, present: Tensor, cap: int) -> None:
    names = [f"token:{t}" for t in TOKEN_TASKS]
    packages = sorted({s[1]["package"] for s in b.samples if "package" in s[1]})
    specs = [(n, n, lambda lab, n=n: lab.get(n)) for n in names]
    topic = "document:pydoc_topic"
    specs.append((topic, topic, lambda lab: lab.get("pydoc_topic")))
    specs += [(f"document:package:{p}", "document:package",
               lambda lab, p=p: None if "package" not in lab else lab["package"] == p)
              for p in packages]
    for name, dataset, label in specs:
        task = {"dataset": dataset}
        for split in ("train", "test"):
            pos, neg = [], []
            for i, (group, lab) in enumerate(b.samples):
                v = label(lab)
                if v is None or not present[i] or b.group_split(group) != split:
                    continue
                (pos if v else neg).append(i)
            n = min(len(pos), len(neg), cap if split == "train" else cap // 4)
            idx = b.rng.sample(pos, n) + b.rng.sample(neg, n)
            task[split] = (torch.tensor(idx, dtype=torch.long),
                           torch.tensor([1] * n + [0] * n))
        if min(len(task["train"][0]), len(task["test"][0])) >= 20:
            data.tasks[name] = task


def _accuracy(x: Tensor, task: dict[str, Any], k: int | None) -> float:
    (tr, ytr), (te, yte) = task["train"], task["test"]
    xtr, xte = x[tr], x[te]
    if k is not None:
        cols = top_k_mean_diff(xtr, ytr.bool(), k)
        xtr, xte = xtr[:, cols], xte[:, cols]
    clf = fit_logistic(xtr, ytr, max_iter=1000)
    return float((clf.predict(xte.numpy().astype(np.float32)) == yte.numpy()).mean())


def _probe_all(x: Tensor, data: ProbingData, prefix: str) -> dict[str, dict[str, float]]:
    out = {}
    for name, task in data.tasks.items():
        out[name] = {f"{prefix}_test_accuracy": _accuracy(x, task, None)}
        for k in KS:
            out[name][f"{prefix}_top_{k}_test_accuracy"] = _accuracy(x, task, k)
    return out


def llm_probes(data: ProbingData) -> dict[str, dict[str, float]]:
    """Per task, the accuracies of probes on the activations (shared by every dictionary)."""
    return _probe_all(data.pooled(), data, "llm")


def sae_probes(sae: Any, data: ProbingData, llm: dict[str, dict[str, float]]) -> dict[str, Any]:
    """SAEBench's sparse-probing metrics (``llm`` and ``sae`` categories, means over datasets)
    and per-dataset details for ``sae``."""
    per_task = _probe_all(data.pooled(lambda rows: latents(sae, rows)), data, "sae")
    datasets: dict[str, list[dict[str, float]]] = {}
    for name, task in data.tasks.items():
        datasets.setdefault(task["dataset"], []).append({**llm[name], **per_task[name]})
    details = [{"dataset_name": d, **{k: float(np.mean([r[k] for r in rows])) for k in rows[0]}}
               for d, rows in datasets.items()]
    keys = list(details[0]) if details else []
    mean = {k: float(np.mean([d[k] for d in details])) for k in keys if k != "dataset_name"}
    return {"metrics": {"llm": {k: v for k, v in mean.items() if k.startswith("llm")},
                        "sae": {k: v for k, v in mean.items() if k.startswith("sae")}},
            "details": details, "tasks": {n: {**llm[n], **per_task[n]} for n in data.tasks}}
