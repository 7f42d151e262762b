"""Denoise a built-in image by sparse coding its patches (offline, ~15 s on 2 CPU cores).

A dictionary of 256 atoms is learned online on 40,000 random 8x8 patches of the noisy image
(``--dictionary learned``, the default; Elad & Aharon 2006 / the classic scikit-learn example on
``skimage.data.camera()``) or taken as an overcomplete DCT (``--dictionary dct``). Every
overlapping patch is then coded by OMP until its residual reaches the noise level
(``||r||^2 <= n * (C sigma)^2``, ``C = 1.1``), and the denoised image averages the coded patches.
Prints the PSNR before and after and writes a before/after PNG.

``C``: Elad & Aharon use 1.15; on ``camera`` at sigma = 25 a sweep gave 29.25 / 29.31 / 29.19 /
28.97 dB for C = 1.05 / 1.1 / 1.15 / 1.2 with the DCT dictionary, and the learned dictionary
gains 0.03-0.05 dB at every C (``--tolerance-factor``).

    python examples/denoise_image.py                     # 512x512 camera, sigma = 25/255
    python examples/denoise_image.py --dictionary dct    # no learning
    python examples/denoise_image.py --size 128          # a quick crop
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from skimage import data
from skimage.metrics import peak_signal_noise_ratio
from sklearn.feature_extraction.image import extract_patches_2d, reconstruct_from_patches_2d

from sparsecode import MiniBatchDictionaryLearning, SparseCoder
from sparsecode.datasets import image_patches, overcomplete_dct


def learn_dictionary(noisy: np.ndarray, patch: int = 8, n_atoms: int = 256,
                     n_patches: int = 40_000, seed: int = 0) -> np.ndarray:
    """Online dictionary learning on random noisy patches, started from the DCT dictionary.

    Codes with 4-sparse OMP (l1 coding at any alpha we tried gave 0.3-0.6 dB less), two passes.
    """
    X = image_patches(noisy, patch, n_patches, random_state=seed).astype(np.float32)
    dl = MiniBatchDictionaryLearning(
        n_atoms, fit_algorithm="omp", fit_n_nonzero_coefs=4, batch_size=256, max_iter=2,
        tol=0.0, max_no_improvement=None, dict_init=overcomplete_dct(patch, n_atoms),
        random_state=seed,
    )
    return dl.fit(X).components_.astype(np.float64)


def denoise(noisy: np.ndarray, sigma: float, dictionary: np.ndarray, patch: int = 8,
            coder: str = "ormp", factor: float = 1.1) -> np.ndarray:
    """Denoise a [0, 1] grey image by sparse coding all overlapping patches (DC kept exactly).

    ``coder``: ``"ormp"`` (order-recursive matching pursuit, as SPAMS' omp) or ``"omp"``;
    patches are coded until ``||r||^2 <= patch^2 (factor sigma)^2``.
    """
    patches = extract_patches_2d(noisy, (patch, patch)).reshape(-1, patch * patch)
    means = patches.mean(axis=1, keepdims=True)
    coder = SparseCoder(
        dictionary / np.linalg.norm(dictionary, axis=1, keepdims=True),
        transform_algorithm=coder,
        transform_alpha=patch * patch * (factor * sigma) ** 2,  # squared-residual target
    )
    codes = coder.fit_transform(patches - means)
    clean = coder.inverse_transform(codes) + means
    return reconstruct_from_patches_2d(clean.reshape(-1, patch, patch), noisy.shape)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sigma", type=float, default=25.0, help="noise std on the 0-255 scale")
    ap.add_argument("--size", type=int, default=512, help="crop the image to size x size")
    ap.add_argument("--dictionary", choices=["learned", "dct"], default="learned")
    ap.add_argument("--coder", choices=["ormp", "omp"], default="ormp")
    ap.add_argument("--n-patches", type=int, default=40_000, help="patches to learn from")
    ap.add_argument("--tolerance-factor", type=float, default=1.1,
                    help="code each patch until ||r||^2 <= 64 (C sigma)^2")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("out/denoise_camera.png"))
    args = ap.parse_args()

    clean = data.camera()[: args.size, : args.size].astype(np.float64) / 255.0
    sigma = args.sigma / 255.0
    rng = np.random.default_rng(args.seed)
    noisy = clean + sigma * rng.standard_normal(clean.shape)

    t0 = time.perf_counter()
    if args.dictionary == "learned":
        D = learn_dictionary(noisy, n_patches=args.n_patches, seed=args.seed)
    else:
        D = overcomplete_dct(8, 256)
    restored = denoise(noisy, sigma, D, coder=args.coder, factor=args.tolerance_factor)
    elapsed = time.perf_counter() - t0
    psnr_in = peak_signal_noise_ratio(clean, noisy, data_range=1.0)
    psnr_out = peak_signal_noise_ratio(clean, np.clip(restored, 0, 1), data_range=1.0)
    print(f"noisy PSNR {psnr_in:.2f} dB -> denoised PSNR {psnr_out:.2f} dB ({elapsed:.1f} s)")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    panels = [("clean", clean), (f"noisy {psnr_in:.2f} dB", noisy),
              (f"{args.coder.upper()} + {args.dictionary} dictionary {psnr_out:.2f} dB", restored)]
    for ax, (title, img) in zip(axes, panels, strict=True):
        ax.imshow(np.clip(img, 0, 1), cmap="gray", vmin=0, vmax=1)
        ax.set_title(title)
        ax.axis("off")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=80)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
