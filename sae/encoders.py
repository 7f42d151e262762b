"""Encoders: how an SAE's latents are computed for an input, from one step to many.

``trained`` is the SAE's own encoder (one step of the core's proximal-gradient iteration, see
docs/architecture.md). The others treat the decoder as a dictionary and run a solver of
:mod:`sparsecode.core` on it: the signal is ``x - b_dec``, the atoms are the decoder rows
(normalised for the solver, the codes rescaled back, so ``decode`` is unchanged), and each
stops at ``k`` atoms or a squared residual norm ``tol``:

* ``mp``: matching pursuit, nonnegative (:func:`sparsecode.core.mp`);
* ``omp`` / ``ormp``: orthogonal / order-recursive matching pursuit (signed codes);
* ``nnomp``: non-negative OMP (:func:`sparsecode.core.nnomp`);
* ``fista``: the non-negative Lasso at ``alpha`` (chosen by bisection to give ``k`` active
  latents per token on average when only ``k`` is given).

The gap between ``trained`` and a pursuit at the same L0 is the *amortisation gap* of the
encoder (docs/metrics.md). :class:`Encoded` is the SAE seen through another encoder, for the
metrics and the hooks. Adding an encoder is one function in :data:`ENCODERS`.

>>> import torch, warnings
>>> from sae.models import SAE, SAEConfig
>>> sae = SAE(SAEConfig(d_in=8, d_sae=32, k=4)).eval()
>>> rows, cols, vals = encode_pairs(sae, torch.randn(5, 8), "omp", k=3)
>>> torch.bincount(rows, minlength=5).tolist()
[3, 3, 3, 3, 3]
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from sparsecode.core import LeastSquares, fista, mp, nnomp, omp
from sparsecode.core.kernels import sorted_pairs
from sparsecode.core.operators import L1

if TYPE_CHECKING:
    from .models import SAE

Pairs = tuple[Tensor, Tensor, Tensor]


def _dictionary(sae: SAE) -> tuple[Tensor, Tensor, Tensor]:
    """Unit-norm atoms (the decoder rows), the row norms and the atoms' Gram matrix, computed
    once per decoder state (cached on the SAE, keyed by ``W_dec``'s storage and version
    counter: an optimiser step invalidates it). The Gram matrix is the pursuits' main cost
    when batches are smaller than the dictionary (9,216 atoms: 98 GFLOP per computation).
    Warns once when the rows are not unit-norm."""
    W = sae.W_dec.detach()
    key = (W.data_ptr(), W._version, W.device, W.dtype, W.shape)
    cached = sae.__dict__.get("_pursuit_dictionary")
    if cached is not None and cached[0] == key:
        return cached[1]
    norms = W.norm(dim=1).clamp_min(1e-12)
    if not torch.allclose(norms, torch.ones_like(norms), rtol=0, atol=1e-3):
        warnings.warn(
            f"the decoder rows are not unit-norm (norms {float(norms.min()):.4g} to "
            f"{float(norms.max()):.4g}): the pursuit codes against normalised rows and rescales "
            "the codes, so decoding is unchanged", stacklevel=4)
    D = W / norms[:, None]
    value = (D, norms, D @ D.T)
    sae.__dict__["_pursuit_dictionary"] = (key, value)
    return value


def _problem(sae: SAE, x: Tensor) -> tuple[LeastSquares, Tensor]:
    D, norms, gram = _dictionary(sae)
    return LeastSquares.from_data((x - sae.b_dec).detach().to(D.dtype), D, gram=gram), norms


def _from_codes(codes: Any, norms: Tensor, n_latents: int) -> Pairs:
    """Solver codes against unit atoms -> latent pairs (sorted, zeros dropped)."""
    if not isinstance(codes, Tensor):
        return codes.pairs(norms)
    rows, cols = codes.nonzero(as_tuple=True)
    return sorted_pairs(rows, cols, codes[rows, cols] / norms[cols], n_latents)


def _trained(sae: SAE, x: Tensor, k: int | None, tol: float | None, alpha: float | None) -> Pairs:
    return sae.encode_pairs(x)


def _greedy(solver: Callable, **kw: Any) -> Callable[..., Pairs]:
    def encode(sae: SAE, x: Tensor, k: int | None, tol: float | None, alpha: float | None):
        prob, norms = _problem(sae, x)
        res = solver(prob, n_nonzero_coefs=None if k is None and tol is not None else k,
                     tol=tol, **kw)
        return _from_codes(res.codes, norms, sae.cfg.d_sae)

    return encode


def _lasso_codes(prob: LeastSquares, alpha: float) -> Tensor:
    return fista(prob, L1(alpha, positive=True), tol=1e-6, max_iter=2000).codes


def _fista(sae: SAE, x: Tensor, k: int | None, tol: float | None, alpha: float | None) -> Pairs:
    prob, norms = _problem(sae, x)
    if alpha is None:
        if k is None:
            raise ValueError("the fista encoder needs alpha, or k to choose it")
        alpha = lasso_alpha_for_l0(prob, k)
    return _from_codes(_lasso_codes(prob, alpha), norms, sae.cfg.d_sae)


def lasso_alpha_for_l0(prob: LeastSquares, k: float, n_rows: int = 2048, steps: int = 14
                       ) -> float:
    """The l1 weight whose non-negative Lasso codes have ``k`` nonzeros per row on average
    (bisection in log space on the first ``n_rows`` rows)."""
    sub = prob.rows(slice(0, n_rows))
    lo, hi = 1e-6, float(sub.cov.clamp(min=0).amax()) + 1e-12  # above hi the code is empty
    for _ in range(steps):
        mid = math.sqrt(lo * hi)
        l0 = float((_lasso_codes(sub, mid) != 0).sum(dim=1).double().mean())
        lo, hi = (mid, hi) if l0 > k else (lo, mid)
    return math.sqrt(lo * hi)


#: Encoder name -> ``f(sae, x, k, tol, alpha)`` giving sorted ``(rows, cols, values)``.
ENCODERS: dict[str, Callable[..., Pairs]] = {
    "trained": _trained,
    "mp": _greedy(mp, positive=True),
    "omp": _greedy(omp, selection="omp"),
    "ormp": _greedy(omp, selection="ormp"),
    "nnomp": _greedy(nnomp),
    "fista": _fista,
}


def check_encoder(name: str) -> str:
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; known encoders: {', '.join(ENCODERS)}")
    return name


def check_applies(sae: SAE, encoder: str) -> None:
    """Raise ``ValueError`` unless ``encoder`` is known and can encode for ``sae`` (a pursuit
    codes a signal against the decoder's atoms, which a transcoder's decoder is not)."""
    check_encoder(encoder)
    if encoder != "trained" and sae.cfg.transcode:
        raise ValueError(f"the {encoder!r} encoder codes a signal against the decoder's atoms; a "
                         "transcoder's decoder writes another place than it reads (use the "
                         "trained encoder)")


def encode_pairs(sae: SAE, x: Tensor, encoder: str = "trained", *, k: int | None = None,
                 tol: float | None = None, alpha: float | None = None) -> Pairs:
    """Latents of a 2-D ``x`` with ``encoder`` (see the module docstring) as sorted
    ``(rows, cols, values)``. ``k`` defaults to the SAE's ``k``; ``tol`` (squared residual
    norm) stops the greedy pursuits early; ``alpha`` is the fista encoder's l1 weight."""
    check_applies(sae, encoder)
    if k is not None and not 1 <= k <= sae.cfg.d_sae:
        raise ValueError(f"k={k} must be in [1, d_sae={sae.cfg.d_sae}]")
    if tol is not None and not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol!r}")
    if encoder != "trained" and k is None and tol is None and alpha is None:
        k = sae.cfg.k
    with torch.no_grad():
        return ENCODERS[encoder](sae, x, k, tol, alpha)


