"""The pass over the tokens behind the feature browser: latent statistics, streaming top
contexts and direct logit effects (no HTML here; :mod:`sae.browser.page` writes the page)."""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from sparsecode.core.select import topk_rows
from sparsecode.hooks import capture, resolve
from sparsecode.lm import device_of

from ..massive import MassiveFilter
from ..metrics import DENSE_THRESHOLD

#: Activation histograms: log10-spaced bins of this width from ``HIST_LOW`` (values outside are
#: counted in the first / last bin). Fixed bins let one pass fill them for every latent.
HIST_LOW, HIST_STEP, HIST_BINS = -4.0, 0.1, 100
N_LOGITS = 10


# ---------------------------------------------------------------------------------------------
# latent selection
# ---------------------------------------------------------------------------------------------


def select_latents(
    density: Tensor, n_latents: int = 64, dense_threshold: float = DENSE_THRESHOLD
) -> list[int]:
    """The default latents to show: frequent ones and a spread of rarer ones.

    Candidates are the latents that fire (density > 0) and are not dense (density <=
    ``dense_threshold``, 10%), ordered by density, highest first. The first ``ceil(n / 2)``
    of that order are taken, and the other ``floor(n / 2)`` are spread evenly by rank over the
    rest of it, the last being the rarest latent that fires. Dead and dense latents are not
    shown (the page reports how many there are). Returned in order of decreasing density.

    >>> select_latents(torch.tensor([0.5, 0.0, 0.01, 0.02, 0.001, 0.002]), n_latents=3)
    [3, 2, 4]
    """
    if n_latents < 1:
        raise ValueError(f"n_latents must be >= 1, got {n_latents}")
    dens = density.detach().double().cpu()
    cand = ((dens > 0) & (dens <= dense_threshold)).nonzero().flatten()
    order = cand[torch.argsort(dens[cand], descending=True, stable=True)].tolist()
    if len(order) <= n_latents:
        return order
    n_top = (n_latents + 1) // 2
    rest = order[n_top:]
    n_spread = n_latents - n_top
    picks = np.unique(np.round(np.linspace(0, len(rest) - 1, n_spread + 1)[1:]).astype(int))
    return order[:n_top] + [rest[i] for i in picks]


# ---------------------------------------------------------------------------------------------
# the pass over the tokens
# ---------------------------------------------------------------------------------------------


def place_norms(sae: Any, latents: list[int]) -> list[list[float]] | None:
    """A crosscoder's decoder norm per place for each of ``latents`` (None for one place): a
    feature that lives in some layers only has small norms elsewhere."""
    places = getattr(getattr(sae, "cfg", None), "places", None)
    if not places:
        return None
    W = sae.W_dec.detach()[torch.as_tensor(latents, dtype=torch.long)].float()
    norms = torch.stack([part.norm(dim=1) for part in W.split(places, dim=1)], dim=1)
    return [[round_sig(v) for v in row] for row in norms.tolist()]


def one_point(model: nn.Module, hookpoint: str) -> str:
    paths = resolve(model, hookpoint)
    if len(paths) != 1:
        raise ValueError(
            f"hook point {hookpoint!r} names {len(paths)} modules {paths[:4]}; name one"
        )
    return paths[0]


class _TopK:
    """Streaming top-``k`` positions per tracked latent, with the latent's activations in a
    token window around each; memory ``O(k * n_latents * window)`` whatever the token count."""

    def __init__(self, k: int, n: int, before: int, after: int, device: torch.device):
        self.k, self.before, self.after = k, before, after
        w = before + 1 + after
        self.vals = torch.full((k, n), -math.inf, device=device)
        self.where = torch.full((k, n), -1, dtype=torch.long, device=device)
        self.win = torch.zeros((k, n, w), device=device)
        self.offsets = torch.arange(-before, after + 1, device=device)

    def update(self, z: Tensor, first_flat: int) -> None:
        """Offer the positions of ``z`` (contexts, positions, latents); ``first_flat`` is the
        flat index (context * positions + position) of ``z[0, 0]`` in the whole token set.
        Selections are the core's top-k (:func:`sparsecode.core.select.topk_rows`: among equal
        activations the earlier position wins)."""
        b, c, n = z.shape
        flat = z.reshape(b * c, n)
        vals, idx = (t.T for t in topk_rows(flat.T, min(self.k, b * c)))
        ctx, pos = idx // c, idx % c
        pw = pos.unsqueeze(-1) + self.offsets  # (kb, n, w)
        inside = (pw >= 0) & (pw < c)
        lat = torch.arange(n, device=z.device).view(1, n, 1)
        win = z[ctx.unsqueeze(-1), pw.clamp(0, c - 1), lat] * inside
        vals, sel = (t.T for t in topk_rows(torch.cat([self.vals, vals]).T, self.k))
        self.vals = vals.contiguous()
        self.where = torch.cat([self.where, idx + first_flat]).gather(0, sel)
        all_win = torch.cat([self.win, win])
        self.win = all_win.gather(0, sel.unsqueeze(-1).expand(-1, -1, all_win.shape[-1]))


