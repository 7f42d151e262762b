"""Look at what SAE latents do: a static HTML feature browser and an L0-FVU plot.

:func:`feature_browser` runs a language model once over token contexts, encodes the activations
at one hook point with an SAE and writes ONE self-contained HTML file (inline CSS and JavaScript,
no network requests, opens from ``file://``) in the style of sae_vis / SAEDashboard: an index of
latents (density, max activation) and per latent its top activating contexts with every token
shaded by the latent's activation, the activation histogram, its direct logit effects and where
its density sits among all latents.

:func:`l0_fvu_plot` scatters L0 against FVU for every SAE folder of one or more training runs.

Both are on the command line as ``sae browse`` and ``sae plot``.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from sparsecode.hooks import capture, resolve

from .massive import MASSIVE_FACTOR, MassiveFilter
from .metrics import DENSE_THRESHOLD, density_histogram

__all__ = [
    "feature_browser",
    "l0_fvu_plot",
    "l0_fvu_points",
    "read_browser_data",
    "select_latents",
]

#: Activation histograms: log10-spaced bins of this width from ``HIST_LOW`` (values outside are
#: counted in the first / last bin). Fixed bins let one pass fill them for every latent.
HIST_LOW, HIST_STEP, HIST_BINS = -4.0, 0.1, 100
N_LOGITS = 10
_DATA_ID = "browser-data"


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


def _device_of(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _one_point(model: nn.Module, hookpoint: str) -> str:
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
        flat index (context * positions + position) of ``z[0, 0]`` in the whole token set."""
        b, c, n = z.shape
        flat = z.reshape(b * c, n)
        vals, idx = flat.topk(min(self.k, b * c), dim=0)
        ctx, pos = idx // c, idx % c
        pw = pos.unsqueeze(-1) + self.offsets  # (kb, n, w)
        inside = (pw >= 0) & (pw < c)
        lat = torch.arange(n, device=z.device).view(1, n, 1)
        win = z[ctx.unsqueeze(-1), pw.clamp(0, c - 1), lat] * inside
        all_vals = torch.cat([self.vals, vals])
        self.vals, sel = all_vals.topk(self.k, dim=0)
        self.where = torch.cat([self.where, idx + first_flat]).gather(0, sel)
        all_win = torch.cat([self.win, win])
        self.win = all_win.gather(0, sel.unsqueeze(-1).expand(-1, -1, all_win.shape[-1]))


