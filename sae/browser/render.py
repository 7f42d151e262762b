"""The feature browser's HTML: one self-contained file from the page data (template, CSS and
JavaScript are package files, read with :mod:`importlib.resources`), and the data read back."""

from __future__ import annotations

import functools
import html
import json
import os
import re
from importlib import resources
from pathlib import Path
from typing import Any

_DATA_ID = "browser-data"


@functools.cache
def _asset(name: str) -> str:
    return resources.files(__package__).joinpath("static", name).read_text(encoding="utf-8")


def _script_json(obj: Any) -> str:
    """JSON that is safe inside a ``<script>`` element: no ``<``, ``>``, ``&`` or line
    separators appear literally (they are ``\\uXXXX`` escapes, valid only inside strings)."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for ch in ("&", "<", ">", "\u2028", "\u2029"):
        text = text.replace(ch, f"\\u{ord(ch):04x}")
    return text


def _facts(meta: dict[str, Any]) -> list[tuple[str, str]]:
    sae = meta["sae"]
    arch = f"{sae['architecture']} " if sae["architecture"] else ""
    k = f", k={sae['k']}" if sae["k"] else ""
    return [
        ("model", meta["model"]),
        ("hook point", meta["hookpoint"]),
        ("SAE", f"{arch}{sae['class']}, d_in={sae['d_in']}, d_sae={sae['d_sae']}{k}"),
        *meta["info"].items(),
        ("tokens", f"{meta['n_tokens']:,} ({meta['n_contexts']:,} contexts of "
                   f"{meta['context_size']}); {meta['n_positions']:,} positions scored"),
        ("left out", "; ".join(meta["excluded"]) or "nothing"),
        ("latents", f"{meta['n_dead']:,} dead and {meta['n_dense']:,} dense (> "
                    f"{meta['dense_threshold']:.0%}) of {sae['d_sae']:,}"),
    ]


def _notes(meta: dict[str, Any]) -> list[str]:
    excluded = meta["excluded"]
    return [
        "Left out everywhere (never a top context, not counted in densities or histograms, "
        "shown with activation 0): " + "; ".join(excluded) + "."
        if excluded else "No positions left out.",
        f"Shown: {meta['selection']}. Density = fraction of scored positions where the latent "
        "is nonzero.",
        f"Top contexts: the {meta['top_contexts']} positions of largest activation, with "
        f"{meta['window'][0]} tokens before and {meta['window'][1]} after (same context). Token "
        "shading is activation / the latent's max; hover a token for its value. \u21b5 is a "
        "newline, \u21e5 a tab, \u2423 marks leading and trailing spaces in token lists.",
        (meta["logit_note"] + ".") if meta["logit_note"] else "",
        "Activation histogram: nonzero activations in log10-spaced bins.",
    ]


def render(data: dict[str, Any]) -> str:
    """The page (one HTML file, no network requests) for the data of ``feature_browser``."""
    e = html.escape
    meta = data["meta"]
    rows = "".join(f"<tr><th>{e(str(a))}</th><td>{e(str(b))}</td></tr>" for a, b in _facts(meta))
    notes = "".join(f"<li>{e(n)}</li>" for n in _notes(meta) if n)
    return _asset("page.html").format(
        title=e(meta["title"]), facts=rows, notes=notes, data_id=_DATA_ID,
        data=_script_json(data), css=_asset("page.css"), js=_asset("page.js"),
    )


def read_browser_data(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The data embedded in a page written by :func:`sae.browser.feature_browser`."""
    text = Path(path).read_text(encoding="utf-8")
    m = re.search(
        rf'<script id="{_DATA_ID}" type="application/json">(.*?)</script>', text, re.DOTALL
    )
    if m is None:
        raise ValueError(f"{path} holds no feature-browser data (not written by feature_browser?)")
    return json.loads(m.group(1))