class _Stats:
    """Per-latent statistics of the scored positions: firing counts (all latents), sums,
    activation histograms and the streaming top contexts (the tracked latents)."""

    def __init__(self, d_sae: int, tracked: Tensor | None, top_contexts: int,
                 window: tuple[int, int], device: torch.device):
        self.idx = None if tracked is None else tracked.to(device)
        self.n = d_sae if tracked is None else int(tracked.numel())
        self.top = _TopK(top_contexts, self.n, window[0], window[1], device)
        self.counts = torch.zeros(d_sae, dtype=torch.long, device=device)
        self.sums = torch.zeros(self.n, dtype=torch.float64, device=device)
        self.hist = torch.zeros(self.n * HIST_BINS, dtype=torch.long, device=device)

    def add(self, z: Tensor, first_flat: int) -> None:
        """Codes ``z (contexts, positions, d_sae)``, zero at the positions left out."""
        self.counts += (z != 0).sum(dim=(0, 1))
        zt = z if self.idx is None else z.index_select(-1, self.idx)
        self.sums += zt.sum(dim=(0, 1), dtype=torch.float64)
        self.top.update(zt, first_flat)
        rows, cols = (zt.reshape(-1, self.n) > 0).nonzero(as_tuple=True)
        if rows.numel():
            v = zt.reshape(-1, self.n)[rows, cols]
            b = ((v.log10() - HIST_LOW) / HIST_STEP).floor().clamp(0, HIST_BINS - 1).long()
            self.hist.index_add_(0, cols * HIST_BINS + b, torch.ones_like(b))

    def result(self) -> dict[str, Tensor]:
        return {"counts": self.counts.cpu(), "sums": self.sums.cpu(),
                "hist": self.hist.view(self.n, HIST_BINS).cpu(), "top_vals": self.top.vals.cpu(),
                "top_where": self.top.where.cpu(), "top_win": self.top.win.cpu()}


def _activations(model: nn.Module, points: list[str], tokens: Tensor, batch_contexts: int,
                 progress: bool):
    """``(first context, {point: activations (contexts, positions, d)})`` per forward (one
    stopped-early forward for all the points a dictionary reads), checked."""
    from tqdm.auto import tqdm

    n_ctx, c = tokens.shape
    dev = device_of(model)
    with capture(model, points, stop_early=True) as acts, tqdm(
            total=tokens.numel(), unit="tok", desc="feature browser", leave=False,
            disable=not progress) as bar:
        for start in range(0, n_ctx, batch_contexts):
            chunk = tokens[start : start + batch_contexts]
            acts.run(input_ids=chunk.to(dev), use_cache=False)
            for point in points:
                x = acts[point]
                if x.dim() != 3 or x.shape[:2] != chunk.shape:
                    raise ValueError(
                        f"the activation at {point!r} has shape {tuple(x.shape)}; expected "
                        f"({chunk.shape[0]}, {c}, d) for {chunk.shape[0]} contexts of {c} "
                        "tokens")
                if not torch.isfinite(x).all():
                    raise ValueError(f"the model's activation at {point!r} holds NaN or inf")
            yield start, {p: acts[p] for p in points}
            bar.update(chunk.numel())


