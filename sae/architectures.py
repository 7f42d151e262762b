"""SAE architectures as presets: one table, one row per name users type.

An architecture is not a branch in the model: it is a choice of independent parts,

* **activation**: a projection of :mod:`sparsecode.core.operators` (``TopK``, ``BatchTopK``,
  ``FeatureChoice``, ``Jump``) that the SAE calls to encode (fused, as pairs) while training;
* **threshold**: where a JumpReLU threshold comes from, if any: ``learned`` (a parameter with
  the straight-through gradient), ``batch`` / ``latent`` (a running estimate of the smallest
  selected value, global or per latent, that turns a batch-dependent activation into a per-token
  JumpReLU at inference);
* **penalty**: the sparsity term of the loss: ``l1`` (weighted by decoder norms, so the decoder
  is not kept at unit norm) or ``l0`` (JumpReLU's straight-through L0), none for the budgets;
* **aux**: the auxiliary loss for dead or under-used latents: ``auxk`` (top-``aux_k`` of the
  dead latents on the residual) or ``aux_zipf`` (under-used latents weighted by their shortfall
  against a Zipf target);
* **prefixes**: Matryoshka's loss summed over nested prefixes of the latents;
* **tied**: the encoder is the decoder's transpose (no ``W_enc`` / ``b_enc`` parameters);
* **learner**: ``gradient`` (Adam on the loss) or ``online`` (online dictionary learning on the
  decoder, :mod:`sae.learners`);
* **saelens**: the inference form written to disk (SAELens' ``architecture``: ``standard``,
  ``topk``, ``jumprelu`` or ``matching_pursuit``), computed by :data:`INFERENCE`.

Adding an activation is one operator in the core plus one row here.

>>> ARCHITECTURES["batchtopk"].saelens, ARCHITECTURES["batchtopk"].threshold
('jumprelu', 'batch')
>>> LOADED_AS["jumprelu"]
'jumprelu'
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor

from sparsecode.core.operators import BatchTopK, FeatureChoice, Jump, Projection, TopK
from sparsecode.core.pursuit import MatchingPursuit, OrthogonalPursuit

if TYPE_CHECKING:
    from .config import SAEConfig

#: What an SAE encodes with: a projection of the core, or a pursuit.
Activation = Projection | MatchingPursuit | OrthogonalPursuit

#: Threshold kinds estimated while training (the batch-dependent activations' inference form).
RUNNING_THRESHOLDS = ("batch", "latent")


@dataclass(frozen=True)
class Architecture:
    """One preset: the parts an SAE of this name is made of (see the module docstring)."""

    name: str
    description: str
    activation: Callable[[SAEConfig, Tensor], Activation]
    saelens: str
    threshold: str | None = None
    penalty: str | None = None
    aux: str | None = None
    prefixes: bool = False
    tied: bool = False
    learner: str = "gradient"

    @property
    def unit_decoder(self) -> bool:
        """Decoder rows are kept at unit norm (not with the decoder-norm-weighted L1)."""
        return self.penalty != "l1"

    @property
    def budgeted(self) -> bool:
        """``k`` is the activation's budget (active latents per token, or their average), not
        only a target of the sparsity penalty."""
        return self.penalty is None


def _topk(cfg: SAEConfig, theta: Tensor) -> Projection:
    return TopK(cfg.k, positive=True)


def _batch_topk(cfg: SAEConfig, theta: Tensor) -> Projection:
    return BatchTopK(cfg.k, positive=True)


def _feature_choice(cfg: SAEConfig, theta: Tensor) -> Projection:
    return FeatureChoice(k=cfg.k, positive=True)


def _relu(cfg: SAEConfig, theta: Tensor) -> Projection:
    return Jump(0.0)


def _jumprelu(cfg: SAEConfig, theta: Tensor) -> Projection:
    return Jump(theta, bandwidth=cfg.bandwidth)


#: The pursuits a tied dictionary codes with (``SAEConfig.pursuit``): non-negative, as SAE
#: latents are; only ``mp`` has a gradient, ``nnomp`` (OMP with a non-negative refit) codes
#: ``online_dl`` dictionaries.
PURSUITS = ("mp", "nnomp")


def _pursuit(cfg: SAEConfig, theta: Tensor) -> Activation:
    if cfg.pursuit == "mp":
        return MatchingPursuit(cfg.k, cfg.residual_threshold)
    return OrthogonalPursuit(cfg.k, cfg.residual_threshold, selection=cfg.pursuit)


_ROWS = [
    Architecture("relu", "ReLU + L1 penalty weighted by decoder norms (Anthropic's April 2024 "
                 "recipe)", _relu, "standard", penalty="l1"),
    Architecture("topk", "top-k per token (Gao et al. 2024), AuxK on dead latents", _topk,
                 "topk", aux="auxk"),
    Architecture("batchtopk", "k*B largest over the batch (Bussmann et al. 2024), AuxK",
                 _batch_topk, "jumprelu", threshold="batch", aux="auxk"),
    Architecture("jumprelu", "learned per-latent threshold, L0 via straight-through estimator",
                 _jumprelu, "jumprelu", threshold="learned", penalty="l0"),
    Architecture("matryoshka", "batch top-k with nested latent prefixes, loss summed over "
                 "prefixes", _batch_topk, "jumprelu", threshold="batch", aux="auxk",
                 prefixes=True),
    Architecture("mutual_choice", "budget k*B over all token-latent pairs (Ayonrinde 2024), "
                 "aux_zipf", _batch_topk, "jumprelu", threshold="batch", aux="aux_zipf"),
    Architecture("feature_choice", "each latent picks its top m tokens (Ayonrinde 2024), "
                 "aux_zipf", _feature_choice, "jumprelu", threshold="latent", aux="aux_zipf"),
    Architecture("mp", "matching pursuit with a tied encoder, k steps (Costa et al. 2025)",
                 _pursuit, "matching_pursuit", tied=True),
    Architecture("online_dl", "online dictionary learning (Mairal et al. 2010) on the decoder, "
                 "coding with a pursuit (mp or nnomp)", _pursuit, "matching_pursuit",
                 tied=True, learner="online"),
]
ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in _ROWS}


def _inference_relu(cfg: SAEConfig, theta: Tensor) -> Projection:
    return Jump(0.0)


def _inference_jumprelu(cfg: SAEConfig, theta: Tensor) -> Projection:
    return Jump(theta.detach().clamp_min(0))


#: SAELens inference form -> the activation a saved SAE computes (per token, batch-free).
INFERENCE: dict[str, Callable[[SAEConfig, Tensor], Activation]] = {
    "standard": _inference_relu,
    "topk": _topk,
    "jumprelu": _inference_jumprelu,
    "matching_pursuit": _pursuit,
}

#: SAELens inference form -> the architecture a saved SAE loads as: the first one whose
#: training activation is its inference form (no running threshold), so a matching-pursuit
#: file loads as ``mp`` (gradient-trained), not ``online_dl``.
LOADED_AS: dict[str, str] = {}
for _row in _ROWS:
    if _row.threshold not in RUNNING_THRESHOLDS:
        LOADED_AS.setdefault(_row.saelens, _row.name)


def check_architecture(name: str) -> Architecture:
    """The preset called ``name``; ``ValueError`` naming the known ones otherwise."""
    if name not in ARCHITECTURES:
        raise ValueError(
            f"unknown architecture {name!r}; known architectures: {', '.join(ARCHITECTURES)}"
        )
    return ARCHITECTURES[name]


def default_group_sizes(d_sae: int) -> list[int]:
    """Matryoshka groups of 1/16, 1/16, 1/8, 1/4, 1/2 of the latents (Bussmann et al. 2025)."""
    fractions = [1 / 16, 1 / 16, 1 / 8, 1 / 4]
    sizes = [max(1, int(d_sae * f)) for f in fractions]
    if sum(sizes) >= d_sae:
        return [d_sae]
    return [*sizes, d_sae - sum(sizes)]
