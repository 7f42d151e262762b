"""Pruning model weights with the solver core: layer-wise sparse regression on calibration Grams.

Pruning a linear layer ``W`` on calibration inputs ``X`` is, per output row, the sparse
regression ``min ||X^T (w - w')||^2`` over ``k``-sparse or N:M ``w'``. The default method
``"admm"`` solves it for the whole layer at once with the core's ADMM
(:func:`~sparsecode.core.admm.admm`) and its ``BatchTopK`` / ``TopK`` / ``NM`` projections;
``"alps"`` is the same with ALPS' adaptive penalty and a least-squares refit; ``"iht"`` (least
squares + IHT) and ``"omp"`` (greedy, unstructured) are the earlier solvers. The standard
methods (``magnitude``, ``wanda``, ``sparsegpt``) ship beside them, and
:func:`prune_structured` removes whole MLP neurons / attention heads. See ``docs/pruning.md``.

>>> import torch, transformers
>>> from sparsecode.prune import prune
>>> cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
...     num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2)
>>> model = transformers.LlamaForCausalLM(cfg).eval()
>>> report = prune(model, torch.randint(0, 64, (4, 16)), sparsity=0.5, method="wanda")
>>> len(report.layers), round(report.sparsity, 3)
(14, 0.5)
"""

from .layer import (
    admm_prune,
    alps_prune,
    iht_prune,
    layer_error,
    magnitude,
    omp_prune,
    prune_layer,
    relative_error,
    sparsegpt,
    wanda,
)
from .model import (
    LayerReport,
    PruneReport,
    decoder_layers,
    evaluate_perplexity,
    owl_sparsities,
    prune,
    save_pruned,
    semi_structured_available,
    to_semi_structured,
)

__all__ = [
    "LayerReport",
    "PruneReport",
    "admm_prune",
    "alps_prune",
    "decoder_layers",
    "evaluate_perplexity",
    "iht_prune",
    "layer_error",
    "magnitude",
    "omp_prune",
    "owl_sparsities",
    "prune",
    "prune_layer",
    "relative_error",
    "save_pruned",
    "semi_structured_available",
    "sparsegpt",
    "to_semi_structured",
    "wanda",
]
from .structured import (  # noqa: E402
    StructuredLayer,
    StructuredReport,
    channel_error,
    magnitude_channels,
    prune_structured,
    refit_channels,
    save_structured,
    select_channels,
)

__all__ += [
    "StructuredLayer",
    "StructuredReport",
    "channel_error",
    "magnitude_channels",
    "prune_structured",
    "refit_channels",
    "save_structured",
    "select_channels",
]
