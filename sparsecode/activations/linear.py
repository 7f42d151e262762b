"""Sparse-input Linear layers for decoding: read only the weight columns of nonzero inputs.

Decoding one token at a time reads every weight once per token, so on a CPU (and on a GPU at
batch 1) a Linear layer's time is the time to stream its weight from memory. With a sparse input
only the columns of the nonzero entries are needed: ``y = sum_{i: x_i != 0} x_i W[:, i]``. With
the weight stored transposed (``W^T``, one contiguous row per input feature) that is a weighted
sum of gathered rows, which ``torch.nn.functional.embedding_bag`` computes in one fused call
(no gathered copy of the weight; differentiable in ``x`` and ``W^T``). Inputs of more than one
token take the dense product with the same stored weight.

:func:`sparse_decode` switches the chosen Linears of a model to this path inside a ``with``
block (the transposed copy lives only there); the activation-sparsity hooks of
:mod:`sparsecode.activations` produce the zeros it skips.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..hooks import resolve

__all__ = ["sparse_decode", "sparse_input_linear"]


def sparse_input_linear(x: Tensor, weight_t: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ weight_t + bias`` reading only the rows of ``weight_t (in, out)`` where a
    single-token ``x (..., in)`` is nonzero; more tokens: the dense product.

    >>> import torch
    >>> W = torch.randn(3, 4)
    >>> x = torch.tensor([0.0, 2.0, 0.0, -1.0])
    >>> torch.allclose(sparse_input_linear(x, W.T.contiguous()), x @ W.T)
    True
    """
    if x.shape[-1] != weight_t.shape[0]:
        raise ValueError(f"x has {x.shape[-1]} features, the weight reads {weight_t.shape[0]}")
    if x.numel() != x.shape[-1]:
        return F.linear(x, weight_t.T, bias)
    flat = x.reshape(-1)
    idx = flat.nonzero().squeeze(1)
    if idx.numel() == 0:
        y = weight_t.new_zeros(weight_t.shape[1]) + (0 if bias is None else bias)
        return y.reshape(*x.shape[:-1], -1)
    offsets = torch.zeros(1, dtype=torch.long, device=x.device)
    y = F.embedding_bag(idx, weight_t, offsets, mode="sum",
                        per_sample_weights=flat[idx].to(weight_t.dtype))[0]
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], -1)


class _SparseForward:
    """A Linear's ``forward`` reading its transposed weight through :func:`sparse_input_linear`."""

    def __init__(self, module: nn.Linear):
        self.weight_t = module.weight.detach().T.contiguous()
        self.bias = None if module.bias is None else module.bias.detach()

    def __call__(self, x: Tensor) -> Tensor:
        return sparse_input_linear(x, self.weight_t, self.bias)


@contextmanager
def sparse_decode(model: nn.Module, layers: str | Sequence[str]) -> Iterator[list[str]]:
    """Inside the block, the Linears named by ``layers`` (paths or globs; e.g. the
    ``linears`` of an :class:`~sparsecode.activations.ActivationSparsity`'s groups) compute
    single-token inputs with :func:`sparse_input_linear` from a transposed copy of their weight
    (inference only: no gradient reaches the module's weight). Hooks on the modules keep
    working. Yields the module paths switched; restored on exit, also on error.

    >>> import torch, transformers
    >>> cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
    ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
    >>> model = transformers.LlamaForCausalLM(cfg).eval()
    >>> ids = torch.randint(0, 64, (1, 1))  # one token: the decoding step
    >>> dense = model(input_ids=ids).logits
    >>> with sparse_decode(model, "model.layers.*.mlp.*") as names:
    ...     sparse = model(input_ids=ids).logits
    >>> len(names), torch.allclose(sparse, dense, atol=1e-5)
    (3, True)
    """
    mods = dict(model.named_modules())
    names = [n for n in resolve(model, layers) if isinstance(mods[n], nn.Linear)]
    try:
        for n in names:
            mods[n].forward = _SparseForward(mods[n])
        yield names
    finally:
        for n in names:
            mods[n].__dict__.pop("forward", None)
