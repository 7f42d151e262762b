"""Built-in data for classical sparse coding: image patches and fixed dictionaries (offline).

Example
-------
>>> from sparsecode.datasets import overcomplete_dct
>>> overcomplete_dct(patch_size=8, n_atoms=256).shape
(256, 64)
"""

from __future__ import annotations

import math

import numpy as np


def overcomplete_dct(patch_size: int = 8, n_atoms: int = 256) -> np.ndarray:
    """Overcomplete separable 2-D DCT dictionary, atoms as unit-norm rows.

    The 1-D dictionary has ``a = sqrt(n_atoms)`` cosines of frequencies ``k pi / a`` sampled on
    ``patch_size`` points (mean removed except for the constant atom); the 2-D atoms are the outer
    products of pairs (as in Elad & Aharon's K-SVD denoising). Shape ``(n_atoms, patch_size**2)``.
    """
    a = math.isqrt(n_atoms)
    if a * a != n_atoms or patch_size < 1:
        raise ValueError(
            f"n_atoms must be a perfect square and patch_size >= 1, got n_atoms={n_atoms}, "
            f"patch_size={patch_size}"
        )
    t = np.arange(patch_size)[:, None]
    d1 = np.cos(t * np.arange(a)[None, :] * np.pi / a)
    d1[:, 1:] -= d1[:, 1:].mean(axis=0)
    d1 /= np.linalg.norm(d1, axis=0)
    D = np.kron(d1, d1).T  # (a*a, p*p)
    return np.ascontiguousarray(D / np.linalg.norm(D, axis=1, keepdims=True))


def image_patches(
    image: np.ndarray | None = None,
    patch_size: int = 8,
    n_patches: int | None = 20_000,
    *,
    remove_mean: bool = True,
    random_state: int | None = 0,
) -> np.ndarray:
    """Random ``patch_size x patch_size`` patches of a grey image as rows, scaled to [0, 1].

    ``image`` defaults to ``skimage.data.camera()`` (ships with scikit-image, no download).
    With ``remove_mean`` each patch has its mean subtracted (the usual preprocessing for
    dictionary learning on natural images). ``n_patches=None`` returns all patches.
    """
    from sklearn.feature_extraction.image import extract_patches_2d

    if image is None:
        from skimage import data

        image = data.camera()
    img = np.asarray(image, dtype=np.float64)
    if img.ndim != 2:
        raise ValueError(f"image must be 2-D (grey), got shape {img.shape}")
    if img.max() > 1.0:
        img = img / 255.0
    patches = extract_patches_2d(img, (patch_size, patch_size), max_patches=n_patches,
                                 random_state=random_state)
    X = patches.reshape(len(patches), -1)
    if remove_mean:
        X = X - X.mean(axis=1, keepdims=True)
    return X