@torch.no_grad()
def scan(model: nn.Module, sae: Any, points: list[str], tokens: Tensor, tracked: Tensor | None,
         top_contexts: int, window: tuple[int, int], batch_contexts: int,
         positions: MassiveFilter, progress: bool) -> dict[str, Any]:
    """One pass over ``tokens``: latent statistics and streaming top contexts, over the
    positions ``positions`` keeps (BOS and massive ones left out, medians of the first batch).
    ``points`` are the places the dictionary reads, side by side (a crosscoder reads several)."""
    c = tokens.shape[1]
    stats = _Stats(int(sae.W_dec.shape[0]), tracked, top_contexts, window, sae.W_dec.device)
    n_pos = n_massive = 0
    for start, acts in _activations(model, points, tokens, batch_contexts, progress):
        acts = {p: a.to(device=sae.W_dec.device, dtype=sae.W_dec.dtype) for p, a in acts.items()}
        keep = positions.keep_positions(acts)
        x = torch.cat([acts[p] for p in points], dim=-1)
        n_bos = x.shape[0] if positions.drop_bos else 0
        n_massive += keep.numel() - int(keep.sum()) - n_bos
        n_pos += int(keep.sum())
        stats.add(sae.encode(x).float() * keep.unsqueeze(-1), start * c)
    if n_pos == 0:
        raise ValueError("no token positions left after dropping first and massive positions")
    median = None if positions.medians is None else positions.medians[points[-1]]
    return {**stats.result(), "n_positions": n_pos, "n_massive": n_massive,
            "median_norm": median}


# ---------------------------------------------------------------------------------------------
# logit effects
# ---------------------------------------------------------------------------------------------


def _final_norm_weight(model: nn.Module, d: int) -> tuple[str, Tensor] | None:
    """The last normalisation module outside the numbered blocks with a ``(d,)`` weight."""
    found = None
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if "norm" not in type(mod).__name__.lower() or not isinstance(w, Tensor):
            continue
        if w.shape == (d,) and not re.search(r"\.\d+(\.|$)", name):
            found = (name, w)
    return found


@torch.no_grad()
def logit_effects(
    model: nn.Module, sae: Any, latents: list[int], n: int = N_LOGITS
) -> tuple[list[dict[str, list]] | None, str]:
    """Top ``n`` promoted and suppressed token ids and values per latent, and how computed (a
    crosscoder's: through its decoder for the last place it writes)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    W_U = getattr(head, "weight", None)
    W_dec_all = sae.W_dec.detach()
    places = getattr(getattr(sae, "cfg", None), "places", None)
    if places:
        W_dec_all = W_dec_all[:, -places[-1]:]
    d_in = int(W_dec_all.shape[1])
    if not isinstance(W_U, Tensor) or W_U.dim() != 2 or W_U.shape[1] != d_in:
        shape = None if not isinstance(W_U, Tensor) else tuple(W_U.shape)
        return None, (
            f"no logit effects: the model's unembedding (get_output_embeddings().weight, shape "
            f"{shape}) does not match the SAE's d_in={d_in}"
        )
    dev = W_U.device
    W_dec = W_dec_all[torch.as_tensor(latents, dtype=torch.long)].to(dev, torch.float32)
    norm = _final_norm_weight(model, d_in)
    if norm is not None:
        W_dec = W_dec * norm[1].to(dev, torch.float32)
        how = (
            f"logit effect of latent j = W_dec[j] \u2299 \u03b3 @ W_U\u1d40, with \u03b3 the "
            f"weight of the final norm {norm[0]!r} applied (its division by the RMS, a positive "
            "per-token scalar, and any bias are ignored; they do not change the ranking)"
        )
    else:
        how = "logit effect of latent j = W_dec[j] @ W_U\u1d40 (no final norm weight found)"
    out = []
    W = W_U.to(torch.float32)
    for start in range(0, len(latents), 256):
        eff = W_dec[start : start + 256] @ W.T
        k = min(n, eff.shape[1])
        pv, pi = eff.topk(k, dim=1)
        nv, ni = eff.topk(k, dim=1, largest=False)
        for r in range(eff.shape[0]):
            out.append({"pos": _pairs(pi[r], pv[r]), "neg": _pairs(ni[r], nv[r])})
    return out, how


def _pairs(ids: Tensor, values: Tensor) -> list[list]:
    return [[int(i), round_sig(v)] for i, v in zip(ids.tolist(), values.tolist(), strict=True)]


def round_sig(v: float, digits: int = 4) -> float:
    """``v`` to ``digits`` significant digits (keeps the embedded JSON small)."""
    return float(f"{v:.{digits}g}")
