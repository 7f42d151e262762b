"""Sparse encode / decode operations for k-sparse codes, with sparse backward passes.

The hot path of a sparse autoencoder is: encoder matmul -> select a few entries per row ->
decode those entries. These functions make everything after the matmul cost O(nnz * d) instead of
O(N * n_atoms * d), forward and backward:

* :func:`gather_preact` returns the selected encoder pre-activations
  ``((x - b_dec) @ W_enc^T + b_enc)[rows, cols]`` with a backward that only touches the selected
  pairs (the dense ``(N, n_atoms)`` gradient is never formed).
* :func:`sparse_decode` computes ``sum_j values_j W_dec[cols_j]`` per row (a ragged gather, via
  ``embedding_bag``), optionally per group of atoms (all Matryoshka prefixes in one pass).

* :func:`topk_encode` selects the k largest pre-activations per row without ever holding the
  ``(N, n_atoms)`` pre-activation matrix (fused Triton kernel on GPU; row chunks within a memory
  budget in the torch fallback); :func:`batch_topk_encode` does the same for a batch-wide budget
  of ``k * N`` (two passes), and :func:`feature_choice_encode` the per-atom top-m over the
  rows (the same selection on the transposed problem). Their values carry the sparse backward
  of :func:`gather_preact` (:func:`sparse_preact` attaches it to values computed elsewhere).
  :func:`threshold_encode` gives the ReLU / JumpReLU code (pre-activation above a per-atom
  threshold) the same way.

A code is a set of ``(rows, cols)`` pairs sorted by row (what ``Projection.support`` returns)
with one value per pair. Each function runs a Triton kernel on CUDA tensors when ``triton``
imports and the kernel covers the dtype / shape, and its torch implementation otherwise;
``SPARSECODE_DISABLE_TRITON=1`` forces the torch path (rules in :mod:`.dispatch`; docs/core.md).
"""

from ..select import merge_topk, row_pairs, sorted_pairs, topk_rows
from .dispatch import triton_available, use_triton
from .encode import batch_topk_encode, feature_choice_encode, threshold_encode, topk_encode
from .torch_ops import (
    bag_sum,
    gather_preact,
    pair_dot,
    preact,
    row_offsets,
    sparse_decode,
    sparse_preact,
)

__all__ = [
    "bag_sum",
    "batch_topk_encode",
    "feature_choice_encode",
    "merge_topk",
    "gather_preact",
    "pair_dot",
    "preact",
    "row_offsets",
    "row_pairs",
    "sorted_pairs",
    "sparse_decode",
    "sparse_preact",
    "threshold_encode",
    "topk_encode",
    "topk_rows",
    "triton_available",
    "use_triton",
]
