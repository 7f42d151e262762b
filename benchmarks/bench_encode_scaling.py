"""Where each library wins: OMP and Lasso time against the number of signals and of atoms,
ours (``sparsecode.sparse_encode``, default parameters) and SPAMS, in one process.

Signals are mean-removed 8x8 patches of ``skimage.data.camera()`` (64 dimensions); the
dictionary is ``n_atoms`` random unit-norm atoms (seed 0). Grid: 1k, 10k, 100k, 1M signals at
256 atoms (1M: all 255,025 camera patches tiled; ``--no-million`` leaves it out), and 64,
256, 1024, 4096 atoms at 10k signals. OMP with 8 atoms, Lasso with alpha 0.05
(SPAMS ``omp`` / ``lasso`` mode 2, float64; ours float64 and float32). Time: the best of
``--repeats`` calls after a warm-up call, ``--threads`` threads.

    python benchmarks/bench_encode_scaling.py

Results: ``benchmarks/results/encode-scaling-<cpu>-<threads>t.{json,md}``.
"""

# ruff: noqa: E402  (thread counts must be set in the environment before numpy is imported)

from common import pin_threads, threads_from_argv

N_THREADS = pin_threads(threads_from_argv())

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import device_tag, format_table, git_commit, now_iso, write_results

import sparsecode
from sparsecode.datasets import image_patches

try:
    import spams
except ImportError:  # pragma: no cover
    spams = None

HERE = Path(__file__).resolve().parent


def best_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def run_case(X: np.ndarray, D: np.ndarray, task: str, repeats: int) -> dict[str, float]:
    params = {"omp": {"n_nonzero_coefs": 8}, "lasso": {"alpha": 0.05}}[task]
    algorithm = {"omp": "omp", "lasso": "lasso_lars"}[task]
    out = {}
    for dtype in (np.float64, np.float32):
        Xd, Dd = X.astype(dtype), D.astype(dtype)
        out[f"ours {np.dtype(dtype).name}"] = best_time(
            lambda Xd=Xd, Dd=Dd: sparsecode.sparse_encode(Xd, Dd, algorithm=algorithm,
                                                          device="cpu", **params), repeats)
    if spams is not None:
        Xf, Df = np.asfortranarray(X.T), np.asfortranarray(D.T)
        call = ((lambda: spams.omp(Xf, Df, L=8, numThreads=N_THREADS)) if task == "omp" else
                (lambda: spams.lasso(Xf, D=Df, lambda1=0.05, mode=2, numThreads=N_THREADS)))
        out["SPAMS float64"] = best_time(call, repeats)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--no-million", action="store_true", help="leave out 1M signals (~4 GB)")
    args = p.parse_args(argv)
    torch.set_num_threads(N_THREADS)
    # all 255,025 patches of camera in a seeded random order (raster order would put the flat
    # sky first), tiled 4x (then cut) for the 1M-signal case
    rng = np.random.default_rng(0)
    patches = image_patches(n_patches=None)
    patches = np.tile(patches[rng.permutation(len(patches))], (4, 1))
    sizes = (1_000, 10_000, 100_000) + (() if args.no_million else (1_000_000,))
    grid = [(n, 256) for n in sizes] + [(10_000, k) for k in (64, 1024, 4096)]
    rows, data = [], {"when": now_iso(), "commit": git_commit(HERE.parent), "threads": N_THREADS,
                      "cases": []}
    for task in ("omp", "lasso"):
        for n, k in grid:
            D = rng.standard_normal((k, 64))
            D /= np.linalg.norm(D, axis=1, keepdims=True)
            t = run_case(patches[:n], D, task, args.repeats)
            data["cases"].append({"task": task, "n_signals": n, "n_atoms": k, **t})
            spams_t = t.get("SPAMS float64")
            ratios = [f"{spams_t / t[key]:.2f}x" if spams_t else "-"
                      for key in ("ours float64", "ours float32")]
            rows.append([task, f"{n:,}", str(k), f"{t['ours float64']:.4f}",
                         f"{t['ours float32']:.4f}", f"{spams_t:.4f}" if spams_t else "-",
                         *ratios])
            print(*rows[-1], flush=True)
    headers = ["task", "signals", "atoms", "ours f64 [s]", "ours f32 [s]", "SPAMS f64 [s]",
               "f64 vs SPAMS", "f32 vs SPAMS"]
    lines = [f"# Sparse coding time against signals and atoms ({N_THREADS} threads, {now_iso()})",
             "", format_table(headers, rows, markdown=True), "",
             "OMP: 8 atoms; Lasso: alpha 0.05 (ours lasso_lars, SPAMS lasso mode 2). "
             "vs SPAMS > 1: ours is faster. Best of the timed calls after a warm-up."]
    write_results(args.out, f"encode-scaling-{device_tag(N_THREADS)}", lines, data)


if __name__ == "__main__":
    main()
