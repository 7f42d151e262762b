"""Sparse encode / decode operations for k-sparse codes, with sparse backward passes.

The hot path of a sparse autoencoder is: encoder matmul -> select a few entries per row ->
decode those entries. These functions make everything after the matmul cost O(nnz * d) instead of
O(N * n_atoms * d), forward and backward:

* :func:`gather_preact` returns the selected encoder pre-activations
  ``((x - b_dec) @ W_enc^T + b_enc)[rows, cols]`` with a backward that only touches the selected
  pairs (the dense ``(N, n_atoms)`` gradient is never formed).
* :func:`sparse_decode` computes ``sum_j values_j W_dec[cols_j]`` per row (a ragged gather, via
  ``embedding_bag``), optionally per group of atoms (all Matryoshka prefixes in one pass).

A code is a set of ``(rows, cols)`` pairs sorted by row (what ``Projection.support`` returns)
with one value per pair. These are the torch implementations (CPU and GPU); fused Triton kernels
plug in behind the same functions.
"""

from .torch_ops import gather_preact, preact, row_offsets, sparse_decode

__all__ = ["gather_preact", "preact", "row_offsets", "sparse_decode"]
