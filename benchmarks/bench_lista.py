"""LISTA-16 against ISTA / FISTA on Gregor & LeCun's synthetic setting.

Gaussian dictionary (500 unit-norm atoms in 250 dimensions), Bernoulli-Gaussian codes (p = 0.1),
noiseless signals, Lasso weight ``alpha = 1e-3 * mean_i max_j |<x_i, d_j>|`` of the test signals.
A 16-layer LISTA (by default ``parametrization="fista"``: learned matrices, thresholds and
momentum, initialised as 16 FISTA steps; cosine learning-rate decay) is trained on the Lasso
objective; the mean held-out objective is compared with 16 and 100 iterations of ISTA / FISTA
(the core's ``fista``, adaptive restart) and the exact Lasso
(``sparse_encode(algorithm="lasso_lars")``). The target of the dictionary-learning issue: LISTA-16
at least as accurate as FISTA-100 on its training distribution.

    python benchmarks/bench_lista.py                         # 48,000 signals x 40 epochs, ~9 min
    python benchmarks/bench_lista.py --n-train 4000 --epochs 12   # the slow test's setting

Results: ``benchmarks/results/lista-<device>.{json,md}``.
"""

from __future__ import annotations

import argparse
import sys
import time

from common import ROOT, cpu_name, device_tag, git_commit, now_iso, pin_threads, write_json


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-train", type=int, default=48_000)
    p.add_argument("--n-test", type=int, default=500)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--parametrization", default="fista", choices=("lista", "fista", "step"))
    p.add_argument("--lr-schedule", default="cosine", choices=("cosine", "constant"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    pin_threads(args.threads)
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from sparsecode import LISTA, sparse_encode
    from sparsecode.core import LeastSquares, fista
    from sparsecode.core.operators import L1

    rng = np.random.default_rng(args.seed)
    D = rng.standard_normal((500, 250))
    D /= np.linalg.norm(D, axis=1, keepdims=True)

    def signals(n: int) -> np.ndarray:
        Z = rng.standard_normal((n, 500)) * (rng.random((n, 500)) < 0.1)
        return Z @ D

    X_train = signals(args.n_train).astype(np.float32)
    X_test = signals(args.n_test)
    alpha = 1e-3 * float(np.abs(X_test @ D.T).max(1).mean())

    def objective(Z: np.ndarray) -> float:
        R = X_test - Z @ D
        return float((0.5 * (R * R).sum(1) + alpha * np.abs(Z).sum(1)).mean())

    def ista(n_iter: int, fast: bool) -> float:
        prob = LeastSquares.from_data(torch.as_tensor(X_test), torch.as_tensor(D))
        return objective(fista(prob, L1(alpha), fast=fast, max_iter=n_iter, tol=0).codes.numpy())

    t0 = time.perf_counter()
    net = LISTA(D.astype(np.float32), n_layers=args.layers, alpha=alpha, max_epochs=args.epochs,
                batch_size=args.batch_size, learning_rate=args.lr, random_state=args.seed,
                parametrization=args.parametrization, lr_schedule=args.lr_schedule,
                verbose=True).fit(X_train)
    train_s = time.perf_counter() - t0
    rows = {
        f"LISTA-{args.layers} (trained)": objective(
            net.transform(X_test.astype(np.float32)).astype(np.float64)),
        f"ISTA-{args.layers}": ista(args.layers, False),
        f"FISTA-{args.layers}": ista(args.layers, True),
        "ISTA-100": ista(100, False),
        "FISTA-100": ista(100, True),
        "exact Lasso (lasso_lars)": objective(
            sparse_encode(X_test, D, algorithm="lasso_lars", alpha=alpha)),
    }
    lista, f100 = rows[f"LISTA-{args.layers} (trained)"], rows["FISTA-100"]
    verdict = "MET" if lista <= f100 else "NOT MET"
    for name, v in rows.items():
        print(f"{name:28s} {v:.4f}")
    print(f"target LISTA-{args.layers} <= FISTA-100: {verdict} ({lista:.4f} vs {f100:.4f}); "
          f"training {train_s:.0f} s")
    tag = f"lista-{device_tag(args.threads)}"
    out = ROOT / "benchmarks" / "results"
    meta = {"date": now_iso(), "cpu": cpu_name(), "threads": args.threads, "args": vars(args),
            "git": git_commit(ROOT), "torch": torch.__version__, "alpha": alpha,
            "train_seconds": round(train_s, 1), "loss_curve": net.loss_curve_}
    write_json(out / f"{tag}.json", {"meta": meta, "objective": rows, "target": verdict})
    lines = [f"# LISTA-{args.layers} vs ISTA / FISTA: {tag}", "",
             f"- date {meta['date']}; {meta['cpu']}, {args.threads} threads; "
             f"torch {torch.__version__}; git {meta['git']}",
             f"- 500 x 250 Gaussian dictionary, Bernoulli-Gaussian codes p = 0.1, {args.n_train} "
             f"training / {args.n_test} held-out signals, alpha = {alpha:.5f}; "
             f"parametrization {args.parametrization!r}, {args.epochs} epochs, batch "
             f"{args.batch_size}, Adam lr {args.lr} ({args.lr_schedule}); "
             f"training {train_s:.0f} s",
             f"- command: `python benchmarks/bench_lista.py {' '.join(argv or sys.argv[1:])}`", "",
             "| method | mean held-out Lasso objective |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in rows.items()]
    lines += ["", f"Target (LISTA-{args.layers} <= FISTA-100): **{verdict}**.", ""]
    (out / f"{tag}.md").write_text("\n".join(lines))
    print(f"wrote {out / tag}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
