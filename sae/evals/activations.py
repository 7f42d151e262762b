"""What the evals read from a model: a dictionary's input and target activations at chosen
token positions of tokenised prompts or documents, and its latents there.

A dictionary reads its places (:func:`sae.wiring.reads`, concatenated: a crosscoder reads
several) and writes its places (:func:`sae.wiring.writes`: a transcoder writes a module's
output). Probes that are compared with decoder directions are trained on what the dictionary
writes (``y``); latents are computed from what it reads (``x``). For an SAE both are the same
activation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from sparsecode.hooks import capture
from sparsecode.lm import device_of

__all__ = ["Places", "latents", "read", "sae_places"]


@dataclass(frozen=True)
class Places:
    """The places a dictionary reads and writes (module paths), the key of a shared dataset."""

    reads: tuple[str, ...]
    writes: tuple[str, ...]

    @property
    def all(self) -> list[str]:
        return list(dict.fromkeys(self.reads + self.writes))


def sae_places(sae: Any, hookpoint: str | None = None) -> Places:
    """The :class:`Places` of ``sae`` (``hookpoint``: the place of an SAE whose metadata names
    none)."""
    from .. import wiring

    return Places(tuple(wiring.reads(sae.cfg, hookpoint)), tuple(wiring.writes(sae.cfg, hookpoint)))


@torch.no_grad()
def read(
    model: nn.Module,
    places: Places,
    sequences: Sequence[Sequence[int]],
    reduce: Callable[[Tensor, int], Tensor],  # (acts (T, d), sequence index) -> rows
    *,
    batch_size: int = 32,
    progress: bool = False,
    desc: str = "activations",
) -> tuple[Tensor, Tensor]:
    """``(x, y)``: for each token sequence ``i``, ``reduce(acts, i)`` of the activations the
    dictionary reads (``x``) and writes (``y``), concatenated over places, float32 on the CPU,
    the rows of the sequences in their given order (one tensor for both when the dictionary
    writes what it reads).

    ``reduce`` maps one sequence's activations ``(T, d)`` (``T`` its length) to rows, e.g.
    ``lambda a, i: a[positions[i]]`` or ``lambda a, i: a[1:].mean(0)``. Sequences are run in
    batches of similar length, right-padded (a causal model never lets a real position see the
    padding), with one forward stopped after the last place needed.
    """
    from tqdm.auto import tqdm

    if not sequences:
        raise ValueError("no token sequences to read activations from")
    dev = device_of(model)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    xs: list[Tensor | None] = [None] * len(sequences)
    ys: list[Tensor | None] = [None] * len(sequences)
    names = places.all
    same = places.reads == places.writes  # an SAE: what it writes is what it reads
    with capture(model, names, stop_early=True) as acts, tqdm(
            total=len(sequences), desc=desc, unit="seq", leave=False, disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            lengths = [len(sequences[i]) for i in idx]
            ids = torch.zeros(len(idx), max(lengths), dtype=torch.long)
            for row, i in enumerate(idx):
                ids[row, : lengths[row]] = torch.as_tensor(sequences[i], dtype=torch.long)
            acts.run(input_ids=ids.to(dev), use_cache=False)
            got = {p: acts[p].float() for p in names}
            for p, a in got.items():
                if not torch.isfinite(a).all():
                    raise ValueError(f"the model's activation at {p!r} holds NaN or inf")
            x = torch.cat([got[p] for p in places.reads], dim=-1)
            y = None if same else torch.cat([got[p] for p in places.writes], dim=-1)
            for row, i in enumerate(idx):
                xs[i] = reduce(x[row, : lengths[row]], i).cpu()
                if y is not None:
                    ys[i] = reduce(y[row, : lengths[row]], i).cpu()
            bar.update(len(idx))
    x_rows = _rows(xs)
    return x_rows, x_rows if same else _rows(ys)


def _rows(parts: list[Tensor | None]) -> Tensor:
    return torch.cat([p.reshape(-1, p.shape[-1]) for p in parts if p is not None])


@torch.no_grad()
def latents(sae: Any, x: Tensor, batch_size: int = 4096) -> Tensor:
    """Dense latents ``(n, d_sae)`` of the rows of ``x`` (float32, CPU), ``batch_size`` rows at a
    time through ``sae.encode`` (any encoder view of :mod:`sae.encoders` works too)."""
    dev, dtype = sae.W_dec.device, sae.W_dec.dtype
    out = [sae.encode(x[i : i + batch_size].to(dev, dtype)).float().cpu()
           for i in range(0, x.shape[0], batch_size)]
    return torch.cat(out) if out else x.new_zeros(0, int(sae.cfg.d_sae))
