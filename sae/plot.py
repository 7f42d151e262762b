"""L0 against FVU, or against any other metric, for the SAEs of one or more training runs
(``sae plot``): the sparsity / quality frontiers that SAE architectures are compared on."""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["metric_plot", "metric_points", "metric_values"]


def _read(path: Path) -> dict[str, Any]:
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return m if isinstance(m, dict) else {}


def metric_values(folder: str | os.PathLike[str]) -> dict[str, float]:
    """Every number measured for the SAE in ``folder``: its ``metrics.json`` (training's held-out
    metrics), then the metrics of its ``sae eval --suite`` results
    (``eval_results/<type>/<run>_<name>_eval_results.json``), each as ``<type>.<metric>`` and,
    where no earlier source has the name, as ``<metric>``."""
    from .evals.suite import _number, result_path

    folder = Path(folder)
    out = {k: float(v) for k, v in _read(folder / "metrics.json").items() if _number(v)}
    for path in sorted(folder.glob(str(result_path(folder).relative_to(folder)))):
        doc = _read(path)
        for category in (doc.get("eval_result_metrics") or {}).values():
            for k, v in (category.items() if isinstance(category, dict) else ()):
                if _number(v):
                    out[f"{path.parent.name}.{k}"] = float(v)
                    out.setdefault(k, float(v))
    return out


def _has_metrics(folder: Path, metric: str = "fvu") -> bool:
    values = metric_values(folder)
    return "l0" in values and metric in values


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


def metric_points(runs: Sequence[str | os.PathLike[str]], metric: str = "fvu"
                  ) -> list[dict[str, Any]]:
    """One record per SAE folder under ``runs`` with an ``l0`` and ``metric``
    (:func:`metric_values`).

    Each entry of ``runs`` is an SAE folder itself or a run folder whose subfolders are SAE
    folders. Records: ``run``, ``name``, ``label`` (``run/name``), ``architecture`` (from
    ``cfg.json``: ``metadata.sparsecode.architecture``, ``metadata.sparsecode_architecture``,
    ``metadata.training_architecture``, ``metadata.architecture`` or ``architecture``), ``l0``,
    ``metric``'s value under its name, ``path``. Raises ``FileNotFoundError`` when none has
    them.
    """
    if isinstance(runs, (str, os.PathLike)):
        runs = [runs]
    points: list[dict[str, Any]] = []
    seen: set[Path] = set()
    for run in runs:
        path = Path(run)
        if not path.exists():
            raise FileNotFoundError(f"no such run or SAE folder: {path}")
        if _has_metrics(path, metric):
            folders, run_name = [path], path.resolve().parent.name
        else:
            folders = [p for p in sorted(path.iterdir()) if p.is_dir() and _has_metrics(p, metric)]
            run_name = path.resolve().name
        for folder in folders:
            if folder.resolve() in seen:
                continue
            seen.add(folder.resolve())
            m = metric_values(folder)
            points.append(
                {
                    "run": run_name,
                    "name": folder.name,
                    "label": f"{run_name}/{folder.name}",
                    "architecture": _architecture(folder),
                    "l0": float(m["l0"]),
                    metric: m[metric],
                    "path": str(folder),
                }
            )
    if not points:
        where = ", ".join(str(r) for r in runs) or "(no folders given)"
        raise FileNotFoundError(
            f"no metrics.json with l0 and {metric} in {where} or their subfolders; train with "
            "`sae train`, which writes one into every SAE folder (and `sae eval --suite` for "
            "the eval metrics)"
        )
    return points


def metric_plot(
    runs: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str] = "l0_fvu.png",
    *,
    metric: str = "fvu",
    title: str | None = None,
    annotate: bool = True,
) -> Path:
    """Scatter L0 (x, log scale) against ``metric`` (y; FVU by default, or any name of
    :func:`metric_values`, e.g. ``mean_absorption_fraction_score``) for every SAE under
    ``runs``; write a PNG.

    Points come from :func:`metric_points`, are coloured by architecture (points of one
    architecture joined in order of L0) and labelled ``run/name``. The plotted records are also
    stored as JSON in the PNG's ``Description`` text chunk. Points with L0 <= 0 cannot sit on a
    log axis and are left out with a warning. Returns the path of the PNG.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    points = metric_points(runs, metric)
    bad = [p["label"] for p in points if not (p["l0"] > 0 and math.isfinite(p[metric]))]
    if bad:
        warnings.warn(f"left out (L0 <= 0 or {metric} not finite): {', '.join(bad)}",
                      stacklevel=2)
    points = [p for p in points if p["label"] not in bad]
    if not points:
        raise ValueError(f"no SAE with L0 > 0 and a finite {metric} to plot")
    fig = Figure(figsize=(7.5, 5.0), dpi=120, layout="constrained")
    ax = fig.subplots()
    archs = list(dict.fromkeys(p["architecture"] for p in points))
    colors = matplotlib.colormaps["tab10"]
    for i, arch in enumerate(archs):
        ps = sorted((p for p in points if p["architecture"] == arch), key=lambda p: p["l0"])
        xs, ys = [p["l0"] for p in ps], [p[metric] for p in ps]
        color = colors(i % 10)
        if len(ps) > 1:
            ax.plot(xs, ys, color=color, alpha=0.35, lw=1)
        ax.scatter(xs, ys, color=color, s=36, label=f"{arch} ({len(ps)})", zorder=3)
        if annotate:
            for p in ps:
                ax.annotate(
                    p["label"],
                    (p["l0"], p[metric]),
                    textcoords="offset points",
                    xytext=(4, 3),
                    fontsize=7,
                    color=color,
                )
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.LogFormatter())  # labels when < 1 decade
    ax.set_xlabel("L0 (mean active latents per token, log scale)")
    ax.set_ylabel("FVU (fraction of variance unexplained)" if metric == "fvu" else metric)
    ax.set_title(title or f"L0 vs {metric}: {len(points)} SAEs")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(title="architecture", fontsize=8)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    desc = json.dumps([{k: p[k] for k in ("label", "architecture", "l0", metric)} for p in points])
    fig.savefig(
        out, format="png", metadata={"Software": "sparsecode sae.browser", "Description": desc}
    )
    return out