@torch.no_grad()
def _scan(
    model: nn.Module,
    sae: Any,
    point: str,
    tokens: Tensor,
    tracked: Tensor | None,
    top_contexts: int,
    window: tuple[int, int],
    batch_contexts: int,
    massive_factor: float | None,
    drop_bos: bool,
    progress: bool,
) -> dict[str, Any]:
    """One pass over ``tokens``: latent statistics and streaming top contexts."""
    n_ctx, c = tokens.shape
    d_sae = int(sae.W_dec.shape[0])
    s_dev, s_dtype = sae.W_dec.device, sae.W_dec.dtype
    m_dev = _device_of(model)
    n_track = d_sae if tracked is None else int(tracked.numel())
    idx = None if tracked is None else tracked.to(s_dev)
    top = _TopK(top_contexts, n_track, window[0], window[1], s_dev)
    counts = torch.zeros(d_sae, dtype=torch.long, device=s_dev)
    sums = torch.zeros(n_track, dtype=torch.float64, device=s_dev)
    hist = torch.zeros(n_track * HIST_BINS, dtype=torch.long, device=s_dev)
    n_pos = n_massive = 0
    positions = MassiveFilter(massive_factor, drop_bos=drop_bos)  # medians: the first batch
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=tokens.numel(), unit="tok", desc="feature browser", leave=False)
    with capture(model, point, stop_early=True) as acts:
        for start in range(0, n_ctx, batch_contexts):
            chunk = tokens[start : start + batch_contexts]
            acts.run(input_ids=chunk.to(m_dev), use_cache=False)
            x = acts[point]
            if x.dim() != 3 or x.shape[:2] != chunk.shape:
                raise ValueError(
                    f"the activation at {point!r} has shape {tuple(x.shape)}; expected "
                    f"({chunk.shape[0]}, {c}, d) for {chunk.shape[0]} contexts of {c} tokens"
                )
            if not torch.isfinite(x).all():
                raise ValueError(f"the model's activation at {point!r} holds NaN or inf")
            x = x.to(device=s_dev, dtype=s_dtype)
            keep = positions.keep_positions({point: x})
            n_massive += keep.numel() - int(keep.sum()) - (chunk.shape[0] if drop_bos else 0)
            n_pos += int(keep.sum())
            z = sae.encode(x).float() * keep.unsqueeze(-1)
            counts += (z != 0).sum(dim=(0, 1))
            zt = z if idx is None else z.index_select(-1, idx)
            sums += zt.sum(dim=(0, 1), dtype=torch.float64)
            top.update(zt, start * c)
            rows, cols = (zt.reshape(-1, n_track) > 0).nonzero(as_tuple=True)
            if rows.numel():
                v = zt.reshape(-1, n_track)[rows, cols]
                b = ((v.log10() - HIST_LOW) / HIST_STEP).floor().clamp(0, HIST_BINS - 1).long()
                hist.index_add_(0, cols * HIST_BINS + b, torch.ones_like(b))
            if bar is not None:
                bar.update(chunk.numel())
    if bar is not None:
        bar.close()
    if n_pos == 0:
        raise ValueError("no token positions left after dropping first and massive positions")
    return {
        "counts": counts.cpu(),
        "sums": sums.cpu(),
        "hist": hist.view(n_track, HIST_BINS).cpu(),
        "top_vals": top.vals.cpu(),
        "top_where": top.where.cpu(),
        "top_win": top.win.cpu(),
        "n_positions": n_pos,
        "n_massive": n_massive,
        "median_norm": None if positions.medians is None else positions.medians[point],
    }


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
def _logit_effects(
    model: nn.Module, sae: Any, latents: list[int], n: int = N_LOGITS
) -> tuple[list[dict[str, list]] | None, str]:
    """Top ``n`` promoted and suppressed token ids and values per latent, and how computed."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    W_U = getattr(head, "weight", None)
    d_in = int(sae.W_dec.shape[1])
    if not isinstance(W_U, Tensor) or W_U.dim() != 2 or W_U.shape[1] != d_in:
        shape = None if not isinstance(W_U, Tensor) else tuple(W_U.shape)
        return None, (
            f"no logit effects: the model's unembedding (get_output_embeddings().weight, shape "
            f"{shape}) does not match the SAE's d_in={d_in}"
        )
    dev = W_U.device
    W_dec = sae.W_dec.detach()[torch.as_tensor(latents, dtype=torch.long)].to(dev, torch.float32)
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


# ---------------------------------------------------------------------------------------------
# the page
# ---------------------------------------------------------------------------------------------


def _pairs(ids: Tensor, values: Tensor) -> list[list]:
    return [[int(i), _round(v)] for i, v in zip(ids.tolist(), values.tolist(), strict=True)]


def _round(v: float, digits: int = 4) -> float:
    """``v`` to ``digits`` significant digits (keeps the embedded JSON small)."""
    return float(f"{v:.{digits}g}")


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


def _script_json(obj: Any) -> str:
    """JSON that is safe inside a ``<script>`` element: no ``<``, ``>``, ``&`` or line
    separators appear literally (they are ``\\uXXXX`` escapes, valid only inside strings)."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for ch in ("&", "<", ">", "\u2028", "\u2029"):
        text = text.replace(ch, f"\\u{ord(ch):04x}")
    return text


