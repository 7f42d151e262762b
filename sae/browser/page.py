""":func:`feature_browser`: scan, pick the latents to show, assemble the page data, write it."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sparsecode._files import atomic_write

from ..architectures import ARCHITECTURES
from ..massive import MASSIVE_FACTOR, MassiveFilter
from ..metrics import DENSE_THRESHOLD, density_histogram
from .render import render
from .scan import (
    HIST_LOW,
    HIST_STEP,
    logit_effects,
    one_point,
    place_norms,
    round_sig,
    scan,
    select_latents,
)


def _check(tokens: Tensor, sae: Any, top_contexts: int, batch_contexts: int,
           window: tuple[int, int], drop_bos: bool) -> tuple[int, int]:
    integer = (torch.int64, torch.int32)
    if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.dtype not in integer:
        raise ValueError("tokens must be a 2-D integer tensor (n_contexts, context_size)")
    n_ctx, c = tokens.shape
    if n_ctx == 0 or c - int(drop_bos) < 1:
        raise ValueError(f"tokens of shape {tuple(tokens.shape)} give no positions")
    for what, v in (("top_contexts", top_contexts), ("batch_contexts", batch_contexts)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{what} must be a positive int, got {v!r}")
    before, after = (int(w) for w in window)
    if before < 0 or after < 0:
        raise ValueError(f"window must be two non-negative ints (before, after), got {window}")
    if not callable(getattr(sae, "encode", None)):
        raise TypeError("sae has no encode() method")
    W_dec = getattr(sae, "W_dec", None)
    if not isinstance(W_dec, Tensor) or W_dec.dim() != 2:
        raise TypeError("sae needs a W_dec tensor of shape (d_sae, d_in)")
    return before, after


def _tracked(latents: Sequence[int] | None, d_sae: int) -> Tensor | None:
    if latents is None:
        return None
    chosen = list(dict.fromkeys(int(j) for j in latents))
    bad = [j for j in chosen if not 0 <= j < d_sae]
    if not chosen or bad:
        raise ValueError(f"latents must be indices in [0, {d_sae}); got {list(latents)}")
    return torch.as_tensor(chosen, dtype=torch.long)


@contextlib.contextmanager
def _eval_mode(module: Any):
    was_training = getattr(module, "training", False)
    if was_training:
        module.eval()
    try:
        yield
    finally:
        if was_training:
            module.train()


def _shown(density: Tensor, tracked: Tensor | None, n_latents: int, noted: Sequence[int] = ()
           ) -> tuple[list[int], dict[int, int], str]:
    """Latents shown, their column in the scan's per-latent tensors, and how they were picked
    (by default the density selection, then the ``noted`` latents it left out)."""
    if tracked is None:
        shown = select_latents(density, n_latents)
        extra = [j for j in dict.fromkeys(noted) if j not in shown]
        how = (f"{len(shown)} latents chosen by density: the most frequent half of those that "
               f"fire and are not dense (density <= {DENSE_THRESHOLD:.0%}), and a spread of "
               "rarer ones")
        if extra:
            how += f"; {len(extra)} more with eval notes"
        shown += extra
        return shown, {j: j for j in shown}, how
    shown = tracked.tolist()
    return shown, {j: i for i, j in enumerate(shown)}, f"{len(shown)} latents chosen by the caller"


def _contexts(result: dict, t: int, tokens: Tensor, top_contexts: int,
              window: tuple[int, int]) -> list[dict[str, Any]]:
    """The top contexts of scan column ``t``: window tokens and activations around each."""
    before, after = window
    c = tokens.shape[1]
    out = []
    for k in range(top_contexts):
        v = float(result["top_vals"][k, t])
        if not v > 0:
            break
        ci, p = divmod(int(result["top_where"][k, t]), c)
        lo, hi = max(0, p - before), min(c, p + after + 1)
        acts = result["top_win"][k, t, lo - (p - before) : hi - (p - before)].tolist()
        out.append({"c": ci, "p": p, "act": round_sig(v), "start": lo,
                    "t": tokens[ci, lo:hi].tolist(), "a": [round_sig(a) if a else 0 for a in acts]})
    return out


def _histogram(h: Tensor) -> dict[str, Any]:
    """The nonzero span of a latent's log10-spaced activation histogram."""
    nz = h.nonzero().flatten()
    if not nz.numel():
        return {"lo": HIST_LOW, "step": HIST_STEP, "counts": []}
    a, b = int(nz[0]), int(nz[-1])
    return {"lo": round_sig(HIST_LOW + a * HIST_STEP), "step": HIST_STEP,
            "counts": h[a : b + 1].tolist()}


