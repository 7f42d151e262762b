"""The first-letter task behind absorption and splitting (Chanin et al. 2024, "A is for
Absorption"; SAEBench's ``absorption_first_letter``).

Words are the model's single-token alphabetic vocabulary entries (a leading space allowed),
split 80/20 into probe-training and test words. Each word is read in an in-context prompt: lines
of the template (``"{word} has the first letter:"``) followed by the first letter (`` C``), the
word on the last line; the activation is read at the word's token. A 26-way one-vs-rest
logistic probe on the activations the dictionary writes
(:func:`sae.evals.probes.fit_multi_probe`) is the reference detector of each letter.

Two changes from SAEBench for a CPU budget, both documented in docs/metrics.md: ``n_words`` of
the vocabulary are drawn uniformly (seeded; the letter frequencies stay the vocabulary's), and a
prompt holds ``n_icl`` example lines then ``queries`` words, each read at its own token (a
causal model sees only the lines before it, so word ``i`` has ``n_icl + i`` examples instead of
exactly ``n_icl``): 8x fewer tokens through the model than one prompt per word.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .activations import Places, read
from .probes import fit_multi_probe

__all__ = ["LETTERS", "FirstLetterData", "alpha_vocabulary", "first_letter_data", "probe_f1"]

LETTERS = string.ascii_lowercase
TEMPLATE = "{word} has the first letter:"
#: Minibatch of the probes' Adam steps: SAEBench's 4096 over its ~38k training words is about ten
#: steps an epoch; 512 over our default 4,800 keeps that (4096 here gave F1 > 0.6 on 18 letters of
#: SmolLM2 layer 15 instead of 23: an under-trained probe).
PROBE_BATCH = 512
#: A letter is represented by the model when its activation probe's test F1 exceeds this
#: (SAEBench's ``min_GT_probe_f1``); absorption and splitting judge those letters only.
MIN_PROBE_F1 = 0.6


def alpha_vocabulary(tokenizer: Any) -> list[tuple[int, str]]:
    """``(token id, word)`` of every vocabulary entry that decodes to ASCII letters only (one
    leading space allowed), in token-id order."""
    out = []
    for token, tid in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        word = tokenizer.convert_tokens_to_string([token])
        core = word[1:] if word.startswith(" ") else word
        if core and all(c in string.ascii_letters for c in core):
            out.append((tid, word))
    return out


def first_letter(word: str) -> int:
    """The index in :data:`LETTERS` of the word's first letter (case ignored)."""
    return LETTERS.index(word.strip()[0].lower())


def _line_ids(tokenizer: Any, template: str) -> tuple[list[int], Any]:
    """Token ids of the template's text before the word, and a function giving the ids after
    it for a first letter (the rest of the template, `` C`` and a newline)."""
    before, after = template.split("{word}", 1)
    enc = lambda s: list(tokenizer(s, add_special_tokens=False)["input_ids"]) if s else []  # noqa: E731
    tails = {c: enc(after + " " + c.upper() + "\n") for c in LETTERS}
    return enc(before), tails


@dataclass
class FirstLetterData:
    """The task's words and activations, shared by every dictionary at the same places."""

    words: dict[str, list[str]]  # "train" / "test"
    labels: dict[str, Tensor]  # letter index per word
    x: dict[str, Tensor]  # activations the dictionary reads, at the word
    y: dict[str, Tensor]  # activations it writes, at the word
    probe: tuple[Tensor, Tensor] = field(default=None)  # 26-way probe on y: (W, b)
    config: dict[str, Any] = field(default_factory=dict)


def first_letter_data(
    model: nn.Module,
    tokenizer: Any,
    places: Places,
    *,
    n_words: int = 6000,
    n_icl: int = 10,
    queries: int = 20,
    template: str = TEMPLATE,
    seed: int = 42,
    batch_size: int = 32,
    progress: bool = False,
) -> FirstLetterData:
    """Build the first-letter dataset of ``n_words`` words at ``places`` and train its probe."""
    if "{word}" not in template:
        raise ValueError(f"the prompt template must contain '{{word}}', got {template!r}")
    vocab = alpha_vocabulary(tokenizer)
    if len(vocab) < 4 * n_icl:
        raise ValueError(f"the tokenizer has only {len(vocab)} single-token alphabetic words")
    rng = random.Random(seed)
    chosen = rng.sample(vocab, min(n_words, len(vocab)))
    cut = int(0.8 * len(chosen))
    before, tails = _line_ids(tokenizer, template)
    bos = getattr(tokenizer, "bos_token_id", None)
    head = ([bos] if bos is not None else []) + list(
        tokenizer("\n", add_special_tokens=False)["input_ids"])
    data = FirstLetterData({}, {}, {}, {}, config={
        "prompt_template": template, "n_icl": n_icl, "queries_per_prompt": queries,
        "n_words": len(chosen), "random_seed": seed})
    for name, entries in (("train", chosen[:cut]), ("test", chosen[cut:])):
        seqs, where, order = [], [], []
        for start in range(0, len(entries), queries):
            group = entries[start : start + queries]
            rest = entries[:start] + entries[start + queries :]
            ids, pos = list(head), []
            for tid, word in rng.sample(rest, min(n_icl, len(rest))) + group:
                ids += before
                pos.append(len(ids))
                ids += [tid] + tails[LETTERS[first_letter(word)]]
            seqs.append(ids)
            where.append(pos[-len(group):])
            order += [w for _, w in group]
        x, y = read(model, places, seqs, lambda a, i, where=where: a[where[i]],
                    batch_size=batch_size, progress=progress,
                    desc=f"first-letter prompts ({name})")
        data.words[name], data.x[name], data.y[name] = order, x, y
        data.labels[name] = torch.tensor([first_letter(w) for w in order])
    data.probe = fit_multi_probe(data.y["train"], data.labels["train"], len(LETTERS),
                                 weight_decay=1e-4, batch_size=PROBE_BATCH, seed=seed)
    return data


def probe_scores(data: FirstLetterData, split: str = "test") -> Tensor:
    """The 26 probe logits of each word of ``split``."""
    W, b = data.probe
    return data.y[split] @ W.T + b


def probe_f1(data: FirstLetterData) -> np.ndarray:
    """Test F1 of each letter's probe (logit > 0 as the decision)."""
    from sklearn.metrics import f1_score

    scores = probe_scores(data).numpy()
    labels = data.labels["test"].numpy()
    return np.array([f1_score(labels == j, scores[:, j] > 0, zero_division=0.0)
                     for j in range(len(LETTERS))])
