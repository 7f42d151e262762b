"""Dead latents against held-out FVU for variants of the default TopK recipe.

Each variant is one ``sae train --activations`` run (our defaults plus the variant's flags:
AuxK strength and window, learning rate, ...) on the same activations, batches and held-out
rows; the table gives the held-out FVU, L0 and the fraction of latents that never fire on the
held-out rows ("dead": a latent rarer than about one in 16,384 tokens counts as dead too).
The default recipe's goal: under 1% dead at no loss of FVU.

    python benchmarks/bench_dead_latents.py                     # SmolLM2 layer 15, ~30 min
    python benchmarks/bench_dead_latents.py --variants default,aux8 --tokens 500000
    python benchmarks/bench_dead_latents.py --quick             # smoke test

The rows of variants not run are kept from the previous results file (same tag), so variants
can be added one run at a time.

Results: ``benchmarks/results/dead-latents-<cpu>-<threads>t.{json,md}``.
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
from pathlib import Path

import numpy as np
from common import cpu_name, device_tag, format_table, git_commit, now_iso, write_results

HERE = Path(__file__).resolve().parent

#: name -> extra ``sae train`` flags on top of the defaults
VARIANTS = {
    "default": [],
    "aux8": ["--aux-coefficient", "0.125"],
    "aux2": ["--aux-coefficient", "0.5"],
    "window25k": ["--dead-tokens", "25000"],
    "aux8-window25k": ["--aux-coefficient", "0.125", "--dead-tokens", "25000"],
    "lr1e-3": ["--lr", "1e-3"],
    "lr1.5e-3": ["--lr", "1.5e-3"],
    "warmup100": ["--warmup-steps", "100"],
    "aux2-warmup100": ["--aux-coefficient", "0.5", "--warmup-steps", "100"],
    "lr1.5e-3-aux2": ["--lr", "1.5e-3", "--aux-coefficient", "0.5"],
    "auxk1024": ["--aux-k", "1024"],
}


def run_variant(name: str, args, work: Path) -> dict:
    out = work / name
    cmd = [sys.executable, "-m", "sae", "train", "--activations", str(args.activations),
           "--tokens", str(args.tokens), "--holdout", str(args.holdout), "--out", str(out),
           "--device", "cpu", "--no-progress", *VARIANTS[name], *args.extra]
    if args.d_sae:
        cmd += ["--d-sae", str(args.d_sae)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(HERE.parent)},
                   stdout=None if args.verbose else subprocess.DEVNULL)
    m = next(iter(json.loads((out / "metrics.json").read_text()).values()))
    row = {"variant": name, "flags": " ".join(VARIANTS[name]), "fvu": m["fvu"], "l0": m["l0"],
           "dead_pct": 100 * m["dead_fraction"], "seconds": time.perf_counter() - t0}
    print(row, flush=True)
    return row


def quick_data(path: Path) -> None:
    g = np.random.default_rng(0)
    D = g.standard_normal((512, 64)).astype(np.float32)
    z = g.random((20_000, 512), dtype=np.float32) * (g.random((20_000, 512)) < 0.02)
    np.save(path, z @ D + 3.0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--activations", type=Path, default=HERE / "data" / "smollm2-l15.npy")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--tokens", type=int, default=2_000_000)
    p.add_argument("--holdout", type=int, default=16384)
    p.add_argument("--d-sae", type=int, default=0, help="latents (0: our default)")
    p.add_argument("--extra", default="", help="flags added to every run, e.g. '--k 64'")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    args.extra = args.extra.split()
    names = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        p.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    work = Path(tempfile.mkdtemp(prefix="bench-dead-"))
    if args.quick:
        args.activations, args.tokens, args.holdout, args.d_sae = work / "q.npy", 60_000, 2048, 512
        quick_data(args.activations)
    t0 = time.time()
    tag = device_tag(N_THREADS) + ("-quick" if args.quick else "")
    previous = args.out / f"dead-latents-{tag}.json"
    kept = {r["variant"]: r for r in json.loads(previous.read_text())} if previous.exists() else {}
    kept.update({n: run_variant(n, args, work) for n in names})
    rows = [kept[n] for n in VARIANTS if n in kept]
    cols = ["variant", "flags", "fvu", "l0", "dead_pct", "seconds"]

    def cell(v):
        return f"{v:.4f}" if isinstance(v, float) and abs(v) < 1 else (
            f"{v:.1f}" if isinstance(v, float) else str(v))

    lines = [f"# Dead latents of TopK recipe variants: {tag}", "",
             f"- date: {now_iso()}; CPU: {cpu_name()}; threads: {N_THREADS}; "
             f"{time.time() - t0:.0f} s in all; git {git_commit(HERE.parent)}",
             f"- data: `{args.activations.name}`, {args.tokens:,} training tokens, the last "
             f"{args.holdout:,} rows held out; every other setting our default "
             f"{' '.join(args.extra)}",
             f"- command: `{' '.join(['bench_dead_latents.py', *(argv or sys.argv[1:])])}`", "",
             format_table(cols, [[cell(r[c]) for c in cols] for r in rows], markdown=True)]
    write_results(args.out, f"dead-latents-{tag}", lines, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
