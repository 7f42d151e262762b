"""The eval suite on trained SAEs: time per eval and every metric, per architecture.

What it measures
----------------
Runs ``sae eval RUN --suite all`` (the CLI, in this process, ``--threads`` torch threads) on
each run folder given, timing the call, then reads the SAEBench-layout JSON files the suite
wrote into every SAE folder (``eval_results/<type>/<run>_<name>_eval_results.json``) and
tabulates, per SAE: the seconds each eval took and its headline metrics (core: FVU, L0,
CE-loss recovered, KL score; absorption: mean absorption fraction, full-absorption score, split
features; splitting: split features, k=1 F1; probing: SAE top-1/top-5/all-latent accuracy and
the model's own top-1 and full accuracy). The SAEs are whatever the runs hold, e.g. the
default recipe for several architectures:

    sae train --arch topk,batchtopk,jumprelu,matryoshka,relu --out runs/five
    python benchmarks/bench_evals.py runs/five

Results go to ``benchmarks/results/evals-<cpu>-<threads>t.{json,md}`` (``--tag`` adds to the
stem). Run it on a quiet machine: the per-eval seconds are wall-clock.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    device_tag,
    format_table,
    git_commit,
    now_iso,
    pin_threads,
    write_results,
)

ROOT = Path(__file__).resolve().parents[1]

COLUMNS = [  # (header, eval type, metric)
    ("FVU", "core", "fvu"), ("L0", "core", "l0"), ("CE rec", "core", "ce_loss_score"),
    ("KL score", "core", "kl_div_score"),
    ("absorption", "absorption_first_letter", "mean_absorption_fraction_score"),
    ("full abs.", "absorption_first_letter", "mean_full_absorption_score"),
    ("split feats", "feature_splitting", "mean_num_split_features"),
    ("k=1 F1", "feature_splitting", "mean_f1_sparse_sae_1"),
    ("SAE top-1", "sparse_probing", "sae_top_1_test_accuracy"),
    ("SAE top-5", "sparse_probing", "sae_top_5_test_accuracy"),
    ("SAE all", "sparse_probing", "sae_test_accuracy"),
    ("LLM top-1", "sparse_probing", "llm_top_1_test_accuracy"),
    ("LLM all", "sparse_probing", "llm_test_accuracy"),
]
TYPES = ["core", "absorption_first_letter", "feature_splitting", "sparse_probing"]


def collect(run: Path) -> dict[str, dict]:
    """Per SAE folder of ``run``: its metrics (``sae.plot.metric_values``: ``<type>.<metric>``)
    and the seconds each eval took."""
    from sae.evals.suite import result_path
    from sae.plot import metric_values

    out = {}
    for cfg in sorted(run.glob("*/cfg.json")):
        folder = cfg.parent
        seconds = {path.parent.name: json.loads(path.read_text())["eval_result_unstructured"]
                   .get("seconds")
                   for path in folder.glob(str(result_path(folder).relative_to(folder)))}
        out[folder.name] = {"metrics": metric_values(folder), "seconds": seconds}
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run folders (SAE folders inside)")
    p.add_argument("--suite", default="all")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tag", default="")
    p.add_argument("--max-tokens", type=int, default=0,
                   help="held-out tokens for the core eval (0: all, as sae eval)")
    p.add_argument("--no-run", action="store_true", help="only tabulate existing results")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    threads = pin_threads(args.threads)
    from sae.cli import main as sae_main

    rows, data = [], {"when": now_iso(), "commit": git_commit(ROOT), "threads": threads,
                      "suite": args.suite, "max_tokens": args.max_tokens, "runs": {}}
    for run in map(Path, args.runs):
        wall = None
        if not args.no_run:
            start = time.perf_counter()
            rc = sae_main(["eval", str(run), "--suite", args.suite, "--no-progress",
                           "--max-tokens", str(args.max_tokens)])
            if rc:
                raise SystemExit(f"sae eval {run} failed ({rc})")
            wall = time.perf_counter() - start
        results = collect(run)
        data["runs"][str(run)] = {"wall_seconds": wall, "saes": results}
        for name, entry in results.items():
            m, s = entry["metrics"], entry["seconds"]
            rows.append([f"{run.name}/{name}"] + [
                _fmt(m.get(f"{t}.{k}")) for _, t, k in COLUMNS] + [
                "/".join(_fmt(s.get(t), 0) for t in TYPES)])
        print(f"{run}: sae eval --suite {args.suite} took "
              f"{'-' if wall is None else f'{wall:.0f} s'}")
    headers = ["SAE"] + [h for h, _, _ in COLUMNS] + ["s: core/abs/split/probe"]
    core_tokens = args.max_tokens or "all"
    lines = [f"# sae eval --suite {args.suite} ({threads} threads, {now_iso()}; core on "
             f"{core_tokens} held-out tokens)", "",
             format_table(headers, rows, markdown=True), ""]
    lines += [f"- {r}: whole call {v['wall_seconds']:.0f} s" for r, v in data["runs"].items()
              if v["wall_seconds"] is not None]
    stem = f"evals-{device_tag(threads)}" + (f"-{args.tag}" if args.tag else "")
    write_results(Path(args.out), stem, lines, data)


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


if __name__ == "__main__":
    main()
