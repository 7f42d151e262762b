"""Learn a dictionary of handwritten-digit atoms from ``sklearn.datasets.load_digits`` (offline).

The 1,797 8x8 digits (scaled to [0, 1]) are fitted with online dictionary learning (Lasso coding
by 100 FISTA steps; nonnegative codes and atoms, so that atoms look like strokes); the script
prints how well the atoms reconstruct held-out digits (exact Lasso codes) and plots them.

    python examples/digits_atoms.py                    # 64 atoms -> out/digits_atoms.png
    python examples/digits_atoms.py --n-atoms 36 --epochs 5
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from sparsecode import MiniBatchDictionaryLearning


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-atoms", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--alpha", type=float, default=0.1)
    ap.add_argument("--out", type=Path, default=Path("out/digits_atoms.png"))
    args = ap.parse_args()

    X = load_digits().data / 16.0
    X_train, X_test = train_test_split(X, test_size=0.2, random_state=0)
    dl = MiniBatchDictionaryLearning(
        args.n_atoms, alpha=args.alpha, batch_size=64, max_iter=args.epochs,
        fit_algorithm="fista", positive_code=True, positive_dict=True,
        transform_algorithm="lasso_lars",
        transform_alpha=args.alpha, transform_max_iter=100, random_state=0,
    )
    t0 = time.perf_counter()
    dl.fit(X_train)
    elapsed = time.perf_counter() - t0
    Z = dl.transform(X_test)
    X_hat = dl.inverse_transform(Z)
    rel = np.linalg.norm(X_test - X_hat) / np.linalg.norm(X_test)
    print(f"{args.n_atoms} atoms learned in {elapsed:.1f} s; held-out relative error {rel:.3f}, "
          f"{(Z != 0).sum(1).mean():.1f} atoms per digit")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    side = int(np.ceil(np.sqrt(args.n_atoms)))
    fig, axes = plt.subplots(side, side, figsize=(side * 0.9, side * 0.9))
    for ax, atom in zip(axes.ravel(), list(dl.components_) + [None] * side * side, strict=False):
        ax.axis("off")
        if atom is not None:
            ax.imshow(atom.reshape(8, 8), cmap="gray_r", interpolation="nearest")
    fig.suptitle(f"{args.n_atoms} dictionary atoms learned on digits")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=80)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
