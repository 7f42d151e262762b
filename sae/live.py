"""Activations of a live language model, as a shuffled, resumable batch source.

:class:`LiveActivations` runs the model over token contexts and yields shuffled batches of
activations at one or more hook points (one forward feeds them all, stopped right after the last
needed module), with the first position of each context and massive-norm positions dropped.
:func:`model_source` decides between computing the activations once and keeping them in memory
(several epochs over them) and streaming them, one model pass per epoch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from sparsecode.hooks import capture, resolve
from sparsecode.lm import device_of

from .data import ArrayActivations
from .massive import MASSIVE_FACTOR
from .stream import BlockShuffledSource

__all__ = ["MATERIALIZE_BYTES", "LiveActivations", "model_source"]

#: Live activations whose total size is below this are computed once and kept in memory.
MATERIALIZE_BYTES = 4 * 2**30


class LiveActivations(BlockShuffledSource):
    """Shuffled batches of live model activations at one or more hook points.

    Iterating yields ``{hookpoint: (batch_size, d) tensor}`` dicts whose rows are aligned across
    hook points (row ``i`` of every entry comes from the same token). The stream is the one of
    :mod:`sae.stream` with a *unit* of ``contexts_per_forward`` contexts (rows of ``tokens``):
    reading a unit is one forward of the model for all hook points, stopped right after the last
    needed module (called as ``model(input_ids=..., use_cache=False)``, as Hugging Face language
    models are), position 0 of every context dropped when ``drop_bos`` (the BOS that
    :func:`sparsecode.text.pack_tokens` puts there, an attention sink either way). Per epoch the
    units are permuted (kept in order with ``shuffle_contexts=False``), taken in blocks of about
    ``block_tokens`` tokens, massive-norm positions dropped (:class:`sae.massive.MassiveFilter`
    with ``massive_factor``: at any hook point, against medians fitted on unit 0 and kept in the
    state) and the block's rows shuffled. The final partial batch of an epoch is dropped unless
    ``drop_last=False``.

    Exact resume: :meth:`state_dict` holds the position, the medians and counters;
    :meth:`load_state_dict` recomputes the current block deterministically.

    Measured on SmolLM2-135M, layer 15, builtin text, one CPU thread: about 1,000 tokens/s; the
    median norm is about 171, position 0 reaches about 25,000 and 0.03% of the other positions
    exceed 10x the median and are dropped.
    """

    _cache_first_unit = True

    def __init__(
        self,
        model: nn.Module,
        tokens: Tensor,
        hookpoints: str | Sequence[str],
        *,
        batch_size: int = 4096,
        contexts_per_forward: int = 8,
        block_tokens: int = 65536,
        drop_bos: bool = True,
        massive_factor: float | None = MASSIVE_FACTOR,
        seed: int = 0,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        epochs: int | None = 1,
        shuffle_contexts: bool = True,
        drop_last: bool = True,
        progress: bool = False,
    ):
        if not isinstance(tokens, Tensor) or tokens.dim() != 2:
            raise ValueError("tokens must be a 2-D LongTensor (n_contexts, context_size)")
        if tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens must hold integer ids, got {tokens.dtype}")
        n_ctx, ctx = tokens.shape
        if n_ctx == 0 or ctx - int(drop_bos) < 1:
            raise ValueError(f"tokens of shape {tuple(tokens.shape)} give no positions")
        for what, v in (("contexts_per_forward", contexts_per_forward),
                        ("block_tokens", block_tokens)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{what} must be a positive int, got {v!r}")
        self.model = model
        self.tokens = tokens.long()
        self.hookpoints: list[str] = resolve(model, hookpoints)
        self.contexts_per_forward = contexts_per_forward
        self.drop_bos = bool(drop_bos)
        self.progress = progress
        self.n_forwards = 0
        self._bar: Any = None
        per_context = ctx - int(drop_bos)
        self._unit_rows = [min(contexts_per_forward, n_ctx - a) * per_context
                           for a in range(0, n_ctx, contexts_per_forward)]
        group = max(1, block_tokens // (ctx * contexts_per_forward))
        self._setup(batch_size=batch_size, seed=seed, epochs=epochs, shuffle=shuffle_contexts,
                    group=group, massive_factor=massive_factor, dtype=dtype,
                    device=device if device is not None else "cpu", drop_last=drop_last)

    @property
    def reference_medians(self) -> dict[str, float] | None:
        """Median activation norm per hook point on the first unit (``None`` without a filter)."""
        return self.massive.medians

    def _extra_config(self) -> dict[str, Any]:
        n_ctx, ctx = self.tokens.shape
        return {"n_contexts": int(n_ctx), "context_size": int(ctx),
                "contexts_per_forward": self.contexts_per_forward, "drop_bos": self.drop_bos}

    @torch.no_grad()
    def _read_unit(self, unit: int) -> dict[str, Tensor]:
        """Activations ``(contexts * positions, d)`` per hook point of one forward."""
        a = unit * self.contexts_per_forward
        contexts = self.tokens[a : a + self.contexts_per_forward].to(device_of(self.model))
        start = 1 if self.drop_bos else 0
        with capture(self.model, self.hookpoints, stop_early=True) as acts:
            acts.run(input_ids=contexts, use_cache=False)
        self.n_forwards += 1
        self._progress(contexts.numel())
        return {p: acts[p][:, start:].reshape(-1, acts[p].shape[-1]).to(self.device, self.dtype)
                for p in self.hookpoints}

    def __len__(self) -> int:
        # counting the batches after the massive filter would need a pass of the model
        raise TypeError("a live activation stream has no length before it has been read")

    def _progress(self, n: int) -> None:
        if not self.progress:
            return
        if self._bar is None:
            from tqdm.auto import tqdm

            self._bar = tqdm(unit="tok", desc="activations", leave=False)
        self._bar.update(n)

    def __repr__(self) -> str:
        n_ctx, ctx = self.tokens.shape
        return (
            f"LiveActivations({n_ctx}x{ctx} tokens, hookpoints={self.hookpoints}, "
            f"batch_size={self.batch_size}, epochs={self.epochs})"
        )


def _collect(src: LiveActivations) -> dict[str, Tensor]:
    parts: dict[str, list[Tensor]] = {hp: [] for hp in src.hookpoints}
    for batch in src:
        for hp, t in batch.items():
            parts[hp].append(t)
    return {hp: torch.cat(p) for hp, p in parts.items()}


def model_source(
    model: nn.Module,
    tokens: Tensor,
    hookpoints: str | Sequence[str],
    *,
    batch_size: int,
    total_tokens: int,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = False,
    dist: Any = None,
    max_bytes: int = MATERIALIZE_BYTES,
) -> BlockShuffledSource:
    """The training stream of ``model`` at ``hookpoints`` (one forward captures them all: a
    transcoder's input and output, a crosscoder's layers) over ``tokens``.

    When all the activations fit in ``max_bytes`` they are computed once (one model pass) and
    served for as many epochs as needed from memory (:class:`ArrayActivations`); otherwise they
    stream live, one model pass per epoch. Either way, BOS and massive positions are dropped.

    Distributed (``dist``, a :class:`sae.distributed.Dist`): in the first case every process
    computes a contiguous share of the contexts and the shares are all-gathered, so every rank
    holds the same array (filtered against medians fitted on the whole of it); in the second each
    data-parallel rank streams its own share with ``batch_size / data ranks`` rows per step.
    """
    from sparsecode.lm import hidden_size

    hookpoints = resolve(model, hookpoints)
    widths = {hp: hidden_size(model, hp) for hp in hookpoints}
    live = dict(seed=seed, device=device, progress=progress)
    if tokens.numel() * sum(widths.values()) * 4 <= max_bytes:
        share = tokens if dist is None else tokens.tensor_split(dist.world)[dist.rank]
        once = LiveActivations(model, share, hookpoints, batch_size=batch_size, epochs=1,
                               drop_last=False, shuffle_contexts=False,
                               massive_factor=None if dist is not None else MASSIVE_FACTOR,
                               **live)
        parts = _collect(once)
        acts = torch.cat([parts[hp] for hp in hookpoints], dim=1) if len(parts) > 1 else \
            parts[hookpoints[0]]
        del parts
        array = dict(batch_size=batch_size, seed=seed, epochs=None, places=widths)
        if dist is None:
            return ArrayActivations(acts, **array)
        from .distributed import all_gather_rows

        acts = all_gather_rows(acts.to(dist.device), None).cpu()
        return ArrayActivations(acts, massive_factor=MASSIVE_FACTOR, **array)
    epochs = max(1, math.ceil(total_tokens / max(tokens.numel(), 1)))
    if dist is not None:
        tokens = tokens.tensor_split(dist.data_size)[dist.data_rank]
        batch_size //= dist.data_size
    return LiveActivations(model, tokens, hookpoints, batch_size=batch_size, epochs=epochs,
                           **live)
