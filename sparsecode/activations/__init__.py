"""Training-free activation sparsity at inference: the pruner's sibling for activations.

:mod:`sparsecode.prune` zeroes weights; this package zeroes the *inputs* of a model's Linear
layers, token by token, so that each Linear reads only the weight columns of the nonzero
inputs. The rule is the solver core's projection again (a per-activation threshold, ``Jump``,
or a per-token ``TopK``), calibrated on a little text through hooks like the pruner's Grams:

* methods: ``"magnitude"`` (TEAL), ``"wina"`` (|x| times the weight's column norm), ``"cats"``
  (the gate of a gated MLP), ``"topk"`` (exact per-token budget);
* allocation: ``"greedy"`` (TEAL's block-wise greedy search), ``"global"`` (cost curves from
  one backward pass, :mod:`sparsecode.activations.allocation`) or ``"uniform"``;
* ``rotate=True``: a gated MLP's input is sparsified in its principal basis (LaRoSA);
* :func:`sparse_decode` runs the rules as sparse-input Linears: single-token inputs read only
  the weight rows of the nonzero coordinates, one gather per activation;
* rules save to a small JSON (:meth:`ActivationSparsity.save`) that :func:`load` re-attaches.

See ``docs/activation_sparsity.md``.

>>> import torch, transformers
>>> from sparsecode.activations import sparsify_activations
>>> cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
...     num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2)
>>> model = transformers.LlamaForCausalLM(cfg).eval()
>>> ids = torch.randint(0, 64, (8, 16))
>>> rules = sparsify_activations(model, ids[:4], sparsity=0.5, allocation="uniform",
...                              heldout=ids[4:])
>>> len(rules.groups), round(rules.sparsity, 2)
(8, 0.5)
>>> rules.remove()  # dense again
"""

from ..prune.model import evaluate_perplexity
from .attach import ActivationSparsity, load
from .calibrate import Calibration, calibrate, measure_sparsity, sparsify_activations
from .linear import sparse_decode, sparse_input_linear
from .rules import METHODS, Group

__all__ = [
    "METHODS",
    "ActivationSparsity",
    "Calibration",
    "Group",
    "calibrate",
    "evaluate_perplexity",
    "load",
    "measure_sparsity",
    "sparse_decode",
    "sparse_input_linear",
    "sparsify_activations",
]
