"""Pursuit encoders and pursuit-trained dictionaries on real LLM activations (SmolLM2-135M).

What it measures
----------------
On the SmolLM2-135M layer-15 residual stream of ``bench_sae_train.py`` (an ``(N, 576)``
``.npy``; its last rows come from held-out documents), ``sae train --activations`` runs twice:

1. The amortisation gap: the default TopK SAE (9,216 latents, ``k`` = 32, 2M tokens, every
   setting our default) seen through each encoder of
   ``--encoders`` (``sae.encoders``: the trained one-step encoder, OMP and MP on the decoder at
   L0 32), on the held-out rows: FVU, L0, dead latents, the support agreement with the trained
   encoder (mean Jaccard per token) and the encode throughput (tokens/s of ``encode_pairs`` over
   the held-out rows in batches of 4,096); then, spliced into SmolLM2 at ``model.layers.15``
   over held-out text (``sae eval --model``): CE-loss recovered and KL.
2. The L0-FVU frontier: one run trains, on the same batches, an SAE per architecture
   (``--archs``, default ``topk,mp,online_dl``) and per ``k`` (``--ks``, default
   ``16,32,64``), 4,608 latents and 1M tokens (``--frontier-d-sae``, ``--frontier-tokens``:
   matching pursuit costs ``k`` passes over an ``(N, d_sae)`` array per batch, which on 2 CPU
   cores makes the default size an hour per SAE); FVU, L0 and dead latents per SAE on the
   held-out rows (the trainer's metrics), drawn by ``sae plot``.

    python benchmarks/smollm2_activations.py      # once: benchmarks/data/smollm2-l15.npy
    python benchmarks/bench_amortisation.py       # ~1 h on 2 CPU cores
    python benchmarks/bench_amortisation.py --quick   # smoke test (synthetic data)
    python benchmarks/bench_amortisation.py --sae RUN/topk --keep-frontier   # encoders again

``--sae`` measures the encoders of an already trained TopK folder instead of training one;
``--keep-frontier`` keeps the frontier (rows, time, date, commit) of the previous results file.

Results go to ``benchmarks/results/amortisation-<cpu>-<threads>t.{json,md}`` and the plot to
``...-frontier.png``.
"""

# ruff: noqa: E402  (thread counts must be set in the environment before numpy/torch import)

from common import pin_threads, threads_from_argv

N_THREADS = pin_threads(threads_from_argv())

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from common import (
    cpu_name,
    device_tag,
    format_table,
    git_commit,
    now_iso,
    package_versions,
    write_results,
)

HERE = Path(__file__).resolve().parent
ENV = {**os.environ, "PYTHONPATH": str(HERE.parent)}


def sae_cli(*argv: str, verbose: bool = False) -> str:
    out = subprocess.run([sys.executable, "-m", "sae", *argv], check=True, text=True,
                         env=ENV, stdout=subprocess.PIPE,
                         stderr=None if verbose else subprocess.DEVNULL)
    return out.stdout


def train(args, work: Path, archs: str, ks: str, d_sae: int, tokens: int) -> dict:
    """One ``sae train`` run, every (architecture, k); the per-SAE held-out metrics."""
    argv = ["train", "--activations", str(args.activations), "--arch", archs, "--k", ks,
            "--tokens", str(tokens), "--holdout", str(args.holdout), "--out", str(work),
            "--device", "cpu", "--no-progress"]
    if d_sae:
        argv += ["--d-sae", str(d_sae)]
    t0 = time.perf_counter()
    sae_cli(*argv, verbose=args.verbose)
    print(f"trained {archs} k={ks} in {time.perf_counter() - t0:.0f} s", flush=True)
    return json.loads((work / "metrics.json").read_text())


def amortisation(folder: Path, x: torch.Tensor, args) -> list[dict]:
    """Every encoder of ``--encoders`` on the TopK SAE at ``folder``, on held-out rows ``x``."""
    from sae import metrics
    from sae.encoders import Encoded
    from sae.io import load

    sae = load(folder).eval()
    k = sae.cfg.k
    rows = []
    for enc in args.encoders:
        view = sae if enc == "trained" else Encoded(sae, enc, k=k)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # our decoders carry the input scale in their norms
            m = metrics.evaluate(view, x, batch_size=4096)
            jac = 1.0 if enc == "trained" else metrics.support_jaccard(sae, view, x)
            t0 = time.perf_counter()
            with torch.no_grad():
                for a in range(0, x.shape[0], 4096):
                    view.encode_pairs(x[a : a + 4096])
            tps = x.shape[0] / (time.perf_counter() - t0)
        rows.append({"encoder": enc, "fvu": m["fvu"], "l0": m["l0"],
                     "dead_pct": 100 * m["dead_fraction"], "support_jaccard": jac,
                     "encode_tokens_per_s": tps})
        print(rows[-1], flush=True)
    return rows


def in_model(folder: Path, args) -> dict[str, dict]:
    """CE-loss recovered and KL of each encoder, spliced into the model over held-out text."""
    out = sae_cli("eval", str(folder), "--encoder", ",".join(args.encoders), "--model",
                  args.model, "--hookpoint", args.hookpoint, "--max-tokens",
                  str(args.model_tokens), "--device", "cpu", "--no-progress", "--json",
                  verbose=args.verbose)
    return next(iter(json.loads(out).values()))


