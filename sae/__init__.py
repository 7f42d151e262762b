"""sae: sparse autoencoders for interpretability, built on :mod:`sparsecode.core`.

* :class:`SAE` / :class:`SAEConfig`: one module for every architecture (relu, topk, batchtopk,
  jumprelu, matryoshka, mutual_choice, feature_choice); the activation is a core operator.
* :class:`Trainer` / :class:`TrainConfig`: training from any activation source, several SAEs
  side by side, exact resume.
* :mod:`sae.io`: SAELens-format folders (and sparsify's); :mod:`sae.metrics`: metric
  definitions; ``sae`` command: ``sae train``, ``sae eval``, ``sae cache``.
"""

from .architectures import ARCHITECTURES
from .config import SAEConfig, TrainConfig
from .models import SAE
from .train import Trainer

__all__ = ["ARCHITECTURES", "SAE", "SAEConfig", "TrainConfig", "Trainer"]
