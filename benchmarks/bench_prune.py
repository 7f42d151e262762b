"""Pruning benchmark: SmolLM2-135M (float32), every Linear of the 30 decoder blocks.

Calibration: ``--n-calib`` contexts of ``--seq-len`` tokens from the training part of the built-in
text (``split_texts(builtin_texts(), seed=0)[0]``, contexts drawn with a seeded permutation);
perplexity on ``--n-eval`` contexts of the held-out part (``split_texts(...)[1]``), disjoint
from the calibration text at the document level. Rows: dense, then magnitude, Wanda, SparseGPT,
``iht`` (least squares + IHT from the Wanda and SparseGPT masks), ``admm`` (the default: ADMM
on the layer problem with the core's projections, 8 iterations, N:M 6), ``alps`` (ADMM with ALPS'
adaptive penalty + CG refit) and, on request, greedy ``omp`` (unstructured settings only) at
each setting: 50%, 60%, 70% with OWL unstructured, 2:4 and 4:8.
Every pruning run starts from the same dense weights and is timed whole (calibration forwards
included, perplexity evaluation excluded). Results go to
``benchmarks/results/prune-<device>.{json,md}`` after every row.

    python benchmarks/bench_prune.py --n-eval 16     # the main table (~50 min, two threads)
    python benchmarks/bench_prune.py --methods iht,omp --settings 50%   # omp: ~40 min a row
    python benchmarks/bench_prune.py --settings 2:4 --methods sparsegpt,admm
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from common import ROOT, pin_threads

SETTINGS = {
    "50%": dict(sparsity=0.5, pattern="unstructured", allocation="uniform"),
    "60%": dict(sparsity=0.6, pattern="unstructured", allocation="uniform"),
    "70%+owl": dict(sparsity=0.7, pattern="unstructured", allocation="owl"),
    "2:4": dict(sparsity=None, pattern="2:4", allocation="uniform"),
    "4:8": dict(sparsity=None, pattern="4:8", allocation="uniform"),
}
METHODS = ["magnitude", "wanda", "sparsegpt", "iht", "admm", "alps"]
LABEL = {"magnitude": "magnitude", "wanda": "Wanda", "sparsegpt": "SparseGPT", "iht": "iht",
         "omp": "omp", "admm": "ours (admm, default)", "alps": "ALPS"}


def _fmt_err(e: float | None) -> str:
    """The mean layer error, or n/a (magnitude runs no calibration, so none is measured)."""
    return "n/a" if e is None or e != e else f"{e:.4f}"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n-calib", type=int, default=32)
    p.add_argument("--n-eval", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--iht-iter", type=int, default=5, help="IHT iterations of iht")
    p.add_argument("--cg-iter", type=int, default=30, help="least-squares CG iterations of iht")
    p.add_argument("--iht-init", default="wanda+sparsegpt",
                   help="starting mask(s) of iht: wanda, sparsegpt or wanda+sparsegpt")
    p.add_argument("--out", default=None, help="result file stem (default: prune-<device>)")
    p.add_argument("--resume", action="store_true",
                   help="keep the rows already in the result file and run only the missing ones")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    pin_threads(args.threads)
    import torch
    from common import (
        cpu_name,
        device_tag,
        format_table,
        git_commit,
        lm_contexts,
        now_iso,
        package_versions,
        write_json,
    )

    torch.set_num_threads(args.threads)
    from sparsecode.lm import load_model
    from sparsecode.prune import evaluate_perplexity, prune

    t0 = time.perf_counter()
    model, tok = load_model("smollm2", dtype=torch.float32)
    load_s = time.perf_counter() - t0
    calib, held_out = lm_contexts(tok, args.seq_len, args.n_calib)
    evals = held_out[: args.n_eval]
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    device = f"{cpu_name()} ({os.cpu_count()} cores)" if not torch.cuda.is_available() \
        else torch.cuda.get_device_name()
    stem = args.out or f"prune-{device_tag(args.threads)}"
    out_dir = ROOT / "benchmarks" / "results"
    meta = {
        "date": now_iso(), "device": device, "threads": args.threads,
        "versions": package_versions("torch", "transformers"), "git": git_commit(ROOT),
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1 de-quantised to float32)",
        "calibration": f"{len(calib)} x {args.seq_len} tokens of builtin_texts() training split",
        "evaluation": f"{len(evals)} x {args.seq_len} tokens of the held-out split "
                      f"(split_texts(seed=0)[1]; {len(held_out)} "
                      "contexts available)",
        "model_load_s": round(load_s, 1),
        "iht_options": {"max_iter": args.iht_iter, "cg_iter": args.cg_iter,
                        "init": args.iht_init},
        "command": "python benchmarks/bench_prune.py " + " ".join(argv or sys.argv[1:]),
    }
    rows: list[dict] = []

    def save() -> None:
        write_json(out_dir / f"{stem}.json", {"meta": meta, "rows": rows})
        headers = ["setting", "method", "perplexity", "x dense", "sparsity", "mean layer err",
                   "prune time [s]"]
        dense = next((r["perplexity"] for r in rows if r["method"] == "dense"), None)
        table = [[r["setting"], LABEL.get(r["method"], r["method"]), f"{r['perplexity']:.2f}",
                  f"{r['perplexity'] / dense:.2f}" if dense else "",
                  f"{r['sparsity']:.4f}", _fmt_err(r["mean_layer_error"]),
                  f"{r['seconds']:.1f}" if r["seconds"] is not None else ""] for r in rows]
        md = [f"# Pruning benchmark: {stem.removeprefix('prune-')}", ""]
        md += [f"- {k}: {v}" for k, v in meta.items()]
        md += ["", format_table(headers, table, markdown=True), "",
               "> perplexity: exp(mean next-token cross-entropy) on the held-out contexts. "
               "mean layer err: mean over the 210 Linears of ||X^T(W - W')||^2 / ||X^T W||^2 "
               "on the calibration inputs each layer saw. prune time: the whole `prune` call "
               "(sequential calibration forwards + the method), one run."]
        (out_dir / f"{stem}.md").write_text("\n".join(md) + "\n")
        print(format_table(headers, table), flush=True)

    previous = out_dir / f"{stem}.json"
    if args.resume and previous.exists():
        rows.extend(json.loads(previous.read_text())["rows"])
    done = {(r["setting"], r["method"]) for r in rows}
    if ("-", "dense") not in done:
        t0 = time.perf_counter()
        ppl = evaluate_perplexity(model, evals)
        rows.append({"setting": "-", "method": "dense", "perplexity": ppl, "sparsity": 0.0,
                     "mean_layer_error": None, "seconds": None,
                     "eval_s": round(time.perf_counter() - t0, 1)})
        save()
    for setting in args.settings.split(","):
        for method in args.methods.split(","):
            if method == "omp" and SETTINGS[setting]["pattern"] != "unstructured":
                continue  # greedy selection cannot honour N:M groups
            if (setting, method) in done:
                continue
            model.load_state_dict(dense_state)
            opts = {"max_iter": args.iht_iter, "cg_iter": args.cg_iter,
                    "init": tuple(args.iht_init.split("+"))} if method == "iht" else {}
            rep = prune(model, calib, method=method, **SETTINGS[setting], **opts)
            t0 = time.perf_counter()
            ppl = evaluate_perplexity(model, evals)
            errs = [r.error for r in rep.layers]
            rows.append({"setting": setting, "method": method, "perplexity": ppl,
                         "sparsity": rep.sparsity, "mean_layer_error": sum(errs) / len(errs),
                         "seconds": rep.seconds, "eval_s": round(time.perf_counter() - t0, 1),
                         "layers": [vars(r) for r in rep.layers]})
            save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