def quick_data(path: Path) -> None:
    """A small activation-like array for the smoke test (planted sparse features)."""
    g = torch.Generator().manual_seed(0)
    D = torch.nn.functional.normalize(torch.randn(512, 64, generator=g), dim=1)
    z = torch.rand(12_000, 512, generator=g) * (torch.rand(12_000, 512, generator=g) < 0.02)
    np.save(path, (z @ D + 0.01 * torch.randn(12_000, 64, generator=g)).numpy())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--activations", type=Path, default=HERE / "data" / "smollm2-l15.npy")
    p.add_argument("--archs", default="topk,mp,online_dl")
    p.add_argument("--ks", default="16,32,64")
    p.add_argument("--k", type=int, default=32, help="k of the TopK SAE of the encoders")
    p.add_argument("--d-sae", type=int, default=0, help="its latents (0: our default, 16 x d_in)")
    p.add_argument("--tokens", type=int, default=2_000_000, help="its training tokens")
    p.add_argument("--frontier-d-sae", type=int, default=4608)
    p.add_argument("--frontier-tokens", type=int, default=1_000_000)
    p.add_argument("--holdout", type=int, default=8192)
    p.add_argument("--encoders", default="trained,omp,mp")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--hookpoint", default="model.layers.15")
    p.add_argument("--model-tokens", type=int, default=8192,
                   help="held-out text tokens for CE-loss recovered (0: skip the model)")
    p.add_argument("--sae", type=Path, help="a trained TopK folder to measure (skips training)")
    p.add_argument("--keep-frontier", action="store_true",
                   help="reuse the frontier of the previous results file")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny synthetic run: a smoke test")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    args.encoders = [e for e in args.encoders.split(",") if e]
    work = Path(tempfile.mkdtemp(prefix="bench-amortisation-"))
    if args.quick:
        args.activations, args.tokens, args.d_sae = work / "quick.npy", 50_000, 256
        args.frontier_tokens, args.frontier_d_sae = 50_000, 256
        args.ks, args.k, args.holdout, args.model_tokens = "8,16", 8, 2048, 0
        quick_data(args.activations)
    torch.set_num_threads(N_THREADS)
    t0 = time.time()
    folder = args.sae or Path(train(args, work / "topk", "topk", str(args.k), args.d_sae,
                                    args.tokens)["topk"]["path"])
    arr = np.load(args.activations, mmap_mode="r")
    x = torch.from_numpy(np.array(arr[-args.holdout :], dtype=np.float32))
    amort = amortisation(folder, x, args)
    model = in_model(folder, args) if args.model_tokens else {}
    for row in amort:
        m = model.get(row["encoder"], {})
        row["ce_loss_recovered"], row["kl"] = m.get("ce_loss_recovered"), m.get("kl_sae")
    tag = device_tag(N_THREADS) + ("-quick" if args.quick else "")
    args.out.mkdir(parents=True, exist_ok=True)
    png = args.out / f"amortisation-{tag}-frontier.png"
    if args.keep_frontier:
        frontier = json.loads((args.out / f"amortisation-{tag}.json").read_text())["frontier"]
    else:
        frontier = run_frontier(args, work, png)
    write(args, argv, tag, time.time() - t0, amort, frontier, png)
    return 0


def run_frontier(args, work: Path, png: Path) -> dict:
    t1 = time.perf_counter()
    trained = train(args, work / "frontier", args.archs, args.ks, args.frontier_d_sae,
                    args.frontier_tokens)
    rows = [{"sae": name, "l0": m["l0"], "fvu": m["fvu"], "dead_pct": 100 * m["dead_fraction"]}
            for name, m in trained.items()]
    sae_cli("plot", str(work / "frontier"), "--out", str(png))
    return {"rows": rows, "seconds": time.perf_counter() - t1, "date": now_iso(),
            "git": git_commit(HERE.parent), "d_sae": args.frontier_d_sae,
            "tokens": args.frontier_tokens}


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.4f}" if abs(v) < 1 else f"{v:.2f}"
    return str(v)


def write(args, argv, tag: str, seconds: float, amort, frontier, png: Path) -> None:
    acols = ["encoder", "l0", "fvu", "dead_pct", "support_jaccard", "ce_loss_recovered", "kl",
             "encode_tokens_per_s"]
    fcols = ["sae", "l0", "fvu", "dead_pct"]
    lines = [
        f"# Amortisation gap and pursuit frontier: {tag}", "",
        f"- date: {now_iso()}; CPU: {cpu_name()}; threads: {N_THREADS}; {seconds:.0f} s in all",
        f"- versions: {package_versions('torch')}; git {git_commit(HERE.parent)}",
        f"- data: `{args.activations.name}`, the last {args.holdout:,} rows held out; "
        f"in-model metrics: {args.model} at {args.hookpoint} over {args.model_tokens:,} "
        "held-out text tokens",
        f"- command: `{' '.join(['bench_amortisation.py', *(argv or sys.argv[1:])])}`", "",
        f"## Encoders of the default TopK SAE (k = {args.k}, {args.tokens:,} tokens), same L0",
        "", "Encode throughput: `encode_pairs` over the held-out rows in batches of 4,096 (the "
        "pursuits' Gram matrix of the decoder is computed once per SAE, before the timing).", "",
        format_table(acols, [[_cell(r[c]) for c in acols] for r in amort], markdown=True), "",
        f"## L0-FVU frontier ({frontier['d_sae']:,} latents, {frontier['tokens']:,} "
        f"tokens; all SAEs trained together in {frontier['seconds']:.0f} s; "
        f"{frontier['date']}, git {frontier['git']})", "",
        format_table(fcols, [[_cell(r[c]) for c in fcols] for r in frontier["rows"]],
                     markdown=True), "",
        f"![L0 against FVU]({png.name})",
    ]
    write_results(args.out, f"amortisation-{tag}", lines,
                  {"encoders": amort, "frontier": frontier})


if __name__ == "__main__":
    sys.exit(main())
