"""Auxiliary losses for dead and under-used latents: AuxK and aux_zipf.

Both reconstruct the main code's residual from an auxiliary code: the top ``aux_k`` (weighted)
pre-activations per token among *candidate* latents, decoded without ``b_dec``; the loss is the
residual's normalised error (:func:`sae.losses.normalized_mse`). They differ only in the
candidates (:data:`CANDIDATES`):

* ``auxk`` (Gao et al. 2024): the dead latents, unweighted;
* ``aux_zipf`` (Ayonrinde 2024): the latents firing below a Zipf target, each weighted by its
  shortfall ``u`` in ``(0, 1]`` (a dead latent has weight 1, so aux_zipf generalises AuxK); the
  selection is on ``u * pre`` and the code's values are ``u * pre``.

Adding an auxiliary loss is one candidate function and one name in the architecture table.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from sparsecode.core import operators as ops
from sparsecode.core.kernels import preact, sparse_preact

from . import losses

if TYPE_CHECKING:
    from .models import SAE

#: The auxiliary code is computed densely over its candidate latents only while
#: ``N * n_candidates`` is at most this (64 MiB of float32 pre-activations).
DENSE_AUX_MAX_ENTRIES = 2**24


def _dead(sae: SAE) -> tuple[Tensor, Tensor | None]:
    return sae.dead_mask().nonzero(as_tuple=True)[0], None


def _zipf(sae: SAE) -> tuple[Tensor, Tensor | None]:
    u = losses.underuse(sae.fire_rate, sae.cfg.k, sae.cfg.zipf_exponent)
    u = torch.where(sae.dead_mask(), torch.ones_like(u), u)
    return (u > 0).nonzero(as_tuple=True)[0], u


#: Auxiliary loss name -> ``(candidate latents, their weights or None)`` of an SAE.
CANDIDATES: dict[str, Callable[[SAE], tuple[Tensor, Tensor | None]]] = {
    "auxk": _dead,
    "aux_zipf": _zipf,
}


def reconstruction(sae: SAE, x: Tensor, matmul_dtype: torch.dtype | None) -> Tensor | None:
    """``e_hat (N, d_out)``: the auxiliary code decoded without ``b_dec``, or None when the loss
    is off this step (no candidate on any process, coefficient 0, or not training).

    When the code is dense within the candidates (``aux_k`` above ``SPARSE_CODE_MAX_DENSITY``
    of them, e.g. close to the number of dead latents) and small, it is encoded and decoded with
    dense matmuls over the candidates' rows (:func:`_dense`); otherwise as pairs
    (:func:`_pairs`, sparse decode; latent-sharded SAEs always). Both give the same loss and
    gradients. The encoder rows are the same ``W_enc.T`` view the main code used: autograd then
    sums the two ``(d_sae, d_in)`` gradients before the one transposed copy into ``W_enc.grad``.
    """
    from .models import SPARSE_CODE_MAX_DENSITY

    if sae.cfg.aux_coefficient == 0 or not sae.training:
        cand, u = torch.empty(0, dtype=torch.long, device=x.device), None
    else:
        cand, u = CANDIDATES[sae.arch.aux](sae)
    n_cand = sae.collective.total(cand.numel())
    if n_cand == 0:
        return None
    k_aux = min(sae.cfg.aux_k, n_cand)
    if (sae.collective.local and k_aux > SPARSE_CODE_MAX_DENSITY * n_cand
            and x.shape[0] * n_cand <= DENSE_AUX_MAX_ENTRIES):
        return _dense(sae, x, cand, u, k_aux)
    rows, cols, vals = _pairs(sae, x, cand, u, k_aux, matmul_dtype)
    return sae.collective.decode(vals, rows, cols, sae.W_dec, x.shape[0])


def _dense(sae: SAE, x: Tensor, cand: Tensor, u: Tensor | None, k_aux: int) -> Tensor:
    """Through the ``(N, n_cand)`` pre-activations of the candidates: the core's
    ``TopK(k_aux, positive=True)`` projection of the (weighted) pre-activations, in the
    parameters' precision. ``u > 0`` on the candidates, so ``relu(pre) * u`` is
    ``relu(pre * u)``: selection and values come from one key."""
    key = preact(x, sae.W_enc.T[cand], sae.b_enc[cand], sae.b_in)
    if u is not None:
        key = key * u[cand].to(key.dtype)
    return ops.TopK(k_aux, positive=True).project(key) @ sae.W_dec[cand]


def _pairs(sae: SAE, x: Tensor, cand: Tensor, u: Tensor | None, k_aux: int,
           matmul_dtype: torch.dtype | None) -> tuple[Tensor, Tensor, Tensor]:
    """Auxiliary pairs ``(rows, cols, values)``: the top ``k_aux`` (weighted) pre-activations
    per token among the candidates, selected against those latents' encoder rows only (no
    ``(N, d_sae)`` pre-activations), values with the sparse encoder backward. When more than
    half of the latents are dead, AuxK selects against all rows with the live ones masked by a
    ``-inf`` bias instead of copying the dead rows."""
    W_rows, b_enc = sae.W_enc.T, sae.b_enc
    with torch.no_grad():
        if u is None and 2 * cand.numel() > sae.n_latents:
            cand = torch.arange(sae.n_latents, device=x.device)
            W_c, b_c = W_rows, b_enc.masked_fill(~sae.dead_mask(), -math.inf)
        else:
            W_c, b_c = W_rows[cand], b_enc[cand]
        if u is not None:  # select on u * pre: scale the rows (u > 0 on candidates)
            scale = u[cand].to(W_c.dtype)
            W_c, b_c = W_c * scale[:, None], b_c * scale
        rows, local, v = sae.collective.topk(x, W_c, b_c, sae.b_in, k_aux, matmul_dtype,
                                            latents=cand)
        if u is not None:
            v = v / scale[local]
    cols = cand[local]
    vals = sparse_preact(x, W_rows, b_enc, sae.collective.share(sae.b_in), rows, cols, v)
    return rows, cols, vals if u is None else vals * u[cols]