def read_browser_data(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The data embedded in a page written by :func:`feature_browser` (a dict; see there)."""
    text = Path(path).read_text(encoding="utf-8")
    m = re.search(
        rf'<script id="{_DATA_ID}" type="application/json">(.*?)</script>', text, re.DOTALL
    )
    if m is None:
        raise ValueError(f"{path} holds no feature-browser data (not written by feature_browser?)")
    return json.loads(m.group(1))


def feature_browser(
    model: nn.Module,
    tokenizer: Any,
    sae: Any,
    hookpoint: str,
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
    progress: bool = False,
) -> Path:
    """Write a static HTML page showing what the latents of ``sae`` respond to; return its path.

    ``model`` is run once over ``tokens`` (``(n_contexts, context_size)`` ids), ``batch_contexts``
    contexts per forward, stopped right after ``hookpoint`` (:func:`sparsecode.hooks.capture`);
    the activations there are encoded with ``sae.encode`` (any object with ``encode`` and a
    ``W_dec`` of shape ``(d_sae, d_in)``, e.g. :class:`sae.models.SAE`). Positions left out, as
    for training: position 0 of every context (the BOS / attention sink) when ``drop_bos``, and
    with ``massive_factor`` set the massive-norm positions, those whose norm exceeds
    ``massive_factor`` times the median norm of the first batch (:func:`sae.data.drop_massive`).
    They never count as top contexts, in densities or histograms, and show as 0 in windows.

    For every latent it records its density (fraction of kept positions where it is nonzero);
    for the latents shown also the ``top_contexts`` positions of largest activation (streaming
    top-k, memory independent of the token count) with a window of ``window = (before, after)``
    tokens of the same context around each, the latent's activations over that window, the mean
    activation where it fires, a histogram of its nonzero activations (log10-spaced bins), and
    its direct logit effects (top 10 promoted and suppressed tokens of ``W_dec[j] * gamma @
    W_U^T``, ``W_U = model.get_output_embeddings().weight``, ``gamma`` the final norm's weight).

    ``info`` adds rows to the page's header (an entry ``"model"`` names the model).
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
    d_sae = int(W_dec.shape[0])
    tracked = None
    if latents is not None:
        chosen = list(dict.fromkeys(int(j) for j in latents))
        bad = [j for j in chosen if not 0 <= j < d_sae]
        if not chosen or bad:
            raise ValueError(f"latents must be indices in [0, {d_sae}); got {list(latents)}")
        tracked = torch.as_tensor(chosen, dtype=torch.long)
    point = _one_point(model, hookpoint)
    tokens = tokens.long()
    was_training = getattr(sae, "training", False)
    if was_training:
        sae.eval()
    try:
        scan = _scan(
            model,
            sae,
            point,
            tokens,
            tracked,
            top_contexts,
            (before, after),
            batch_contexts,
            massive_factor,
            drop_bos,
            progress,
        )
    finally:
        if was_training:
            sae.train()
    n_pos = scan["n_positions"]
    density = scan["counts"].double() / n_pos
    if tracked is None:
        shown = select_latents(density, n_latents)
        col = {j: j for j in shown}
        selection = (
            f"{len(shown)} latents chosen by density: the most frequent half of those that fire "
            f"and are not dense (density <= {DENSE_THRESHOLD:.0%}), and a spread of rarer ones"
        )
    else:
        shown = tracked.tolist()
        col = {j: i for i, j in enumerate(shown)}
        selection = f"{len(shown)} latents chosen by the caller"
    logits, logit_note = _logit_effects(model, sae, shown) if shown else (None, "")

    ids: list[int] = []
    entries = []
    for r, j in enumerate(shown):
        t = col[j]
        ctxs = []
        for k in range(top_contexts):
            v = float(scan["top_vals"][k, t])
            if not v > 0:
                break
            flat = int(scan["top_where"][k, t])
            ci, p = divmod(flat, c)
            lo, hi = max(0, p - before), min(c, p + after + 1)
            tok = tokens[ci, lo:hi].tolist()
            acts = scan["top_win"][k, t, lo - (p - before) : hi - (p - before)].tolist()
            ids.extend(tok)
            ctxs.append(
                {
                    "c": ci,
                    "p": p,
                    "act": _round(v),
                    "start": lo,
                    "t": tok,
                    "a": [_round(a) if a else 0 for a in acts],
                }
            )
        count = int(scan["counts"][j])
        h = scan["hist"][t]
        nz = h.nonzero().flatten()
        hist = {"lo": HIST_LOW, "step": HIST_STEP, "counts": []}
        if nz.numel():
            a, b = int(nz[0]), int(nz[-1])
            hist = {
                "lo": _round(HIST_LOW + a * HIST_STEP),
                "step": HIST_STEP,
                "counts": h[a : b + 1].tolist(),
            }
        entry = {
            "id": int(j),
            "density": float(density[j]),
            "count": count,
            "max": ctxs[0]["act"] if ctxs else 0.0,
            "mean": _round(float(scan["sums"][t]) / count) if count else 0.0,
            "hist": hist,
            "logits": None if logits is None else logits[r],
            "contexts": ctxs,
        }
        if logits is not None:
            ids.extend(i for side in ("pos", "neg") for i, _ in logits[r][side])
        entries.append(entry)

    info = {str(k): str(v) for k, v in (info or {}).items()}
    model_name = (
        info.pop("model", None)
        or getattr(getattr(model, "config", None), "_name_or_path", None)
        or type(model).__name__
    )
    dh = density_histogram(density.float())
    cfg = getattr(sae, "cfg", None)
    excluded = []
    if drop_bos:
        excluded.append(f"position 0 of every context ({n_ctx} positions: BOS / attention sink)")
    if massive_factor is not None:
        excluded.append(
            f"{scan['n_massive']} massive-norm positions (norm > {massive_factor:g} x the median "
            f"norm {scan['median_norm']:.4g} of the first batch, as sae.data.drop_massive)"
        )
    meta = {
        "title": title or f"SAE feature browser \u2014 {model_name} @ {point}",
        "model": str(model_name),
        "hookpoint": point,
        "sae": {
            "class": type(sae).__name__,
            "architecture": getattr(cfg, "architecture", None),
            "d_in": int(W_dec.shape[1]),
            "d_sae": d_sae,
            "k": getattr(cfg, "k", None),
        },
        "info": info,
        "n_contexts": int(n_ctx),
        "context_size": int(c),
        "n_tokens": int(tokens.numel()),
        "n_positions": n_pos,
        "n_excluded_bos": int(n_ctx) if drop_bos else 0,
        "n_excluded_massive": scan["n_massive"],
        "massive_factor": massive_factor,
        "median_norm": scan["median_norm"],
        "excluded": excluded,
        "window": [before, after],
        "top_contexts": top_contexts,
        "selection": selection,
        "logit_note": logit_note,
        "n_dead": int((density == 0).sum()),
        "n_dense": int((density > DENSE_THRESHOLD).sum()),
        "dense_threshold": DENSE_THRESHOLD,
    }
    data = {
        "meta": meta,
        "vocab": _token_texts(tokenizer, ids),
        "density_hist": {"edges": dh["edges"], "counts": [int(x) for x in dh["counts"]]},
        "latents": entries,
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(_page(data), encoding="utf-8")
    os.replace(tmp, out)
    return out


def _page(data: dict[str, Any]) -> str:
    meta = data["meta"]
    e = html.escape
    sae = meta["sae"]
    arch = f"{sae['architecture']} " if sae["architecture"] else ""
    k = f", k={sae['k']}" if sae["architecture"] == "topk" and sae["k"] else ""
    facts = [
        ("model", meta["model"]),
        ("hook point", meta["hookpoint"]),
        ("SAE", f"{arch}{sae['class']}, d_in={sae['d_in']}, d_sae={sae['d_sae']}{k}"),
        *meta["info"].items(),
        (
            "tokens",
            f"{meta['n_tokens']:,} ({meta['n_contexts']:,} contexts of {meta['context_size']}); "
            f"{meta['n_positions']:,} positions scored",
        ),
        ("left out", "; ".join(meta["excluded"]) or "nothing"),
        (
            "latents",
            f"{meta['n_dead']:,} dead and {meta['n_dense']:,} dense (> "
            f"{meta['dense_threshold']:.0%}) of {sae['d_sae']:,}",
        ),
    ]
    rows = "".join(f"<tr><th>{e(str(a))}</th><td>{e(str(b))}</td></tr>" for a, b in facts)
    notes = [
        "Left out everywhere (never a top context, not counted in densities or histograms, "
        "shown with activation 0): " + "; ".join(meta["excluded"]) + "."
        if meta["excluded"]
        else "No positions left out.",
        f"Shown: {meta['selection']}. Density = fraction of scored positions where the latent "
        "is nonzero.",
        f"Top contexts: the {meta['top_contexts']} positions of largest activation, with "
        f"{meta['window'][0]} tokens before and {meta['window'][1]} after (same context). Token "
        "shading is activation / the latent's max; hover a token for its value. \u21b5 is a "
        "newline, \u21e5 a tab, \u2423 marks leading and trailing spaces in token lists.",
        (meta["logit_note"] + ".") if meta["logit_note"] else "",
        "Activation histogram: nonzero activations in log10-spaced bins.",
    ]
    note_html = "".join(f"<li>{e(n)}</li>" for n in notes if n)
    return _TEMPLATE.format(
        title=e(meta["title"]),
        facts=rows,
        notes=note_html,
        data_id=_DATA_ID,
        data=_script_json(data),
        css=_CSS,
        js=_JS,
    )


_CSS = """
:root{--fg:#1d1d1f;--mut:#6b6b70;--bd:#dcdce0;--bg:#fff;--side:#f6f6f8;--hl:255,110,20;
--pos:#1a7f37;--neg:#c62828;--sel:#e8f0fe}
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);
background:var(--bg)}
header{padding:12px 20px;border-bottom:1px solid var(--bd)}
h1{font-size:18px;margin:0 0 6px}
h2{font-size:17px;margin:0 0 4px}
h3{font-size:13px;margin:14px 0 6px;text-transform:uppercase;letter-spacing:.04em;color:var(--mut)}
table.facts{border-collapse:collapse;font-size:13px}
table.facts th{text-align:left;font-weight:500;color:var(--mut);padding:0 12px 0 0;
vertical-align:top}
details{margin-top:6px;font-size:13px;color:var(--mut)}
details ul{margin:4px 0;padding-left:20px}
#app{display:flex;align-items:flex-start}
nav{position:sticky;top:0;width:300px;flex:none;height:100vh;overflow:auto;background:var(--side);
border-right:1px solid var(--bd)}
nav .bar{padding:8px;position:sticky;top:0;background:var(--side);border-bottom:1px solid var(--bd)}
nav input{width:100%;padding:4px 6px;font:inherit}
table.idx{width:100%;border-collapse:collapse;font-size:13px;font-variant-numeric:tabular-nums}
table.idx th{position:sticky;top:45px;background:var(--side);cursor:pointer;text-align:right;
padding:4px 8px;font-weight:600;user-select:none;border-bottom:1px solid var(--bd)}
table.idx td{text-align:right;padding:2px 8px}
table.idx th:first-child,table.idx td:first-child{text-align:left}
table.idx tr.row{cursor:pointer}
table.idx tr.row:hover{background:#ececf0}
table.idx tr.cur{background:var(--sel)}
main{flex:1;min-width:0;padding:14px 22px 40px}
.stats{color:var(--mut);font-variant-numeric:tabular-nums}
.stats b{color:var(--fg);font-weight:600}
.charts{display:flex;gap:28px;flex-wrap:wrap}
.charts svg{display:block}
.axis{font-size:10px;fill:var(--mut)}
.logits{display:flex;gap:28px;flex-wrap:wrap}
.logits table{border-collapse:collapse;font-size:13px;font-variant-numeric:tabular-nums}
.logits td{padding:1px 8px 1px 0}
.logits .v{text-align:right}
.logits .pos .v{color:var(--pos)}
.logits .neg .v{color:var(--neg)}
.tt{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;white-space:pre;
background:#f1f1f4;border-radius:3px;padding:0 3px}
.ctx{display:flex;gap:10px;padding:3px 0;border-bottom:1px solid #f0f0f2;align-items:baseline}
.ctx .v{flex:none;width:64px;text-align:right;color:var(--mut);font-variant-numeric:tabular-nums;
font-size:12px}
.ctx .toks{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:13px;
white-space:pre-wrap;word-break:break-all}
.tok{border-radius:2px;padding:1px 0}
.tok:hover{outline:1px solid #555}
.tok.peak{outline:1.5px solid rgb(var(--hl));font-weight:600}
.ell{color:var(--mut)}
.empty{color:var(--mut);font-style:italic}
"""

_JS = r"""
(function () {
  "use strict";
  var D = JSON.parse(document.getElementById("browser-data").textContent);
  var V = D.vocab, L = D.latents, byId = {};
  L.forEach(function (l) { byId[l.id] = l; });
  var SVG = "http://www.w3.org/2000/svg";

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function visible(s) {  // whitespace made visible
    return s.replace(/\r/g, "\u240d").replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5");
  }
  function tokenText(id) { var s = V[id]; return s === undefined ? "[" + id + "]" : s; }
  function listText(id) {  // token in a list: spaces at the ends shown as a visible mark
    var s = visible(tokenText(id));
    return s.replace(/^ +| +$/g, function (m) { return "\u2423".repeat(m.length); }) || "\u2205";
  }
  function num(x) {
    if (x === 0) return "0";
    var a = Math.abs(x);
    if (a >= 1e4 || a < 1e-3) return x.toExponential(2);
    return x.toPrecision(a >= 100 ? 4 : 3);
  }
  function pct(d) {
    if (d === 0) return "0";
    return d >= 0.01 ? (100 * d).toFixed(2) + "%" : (100 * d).toPrecision(2) + "%";
  }
  function svgEl(tag, attrs) {
    var e = document.createElementNS(SVG, tag);
    for (var k in attrs) e.setAttribute(k, attrs[k]);
    return e;
  }
  function bars(counts, lo, hi, label, marker, color) {
    var w = 300, h = 90, pad = 16, n = counts.length;
    var s = svgEl("svg", {width: w, height: h + pad + 14, role: "img", "aria-label": label});
    var max = Math.max.apply(null, counts.concat([1]));
    var bw = (w - 2) / Math.max(n, 1);
    counts.forEach(function (c, i) {
      var bh = c ? Math.max(1, (h * c) / max) : 0;
      var r = svgEl("rect", {x: 1 + i * bw, y: h - bh, width: Math.max(bw - 1, 1), height: bh,
                             fill: color});
      var t = svgEl("title", {});
      t.textContent = c + "";
      r.appendChild(t);
      s.appendChild(r);
    });
    s.appendChild(svgEl("line", {x1: 0, x2: w, y1: h + 0.5, y2: h + 0.5, stroke: "#999"}));
    if (marker !== null && marker !== undefined && n) {
      var x = 1 + Math.min(Math.max(marker, 0), 1) * (w - 2);
      s.appendChild(svgEl("line", {x1: x, x2: x, y1: 0, y2: h, stroke: "#c62828",
                                   "stroke-width": 2}));
    }
    [[lo, "start"], [hi, "end"]].forEach(function (p, i) {
      var t = svgEl("text", {x: i ? w : 0, y: h + 12, "text-anchor": p[1], class: "axis"});
      t.textContent = p[0];
      s.appendChild(t);
    });
    var t = svgEl("text", {x: w / 2, y: h + pad + 10, "text-anchor": "middle", class: "axis"});
    t.textContent = label;
    s.appendChild(t);
    return s;
  }

  // ------------------------------------------------------------------ index
  var sortKey = null, sortDir = 1, cur = null;
  var tbody = document.querySelector("#index tbody");
  var filter = document.getElementById("filter");
  function drawIndex() {
    var rows = L.slice();
    if (sortKey) rows.sort(function (a, b) { return sortDir * (a[sortKey] - b[sortKey]); });
    var q = filter.value.trim();
    tbody.textContent = "";
    rows.forEach(function (l) {
      if (q && String(l.id).indexOf(q) < 0) return;
      var tr = el("tr", "row" + (l.id === cur ? " cur" : ""));
      tr.dataset.latent = l.id;
      tr.appendChild(el("td", null, l.id));
      tr.appendChild(el("td", null, pct(l.density)));
      tr.appendChild(el("td", null, num(l.max)));
      tr.addEventListener("click", function () { location.hash = "latent-" + l.id; });
      tbody.appendChild(tr);
    });
  }
  document.querySelectorAll("#index th").forEach(function (th) {
    th.addEventListener("click", function () {
      var k = th.dataset.key;
      sortDir = sortKey === k ? -sortDir : (k === "id" ? 1 : -1);
      sortKey = k;
      drawIndex();
    });
  });
  filter.addEventListener("input", drawIndex);

  // ------------------------------------------------------------------ one latent
  function contextRow(l, c) {
    var row = el("div", "ctx");
    row.dataset.ctx = c.c + ":" + c.p;
    row.dataset.act = c.act;
    row.appendChild(el("span", "v", num(c.act)));
    var toks = el("span", "toks");
    if (c.start > 0) toks.appendChild(el("span", "ell", "\u2026"));
    c.t.forEach(function (id, i) {
      var a = c.a[i], pos = c.start + i;
      var s = el("span", "tok" + (pos === c.p ? " peak" : ""), visible(tokenText(id)));
      var alpha = l.max > 0 ? Math.min(1, Math.max(0, a / l.max)) : 0;
      if (alpha > 0) s.style.background = "rgba(var(--hl)," + alpha.toFixed(3) + ")";
      s.title = JSON.stringify(tokenText(id)) + "  activation " + num(a) +
        "  (position " + pos + ")";
      s.dataset.act = a;
      toks.appendChild(s);
    });
    row.appendChild(toks);
    return row;
  }
  function logitTable(list, cls, head) {
    var box = el("div", cls);
    box.appendChild(el("h3", null, head));
    var t = el("table");
    list.forEach(function (p) {
      var tr = el("tr");
      var td = el("td");
      td.appendChild(el("span", "tt", listText(p[0])));
      tr.appendChild(td);
      tr.appendChild(el("td", "v", (p[1] > 0 ? "+" : "") + num(p[1])));
      t.appendChild(tr);
    });
    box.appendChild(t);
    return box;
  }
  function show(id) {
    var l = byId[id];
    if (!l) { l = L[0]; if (!l) return; }
    cur = l.id;
    var m = document.getElementById("detail");
    m.textContent = "";
    m.dataset.latent = l.id;
    m.appendChild(el("h2", null, "Latent " + l.id));
    var st = el("div", "stats");
    [["density ", pct(l.density) + (l.density > 0 ? " (1 in " + num(1 / l.density) + ")" : "")],
     ["  \u00b7  fires on ", l.count.toLocaleString() + " positions"],
     ["  \u00b7  max ", num(l.max)], ["  \u00b7  mean when active ", num(l.mean)]]
      .forEach(function (p) { st.append(p[0]); st.appendChild(el("b", null, p[1])); });
    m.appendChild(st);

    var charts = el("div", "charts");
    var h = l.hist, hc = el("div");
    hc.appendChild(el("h3", null, "Activation histogram"));
    if (h.counts.length) {
      var top = h.lo + h.step * h.counts.length;
      hc.appendChild(bars(h.counts, num(Math.pow(10, h.lo)), num(Math.pow(10, top)),
                          "activation (log scale)", null, "rgb(255,110,20)"));
    } else hc.appendChild(el("div", "empty", "never fires"));
    charts.appendChild(hc);
    var dh = D.density_hist, dc = el("div");
    dc.appendChild(el("h3", null, "Density among all latents"));
    var e0 = dh.edges[0], e1 = dh.edges[dh.edges.length - 1];
    var mk = l.density > 0 ? (Math.log10(l.density) - e0) / (e1 - e0) : null;
    dc.appendChild(bars(dh.counts, "1e" + e0, "1", "log10 density (this latent in red)", mk,
                        "#8a8fa3"));
    charts.appendChild(dc);
    m.appendChild(charts);

    if (l.logits) {
      var lg = el("div", "logits");
      lg.appendChild(logitTable(l.logits.pos, "pos", "Promoted tokens"));
      lg.appendChild(logitTable(l.logits.neg, "neg", "Suppressed tokens"));
      m.appendChild(lg);
    }
    m.appendChild(el("h3", null, "Top contexts"));
    var box = el("div", "contexts");
    if (!l.contexts.length) box.appendChild(el("div", "empty", "no activating positions"));
    l.contexts.forEach(function (c) { box.appendChild(contextRow(l, c)); });
    m.appendChild(box);
    drawIndex();
    var r = tbody.querySelector("tr.cur");
    if (r && document.readyState === "complete") r.scrollIntoView({block: "nearest"});
  }
  function fromHash() {
    var m = /^#latent-(\d+)$/.exec(location.hash);
    show(m ? Number(m[1]) : (L.length ? L[0].id : null));
  }
  window.addEventListener("hashchange", fromHash);
  document.addEventListener("keydown", function (ev) {
    if (ev.target === filter || !L.length) return;
    var rows = Array.prototype.slice.call(tbody.querySelectorAll("tr.row"));
    var i = rows.findIndex(function (r) { return Number(r.dataset.latent) === cur; });
    var step = {j: 1, ArrowDown: 1, k: -1, ArrowUp: -1}[ev.key];
    if (!step || !rows.length) return;
    var nx = rows[Math.min(rows.length - 1, Math.max(0, i + step))];
    location.hash = "latent-" + nx.dataset.latent;
    ev.preventDefault();
  });
  document.getElementById("count").textContent = L.length + " latents";
  fromHash();
})();
"""

_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy"
 content="default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:">
<title>{title}</title>
<style>{css}</style>
</head>
<body>
<header>
<h1>{title}</h1>
<table class="facts">{facts}</table>
<details><summary>How to read this page</summary><ul>{notes}</ul></details>
</header>
<noscript><p>This page draws the latents with JavaScript; the data is in the file as JSON.</p>
</noscript>
<div id="app">
<nav id="index"><div class="bar"><input id="filter" type="search" placeholder="latent id"
 aria-label="filter latents"> <small id="count"></small></div>
<table class="idx"><thead><tr><th data-key="id">latent</th><th data-key="density">density</th>
<th data-key="max">max act</th></tr></thead><tbody></tbody></table></nav>
<main id="detail"></main>
</div>
<script id="{data_id}" type="application/json">{data}</script>
<script>{js}</script>
</body>
</html>
"""


# ---------------------------------------------------------------------------------------------
# L0 vs FVU
# ---------------------------------------------------------------------------------------------


def _has_metrics(folder: Path) -> bool:
    try:
        m = json.loads((folder / "metrics.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(m, dict) and "l0" in m and "fvu" in m


def _architecture(folder: Path) -> str:
    try:
        cfg = json.loads((folder / "cfg.json").read_text())
    except (OSError, ValueError):
        return "?"
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    ours = meta.get("sparsecode") if isinstance(meta.get("sparsecode"), dict) else {}
    for value in (
        ours.get("architecture"),
        meta.get("sparsecode_architecture"),
        meta.get("training_architecture"),
        meta.get("architecture"),
        cfg.get("architecture"),
    ):
        if isinstance(value, str) and value:
            return value
    return "?"


def l0_fvu_points(runs: Sequence[str | os.PathLike[str]]) -> list[dict[str, Any]]:
    """One record per SAE folder with a ``metrics.json`` (``l0`` and ``fvu``) under ``runs``.

    Each entry of ``runs`` is an SAE folder itself or a run folder whose subfolders are SAE
    folders. Records: ``run``, ``name``, ``label`` (``run/name``), ``architecture`` (from
    ``cfg.json``: ``metadata.sparsecode.architecture``, ``metadata.sparsecode_architecture``,
    ``metadata.training_architecture``, ``metadata.architecture`` or ``architecture``), ``l0``,
    ``fvu``, ``path``. Raises ``FileNotFoundError`` when no metrics are found.
    """
    if isinstance(runs, (str, os.PathLike)):
        runs = [runs]
    points: list[dict[str, Any]] = []
    seen: set[Path] = set()
    for run in runs:
        path = Path(run)
        if not path.exists():
            raise FileNotFoundError(f"no such run or SAE folder: {path}")
        if _has_metrics(path):
            folders, run_name = [path], path.resolve().parent.name
        else:
            metrics = sorted(path.glob("*/metrics.json"))
            folders = [p.parent for p in metrics if _has_metrics(p.parent)]
            run_name = path.resolve().name
        for folder in folders:
            if folder.resolve() in seen:
                continue
            seen.add(folder.resolve())
            m = json.loads((folder / "metrics.json").read_text())
            points.append(
                {
                    "run": run_name,
                    "name": folder.name,
                    "label": f"{run_name}/{folder.name}",
                    "architecture": _architecture(folder),
                    "l0": float(m["l0"]),
                    "fvu": float(m["fvu"]),
                    "path": str(folder),
                }
            )
    if not points:
        where = ", ".join(str(r) for r in runs) or "(no folders given)"
        raise FileNotFoundError(
            f"no metrics.json with l0 and fvu in {where} or their subfolders; train with "
            "`sae train`, which writes one into every SAE folder"
        )
    return points


def l0_fvu_plot(
    runs: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str] = "l0_fvu.png",
    *,
    title: str | None = None,
    annotate: bool = True,
) -> Path:
    """Scatter L0 (x, log scale) against FVU (y) for every SAE under ``runs``; write a PNG.

    Points come from :func:`l0_fvu_points`, are coloured by architecture (points of one
    architecture joined in order of L0) and labelled ``run/name``. The plotted records are also
    stored as JSON in the PNG's ``Description`` text chunk. Points with L0 <= 0 cannot sit on a
    log axis and are left out with a warning. Returns the path of the PNG.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    points = l0_fvu_points(runs)
    bad = [p["label"] for p in points if not (p["l0"] > 0 and math.isfinite(p["fvu"]))]
    if bad:
        warnings.warn(f"left out (L0 <= 0 or FVU not finite): {', '.join(bad)}", stacklevel=2)
    points = [p for p in points if p["label"] not in bad]
    if not points:
        raise ValueError("no SAE with L0 > 0 and a finite FVU to plot")
    fig = Figure(figsize=(7.5, 5.0), dpi=120, layout="constrained")
    ax = fig.subplots()
    archs = list(dict.fromkeys(p["architecture"] for p in points))
    colors = matplotlib.colormaps["tab10"]
    for i, arch in enumerate(archs):
        ps = sorted((p for p in points if p["architecture"] == arch), key=lambda p: p["l0"])
        xs, ys = [p["l0"] for p in ps], [p["fvu"] for p in ps]
        color = colors(i % 10)
        if len(ps) > 1:
            ax.plot(xs, ys, color=color, alpha=0.35, lw=1)
        ax.scatter(xs, ys, color=color, s=36, label=f"{arch} ({len(ps)})", zorder=3)
        if annotate:
            for p in ps:
                ax.annotate(
                    p["label"],
                    (p["l0"], p["fvu"]),
                    textcoords="offset points",
                    xytext=(4, 3),
                    fontsize=7,
                    color=color,
                )
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.LogFormatter())  # labels when < 1 decade
    ax.set_xlabel("L0 (mean active latents per token, log scale)")
    ax.set_ylabel("FVU (fraction of variance unexplained)")
    ax.set_title(title or f"L0 vs FVU: {len(points)} SAEs")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(title="architecture", fontsize=8)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    desc = json.dumps([{k: p[k] for k in ("label", "architecture", "l0", "fvu")} for p in points])
    fig.savefig(
        out, format="png", metadata={"Software": "sparsecode sae.browser", "Description": desc}
    )
    return out
