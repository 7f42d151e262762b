"""L0 against FVU for the SAEs of one or more training runs (``sae plot``): the sparsity /
reconstruction frontier that SAE architectures are compared on."""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["l0_fvu_plot", "l0_fvu_points"]


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