def _entries(result: dict, density: Tensor, shown: list[int], col: dict[int, int],
             logits: list | None, tokens: Tensor, top_contexts: int,
             window: tuple[int, int]) -> tuple[list[dict[str, Any]], list[int]]:
    """One page entry per shown latent, and the token ids the page shows."""
    entries, ids = [], []
    for r, j in enumerate(shown):
        t = col[j]
        ctxs = _contexts(result, t, tokens, top_contexts, window)
        count = int(result["counts"][j])
        entries.append({
            "id": int(j), "density": float(density[j]), "count": count,
            "max": ctxs[0]["act"] if ctxs else 0.0,
            "mean": round_sig(float(result["sums"][t]) / count) if count else 0.0,
            "hist": _histogram(result["hist"][t]),
            "logits": None if logits is None else logits[r], "contexts": ctxs,
        })
        ids.extend(i for ctx in ctxs for i in ctx["t"])
        if logits is not None:
            ids.extend(i for side in ("pos", "neg") for i, _ in logits[r][side])
    return entries, ids


def _token_texts(tokenizer: Any, ids: Sequence[int]) -> dict[str, str]:
    """Each token id decoded on its own, as it reads in text (special tokens kept)."""
    ids = sorted(set(ids))
    if tokenizer is None:
        return {str(i): f"[{i}]" for i in ids}
    try:
        texts = tokenizer.batch_decode(
            [[i] for i in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False
        )
    except (AttributeError, TypeError):
        texts = [tokenizer.decode([i]) for i in ids]
    return {str(i): str(t) for i, t in zip(ids, texts, strict=True)}


def _sae_facts(sae: Any) -> dict[str, Any]:
    cfg = getattr(sae, "cfg", None)
    arch = getattr(cfg, "architecture", None)
    budgeted = arch in ARCHITECTURES and ARCHITECTURES[arch].budgeted
    return {"class": type(sae).__name__, "architecture": arch,
            "d_in": int(sae.W_dec.shape[1]), "d_sae": int(sae.W_dec.shape[0]),
            "k": getattr(cfg, "k", None) if budgeted else None}


def _meta(model: nn.Module, sae: Any, point: str, tokens: Tensor, result: dict,
          density: Tensor, positions: MassiveFilter, settings: dict[str, Any]) -> dict[str, Any]:
    info = dict(settings.pop("info"))
    model_name = (info.pop("model", None)
                  or getattr(getattr(model, "config", None), "_name_or_path", None)
                  or type(model).__name__)
    n_ctx, c = tokens.shape
    excluded = []
    if positions.drop_bos:
        excluded.append(f"position 0 of every context ({n_ctx} positions: BOS / attention sink)")
    if positions.factor is not None:
        excluded.append(
            f"{result['n_massive']} massive-norm positions (norm > {positions.factor:g} x the "
            f"median norm {result['median_norm']:.4g} of the first batch, as "
            "sae.massive.MassiveFilter)")
    return {
        "title": settings.pop("title") or f"SAE feature browser \u2014 {model_name} @ {point}",
        "model": str(model_name), "hookpoint": point, "sae": _sae_facts(sae), "info": info,
        "n_contexts": int(n_ctx), "context_size": int(c), "n_tokens": int(tokens.numel()),
        "n_positions": result["n_positions"],
        "n_excluded_bos": int(n_ctx) if positions.drop_bos else 0,
        "n_excluded_massive": result["n_massive"], "massive_factor": positions.factor,
        "median_norm": result["median_norm"], "excluded": excluded,
        "n_dead": int((density == 0).sum()), "n_dense": int((density > DENSE_THRESHOLD).sum()),
        "dense_threshold": DENSE_THRESHOLD, **settings,
    }


def feature_browser(
    model: nn.Module,
    tokenizer: Any,
    sae: Any,
    hookpoint: str | Sequence[str],
    tokens: Tensor,
    *,
    latents: Sequence[int] | None = None,
    n_latents: int = 64,
    top_contexts: int = 10,
    window: tuple[int, int] = (12, 4),
    batch_contexts: int = 8,
    massive_factor: float | None = MASSIVE_FACTOR,
    drop_bos: bool = True,
    out: str | os.PathLike[str] = "feature_browser.html",
    title: str | None = None,
    info: Mapping[str, Any] | None = None,
    notes: Mapping[int, Sequence[str]] | None = None,
    progress: bool = False,
) -> Path:
    """Write a static HTML page showing what the latents of ``sae`` respond to; return its path.

    ``model`` is run once over ``tokens`` (``(n_contexts, context_size)`` ids), ``batch_contexts``
    contexts per forward, stopped right after ``hookpoint`` (:func:`sparsecode.hooks.capture`;
    a list of places for a crosscoder, read side by side, whose page also shows each latent's
    decoder norm per place);
    the activations there are encoded with ``sae.encode`` (any object with ``encode`` and a
    ``W_dec`` of shape ``(d_sae, d_in)``, e.g. :class:`sae.models.SAE`). Positions left out, as
    for training (:class:`sae.massive.MassiveFilter`): position 0 of every context (the BOS /
    attention sink) when ``drop_bos``, and with ``massive_factor`` set the massive-norm
    positions, those whose norm exceeds ``massive_factor`` times the median norm of the first
    batch. They never count as top contexts, in densities or histograms, and show as 0 in
    windows.

    For every latent it records its density (fraction of kept positions where it is nonzero);
    for the latents shown also the ``top_contexts`` positions of largest activation (streaming
    top-k, memory independent of the token count) with a window of ``window = (before, after)``
    tokens of the same context around each, the latent's activations over that window, the mean
    activation where it fires, a histogram of its nonzero activations (log10-spaced bins), and
    its direct logit effects (top 10 promoted and suppressed tokens of ``W_dec[j] * gamma @
    W_U^T``, ``W_U = model.get_output_embeddings().weight``, ``gamma`` the final norm's weight).

    ``info`` adds rows to the page's header (an entry ``"model"`` names the model). ``notes``
    (latent -> lines, e.g. :func:`sae.evals.suite.latent_notes`: the first letter a latent is a
    main latent of, the words it absorbs) are shown with the latent, and noted latents are shown
    even when the density selection leaves them out.
    ``latents`` picks the latents shown; by default :func:`select_latents` picks ``n_latents``:
    the most frequent half that is not dense (> 10%) and a spread of rarer ones.

    The page is one file with inline CSS and JavaScript and its data as JSON in a
    ``<script type="application/json">`` element (read it back with :func:`read_browser_data`):
    ``meta`` (model, hook point, counts, notes), ``vocab`` (token id -> text, for the ids on the
    page), ``density_hist`` (all latents) and ``latents``: per latent ``id``, ``density``,
    ``count``, ``max``, ``mean``, ``hist`` (``lo``, ``step``, ``counts``: log10 bins),
    ``logits`` (``pos`` / ``neg``: ``[token id, value]``) and ``contexts``: ``c`` (row of
    ``tokens``), ``p`` (position), ``act`` (activation there), ``start`` (position of the first
    window token), ``t`` (token ids) and ``a`` (activations, 4 significant digits).
    """
    window = _check(tokens, sae, top_contexts, batch_contexts, window, drop_bos)
    tracked = _tracked(latents, int(sae.W_dec.shape[0]))
    points = [one_point(model, p) for p in ([hookpoint] if isinstance(hookpoint, str)
                                            else hookpoint)]
    point = ", ".join(points)
    tokens = tokens.long()
    positions = MassiveFilter(massive_factor, drop_bos=drop_bos)
    with _eval_mode(sae):
        result = scan(model, sae, points, tokens, tracked, top_contexts, window,
                      batch_contexts, positions, progress)
    density = result["counts"].double() / result["n_positions"]
    notes = {int(j): list(v) for j, v in (notes or {}).items()
             if 0 <= int(j) < int(sae.W_dec.shape[0])}
    shown, col, selection = _shown(density, tracked, n_latents, sorted(notes))
    logits, logit_note = logit_effects(model, sae, shown) if shown else (None, "")
    entries, ids = _entries(result, density, shown, col, logits, tokens, top_contexts, window)
    for entry, norms in zip(entries, place_norms(sae, shown) or [], strict=False):
        entry["place_norms"] = norms
    for entry in entries:
        if entry["id"] in notes:
            entry["notes"] = notes[entry["id"]]
    settings = {"title": title, "info": {str(k): str(v) for k, v in (info or {}).items()},
                "window": list(window), "top_contexts": top_contexts, "selection": selection,
                "logit_note": logit_note, "places": points}
    dh = density_histogram(density.float())
    data = {
        "meta": _meta(model, sae, point, tokens, result, density, positions, settings),
        "vocab": _token_texts(tokenizer, ids),
        "density_hist": {"edges": dh["edges"], "counts": [int(x) for x in dh["counts"]]},
        "latents": entries,
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(out, render(data))
