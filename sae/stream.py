"""The shuffle-and-batch engine shared by every activation source (arrays, ``.npy`` files, the
on-disk cache, a live model).

A source splits its training rows into *units* read whole (a contiguous chunk of an array, a
cache shard, the activations of a few contexts of a live model) and says how to read one
(``_read_unit``: the rows of one unit, in natural order, one tensor per hook point). Each epoch
the engine permutes the unit order with a generator seeded by ``(seed, epoch)``, groups
consecutive units into *blocks*, drops the massive-norm rows (:class:`sae.massive.MassiveFilter`,
medians fitted on unit 0), shuffles the rows of each block with a generator seeded by
``(seed, epoch, block)`` and cuts the stream into batches; the last partial batch of an epoch is
dropped (or yielded, ``drop_last=False``). Memory is one block plus one batch; when everything
fits in one block the shuffle is a full permutation.

A position in that stream is three integers (epoch, block, row offset), which is what
``state_dict`` stores with the filter's medians and counters: after ``load_state_dict``,
iteration continues with the batch that would have come next.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sparsecode._arrays import check_int

from .massive import MassiveFilter


def _generator(*key: int) -> torch.Generator:
    """A CPU generator seeded from a tuple of integers (stable across runs and platforms)."""
    words = [int(k) % 2**64 for k in key]
    state = np.random.SeedSequence(words).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


_START = {"epoch": 0, "block": 0, "offset": 0, "batch": 0}


class BlockShuffledSource:
    """Base class of the activation sources (see the module docstring for the scheme).

    Subclasses define ``hookpoints``, ``_unit_rows`` (training rows per unit) and ``_read_unit``,
    then call ``_setup``. ``_cache_first_unit`` keeps unit 0 (read at setup to fit the massive
    filter) until the stream reaches it, for sources whose reads are expensive (a live model).
    ``n_positions`` / ``n_dropped_massive`` count the rows of the blocks read so far (each block
    once per epoch) and those the filter dropped.
    """

    hookpoints: list[str]
    _unit_rows: list[int]
    _cache_first_unit = False

    def _read_unit(self, unit: int) -> dict[str, Tensor]:
        raise NotImplementedError

    def _extra_config(self) -> dict[str, Any]:
        """Settings besides the engine's that a resumed stream must share."""
        return {}

    def _setup(
        self,
        *,
        batch_size: int,
        seed: int,
        epochs: int | None,
        shuffle: bool,
        group: int,
        massive_factor: float | None,
        dtype: torch.dtype,
        device: str | torch.device,
        drop_last: bool = True,
    ) -> None:
        check_int("batch_size", batch_size, 1)
        check_int("seed", seed, -(2**63))
        if epochs is not None:
            check_int("epochs", epochs, 1)
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point torch dtype, got {dtype}")
        self.massive = MassiveFilter(massive_factor, drop_bos=False)
        self.batch_size = batch_size
        self.seed = seed
        self.epochs = epochs
        self.shuffle = bool(shuffle)
        self.massive_factor = self.massive.factor
        self.dtype = dtype
        self.device = torch.device(device)
        self.drop_last = bool(drop_last)
        self._group = group
        self._kept: dict[int, int] = {}
        self._first: dict[str, Tensor] | None = None
        self.tokens_seen = 0
        self.n_positions = 0
        self.n_dropped_massive = 0
        self._counted = -1  # global index of the last block whose rows were counted
        self._pos = dict(_START)
        n_train = sum(self._unit_rows)
        if n_train < batch_size and drop_last:
            raise ValueError(
                f"only {n_train} training rows, fewer than batch_size={batch_size}: "
                "no full batch to yield (lower batch_size or holdout)"
            )
        if self.massive.factor is not None:
            first = self._read_unit(0)
            self.massive.fit(first)
            self._keep_mask(0, first)
            if self._cache_first_unit:
                self._first = first

    @property
    def massive_median(self) -> dict[str, float] | None:
        """Median row norm per hook point on the first unit; the massive filter's reference."""
        return self.massive.medians

    # ----------------------------------------------------------------- the stream
    def _unit(self, unit: int) -> dict[str, Tensor]:
        if unit == 0 and self._first is not None:
            first, self._first = self._first, None
            return first
        return self._read_unit(unit)

    def _keep_mask(self, unit: int, data: dict[str, Tensor]) -> Tensor | None:
        """Rows of a unit that pass the massive filter on every hook point (None: no filter)."""
        mask = self.massive.keep(data)
        if mask is not None:
            mask = mask.cpu()
            self._kept[unit] = int(mask.sum())
        return mask

    def _epoch_blocks(self, epoch: int) -> list[list[int]]:
        n = len(self._unit_rows)
        if self.shuffle:
            order = torch.randperm(n, generator=_generator(self.seed, 0, epoch, 0)).tolist()
        else:
            order = list(range(n))
        return [order[i : i + self._group] for i in range(0, n, self._group)]

    def _count(self, epoch: int, index: int, n: int, kept: int) -> None:
        blocks_per_epoch = -(-len(self._unit_rows) // self._group)
        global_index = epoch * blocks_per_epoch + index
        if global_index > self._counted:
            self._counted = global_index
            self.n_positions += n
            self.n_dropped_massive += n - kept

    def _block(self, epoch: int, index: int, units: list[int]) -> tuple[dict, Tensor]:
        """The rows of one block and the order (after the filter) in which they are served."""
        parts = [self._unit(u) for u in units]
        masks = [self._keep_mask(u, p) for u, p in zip(units, parts, strict=True)]
        if len(parts) == 1:
            data = parts[0]
        else:
            data = {hp: torch.cat([p[hp] for p in parts]) for hp in self.hookpoints}
        del parts
        n = next(iter(data.values())).shape[0]
        if self.shuffle:
            order = torch.randperm(n, generator=_generator(self.seed, 1, epoch, index))
        else:
            order = torch.arange(n)
        if masks[0] is not None:
            order = order[torch.cat(masks)[order]]
        self._count(epoch, index, n, len(order))
        return data, order

    def _batch(self, pieces: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        return {hp: torch.cat([p[hp] for p in pieces]).to(device=self.device, dtype=self.dtype)
                for hp in self.hookpoints}

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        """Batches from the current position on; a finished source starts over."""
        bs = self.batch_size
        if self.epochs is not None and self._pos["epoch"] >= self.epochs:
            self._pos = dict(_START)
            self.tokens_seen = 0
        while self.epochs is None or self._pos["epoch"] < self.epochs:
            epoch = self._pos["epoch"]
            blocks = self._epoch_blocks(epoch)
            b, off, n_batch = self._pos["block"], self._pos["offset"], self._pos["batch"]
            pieces: list[dict[str, Tensor]] = []
            need = bs
            while b < len(blocks):
                data, order = self._block(epoch, b, blocks[b])
                n = len(order)
                dev_order = {t.device: order.to(t.device) for t in data.values()}
                while off < n:
                    take = min(need, n - off)
                    pieces.append(
                        {hp: t[dev_order[t.device][off : off + take]] for hp, t in data.items()}
                    )
                    off += take
                    need -= take
                    if need == 0:
                        batch = self._batch(pieces)
                        pieces, need, n_batch = [], bs, n_batch + 1
                        nxt = (b, off) if off < n else (b + 1, 0)
                        self._pos = {"epoch": epoch, "block": nxt[0], "offset": nxt[1],
                                     "batch": n_batch}
                        self.tokens_seen += bs
                        yield batch
                del data, order, dev_order
                b, off = b + 1, 0
            self._pos = {"epoch": epoch + 1, "block": 0, "offset": 0, "batch": 0}
            if pieces and not self.drop_last:  # the rest (< batch_size rows) of the epoch
                batch = self._batch(pieces)
                self.tokens_seen += next(iter(batch.values())).shape[0]
                yield batch

    # ----------------------------------------------------------------- sizes
    def kept_rows(self) -> int:
        """Training rows served per epoch (after the massive filter, if any).

        With ``massive_factor`` set this reads every not-yet-seen unit once to count.
        """
        if self.massive.factor is None:
            return sum(self._unit_rows)
        for u in range(len(self._unit_rows)):
            if u not in self._kept:
                self._keep_mask(u, self._read_unit(u))
        return sum(self._kept.values())

    def __len__(self) -> int:
        """Batches per epoch (the last partial batch of each epoch is dropped)."""
        return self.kept_rows() // self.batch_size

    # ----------------------------------------------------------------- resume
    def _config(self) -> dict[str, Any]:
        return {
            "rows": sum(self._unit_rows),
            "units": len(self._unit_rows),
            "group": self._group,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "massive_factor": self.massive.factor,
            "hookpoints": list(self.hookpoints),
            **self._extra_config(),
        }

    def state_dict(self) -> dict[str, Any]:
        """Position of the next batch (epoch, block, row offset in the block), the filter's
        medians and the counters; JSON-serialisable."""
        medians = self.massive.medians
        return {**self._pos, "tokens_seen": self.tokens_seen,
                "medians": None if medians is None else [medians[hp] for hp in self.hookpoints],
                "n_positions": self.n_positions, "n_dropped_massive": self.n_dropped_massive,
                "counted_block": self._counted, "config": self._config()}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (from :meth:`state_dict` of an identically configured source)."""
        missing = {"epoch", "block", "offset", "batch", "tokens_seen", "config"} - set(state)
        if missing:
            raise ValueError(f"not a state of this source: missing keys {sorted(missing)}")
        mine = self._config()
        diff = [
            f"{k}={state['config'].get(k)!r} (this source has {mine[k]!r})"
            for k in mine
            if state["config"].get(k) != mine[k]
        ]
        if diff:
            raise ValueError(
                "state was saved by a differently configured source: " + "; ".join(diff)
            )
        self._pos = {k: int(state[k]) for k in ("epoch", "block", "offset", "batch")}
        self.tokens_seen = int(state["tokens_seen"])
        if state.get("medians") is not None:
            self.massive.medians = dict(zip(self.hookpoints, map(float, state["medians"]),
                                            strict=True))
        self.n_positions = int(state.get("n_positions", 0))
        self.n_dropped_massive = int(state.get("n_dropped_massive", 0))
        self._counted = int(state.get("counted_block", -1))