class Encoded(nn.Module):
    """An SAE whose latents come from another encoder: ``encode`` / ``encode_pairs`` run
    :func:`encode_pairs`, ``decode`` / ``decode_pairs`` are the SAE's. What the metrics
    (:func:`sae.metrics.evaluate`, :func:`sae.metrics.model_metrics`) and the hooks take."""

    def __init__(self, sae: SAE, encoder: str, *, k: int | None = None,
                 tol: float | None = None, alpha: float | None = None):
        super().__init__()
        check_applies(sae, encoder)
        self.sae = sae
        self.encoder = encoder
        self.settings = {"k": k, "tol": tol, "alpha": alpha}

    @property
    def cfg(self):
        return self.sae.cfg

    @property
    def W_dec(self) -> Tensor:
        return self.sae.W_dec

    def encode_pairs(self, x: Tensor) -> Pairs:
        s = self.settings
        if self.encoder == "fista" and s["alpha"] is None and s["k"] is not None:
            prob, _ = _problem(self.sae, x)  # one alpha for every batch: fitted on the first
            s["alpha"], s["k"] = lasso_alpha_for_l0(prob, s["k"]), None
        return encode_pairs(self.sae, x, self.encoder, **s)

    def encode(self, x: Tensor) -> Tensor:
        from .models import dense_latents

        return dense_latents(self.encode_pairs, x, self.cfg.d_sae)

    def decode(self, z: Tensor) -> Tensor:
        return self.sae.decode(z)

    def decode_pairs(self, rows: Tensor, cols: Tensor, values: Tensor, n_rows: int,
                     x: Tensor | None = None) -> Tensor:
        return self.sae.decode_pairs(rows, cols, values, n_rows, x=x)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))
