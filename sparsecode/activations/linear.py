"""Sparse-input Linear layers for decoding: read only the weight columns of nonzero inputs.

Decoding one token at a time reads every weight once per token, so on a CPU (and on a GPU at
batch 1) a Linear layer's time is the time to stream its weight from memory. With a sparse input
only the columns of the nonzero entries are needed: ``y = sum_{i: x_i != 0} x_i W[:, i]``. With
the weight stored transposed (``W^T``, one contiguous row per input feature) that is a weighted
sum of gathered rows: the solver core's bag sum (:func:`sparsecode.core.kernels.bag_sum`:
``embedding_bag`` on CPU, the core's Triton kernel on CUDA where its dispatch selects it; no
gathered copy of the weight), or, when a gradient is wanted, the core's ``sparse_decode`` (the
same sum with its sparse backward, in ``x`` and ``W^T``).

:func:`sparse_decode` runs a model's calibrated rules this way inside a ``with`` block: the
Linears of one group (q/k/v, gate/up) become one stacked transposed weight read by one gather,
the rule is applied inside that call instead of in a hook, and a rotated rule's rotation is
folded into the stacked weight (``W Q``). Inputs of more than one token take the dense product
of the same weight.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import kernels
from .attach import ActivationSparsity
from .rules import Group, stacked_weight

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
    vals = flat[idx].to(weight_t.dtype)
    if torch.is_grad_enabled() and (x.requires_grad or weight_t.requires_grad):
        y = kernels.sparse_decode(vals, torch.zeros_like(idx), idx, weight_t, 1)[0]
    else:
        y = kernels.bag_sum(idx, weight_t, idx.new_zeros(1), vals)[0]
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], -1)


class _GroupForward:
    """The ``forward`` of every Linear of one group: the rule and one gather over the group's
    stacked transposed weight, computed once per input tensor and split per Linear."""

    def __init__(self, model: nn.Module, group: Group):
        mods = dict(model.named_modules())
        lins = [mods[n] for n in group.linears]
        self.group, self.op = group, group.operator()
        self.weight_t = stacked_weight(model, group).T.contiguous()
        biases = [lin.bias for lin in lins]
        self.bias = None if all(b is None for b in biases) else torch.cat(
            [b.detach() if b is not None else lin.weight.new_zeros(lin.out_features)
             for b, lin in zip(biases, lins, strict=True)])
        self.sizes = [lin.out_features for lin in lins]
        self._last: tuple[Tensor, tuple[Tensor, ...]] | None = None

    def linear(self, j: int):
        def forward(x: Tensor) -> Tensor:
            if self._last is None or self._last[0] is not x:
                z = self.group.coords(x, self.op)
                y = sparse_input_linear(z, self.weight_t, self.bias)
                self._last = (x, y.split(self.sizes, dim=-1))
            return self._last[1][j]
        return forward


@contextmanager
def sparse_decode(model: nn.Module, rules: ActivationSparsity) -> Iterator[list[str]]:
    """Inside the block, ``rules`` run on ``model`` as sparse-input Linears (module docstring):
    one-token inputs read only the weight rows of nonzero coordinates, longer inputs take the
    dense product with the rule applied, so outputs equal those of ``rules`` attached as hooks
    (inference only: no gradient reaches the modules' weights). Hooks ``rules`` had attached are
    lifted inside and restored on exit, also on error. Yields the Linear paths switched.

    >>> import torch, transformers
    >>> from sparsecode.activations import sparsify_activations
    >>> cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
    ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
    >>> model = transformers.LlamaForCausalLM(cfg).eval()
    >>> rules = sparsify_activations(model, torch.randint(0, 64, (4, 16)), sparsity=0.5,
    ...                              allocation="uniform")   # attached as hooks
    >>> ids = torch.randint(0, 64, (1, 1))  # one token: the decoding step
    >>> hooked = model(input_ids=ids).logits
    >>> with sparse_decode(model, rules) as names:
    ...     fast = model(input_ids=ids).logits
    >>> len(names), torch.allclose(fast, hooked, atol=1e-5)
    (7, True)
    """
    if not isinstance(rules, ActivationSparsity):
        raise TypeError("sparse_decode needs the ActivationSparsity rules to run (from "
                        f"sparsify_activations or load), got {type(rules).__name__}")
    mods = dict(model.named_modules())
    was_attached = bool(rules._handles)
    rules.remove()
    names: list[str] = []
    gates = ActivationSparsity(rules.method, rules.allocation, rules.target,
                               [g for g in rules.groups if g.act is not None])
    try:
        gates.attach(model)  # CATS: the act_fn output hooks zero down_proj's input
        for g in rules.groups:
            fused = _GroupForward(model, g if g.act is None else _plain(g))
            for j, n in enumerate(g.linears):
                mods[n].forward = fused.linear(j)
                names.append(n)
        yield names
    finally:
        gates.remove()
        for n in names:
            mods[n].__dict__.pop("forward", None)
        if was_attached:
            rules.attach(model)


def _plain(group: Group) -> Group:
    """A CATS group's Linears read their (already gated) input as it is."""
    return Group(group.linears, group.width, group.params)
