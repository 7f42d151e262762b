"""k-sparse codes stored as (values, indices), and their decode.

A TopK SAE, OMP with ``n_nonzero_coefs=k`` and every top-k projection produce at most ``k`` nonzeros
per row. Keeping them as two ``(N, k)`` tensors instead of a dense ``(N, n_atoms)`` matrix saves
memory and lets the decoder gather ``k`` dictionary rows per signal instead of multiplying by the
whole dictionary.

Padding convention: unused slots hold index 0 and value 0, so they add nothing when decoded or
densified.

Example
-------
>>> import torch
>>> from sparsecode.core.sparse import SparseCodes
>>> codes = SparseCodes.from_dense(torch.tensor([[0.0, 2.0, 0.0, -1.0]]), k=2)
>>> codes.to_dense()
tensor([[ 0.,  2.,  0., -1.]])
>>> D = torch.eye(4)
>>> codes.decode(D)
tensor([[ 0.,  2.,  0., -1.]])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .kernels import row_pairs, sparse_decode
from .select import sorted_pairs, topk_rows


@dataclass
class SparseCodes:
    """Row-wise k-sparse codes: ``values[i, j]`` weighs atom ``indices[i, j]`` in row ``i``."""

    values: Tensor  # (N, k), float
    indices: Tensor  # (N, k), int64
    n_atoms: int

    def __post_init__(self) -> None:
        if self.values.shape != self.indices.shape or self.values.dim() != 2:
            raise ValueError(
                f"values and indices must both be (N, k); got {tuple(self.values.shape)} and "
                f"{tuple(self.indices.shape)}"
            )

    @property
    def shape(self) -> tuple[int, int]:
        """Shape of the dense code matrix."""
        return (self.values.shape[0], self.n_atoms)

    @classmethod
    def from_dense(cls, z: Tensor, k: int | None = None) -> SparseCodes:
        """Keep the ``k`` largest-magnitude entries per row (default: the largest row support);
        among equal magnitudes the lowest index first (the core's tie rule,
        :func:`sparsecode.core.select.topk_rows`).

        >>> SparseCodes.from_dense(torch.tensor([[1.0, -2.0, 2.0, 0.5]]), k=2).indices.tolist()
        [[1, 2]]
        """
        if k is None:
            k = int((z != 0).sum(dim=-1).max().item()) if z.numel() else 0
        k = max(min(k, z.shape[-1]), 1)
        idx = topk_rows(z.abs(), k)[1]
        vals = z.gather(-1, idx)
        idx = torch.where(vals != 0, idx, torch.zeros_like(idx))
        return cls(vals, idx, z.shape[-1])

    def pairs(self, scale: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """The nonzero codes as ``(rows, cols, values)`` sorted by row, then column; each value
        divided by ``scale[col]`` when given (codes against unit atoms -> codes against the
        unnormalised atoms).

        >>> codes = SparseCodes(torch.tensor([[2.0, 0.0], [4.0, 1.0]]),
        ...                     torch.tensor([[1, 0], [2, 0]]), 3)
        >>> [t.tolist() for t in codes.pairs(scale=torch.tensor([1.0, 1.0, 2.0]))]
        [[0, 1, 1], [1, 0, 2], [2.0, 1.0, 2.0]]
        """
        rows, cols, vals = row_pairs(self.values, self.indices, keep=self.values != 0)
        if scale is not None:
            vals = vals / scale[cols]
        return sorted_pairs(rows, cols, vals, self.n_atoms)

    def to_dense(self) -> Tensor:
        """The ``(N, n_atoms)`` dense code matrix."""
        out = self.values.new_zeros(self.shape)
        return out.scatter_add_(1, self.indices, self.values)

    def decode(self, dictionary: Tensor, bias: Tensor | None = None) -> Tensor:
        """``to_dense() @ dictionary (+ bias)`` computed as a gather of k atoms per row.

        Goes through :func:`sparsecode.core.kernels.sparse_decode` (the Triton bag-sum on GPU,
        ``embedding_bag`` elsewhere): never materialises the dense code, differentiable in
        ``values`` and ``dictionary``.
        """
        if dictionary.shape[0] != self.n_atoms:
            raise ValueError(
                f"dictionary has {dictionary.shape[0]} atoms but the codes index {self.n_atoms}"
            )
        rows, cols, vals = row_pairs(self.values, self.indices)
        return sparse_decode(vals, rows, cols, dictionary, self.values.shape[0], bias=bias)
