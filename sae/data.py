"""Activation data for SAE training: the batch-source protocol and the massive-activation filter.

Every source (an in-memory array, a ``.npy`` file, an on-disk cache, a live model) is an iterable
of batches, each batch a ``dict`` mapping a hook point name to a float ``(batch_size, d_in)``
tensor, so that several SAEs (at several hook points) can train from one stream. Sources are
deterministic given their seed and support exact resume through ``state_dict`` /
``load_state_dict``: after loading a state, iteration continues with the batch that would have
come next.

Sources defined here:

* :class:`ArrayActivations`: a tensor, a numpy array or a ``.npy`` file (memory-mapped, so files
  larger than memory work), shuffled in bounded memory, with a held-out tail.
* :class:`sae.cache.CachedActivations` (in :mod:`sae.cache`): the sharded on-disk cache that
  ``sae cache`` writes.

Both share one shuffle engine: the rows are split into *units* read whole (a contiguous chunk of
the array, a cache shard); each epoch permutes the unit order, groups consecutive units into
*blocks*, shuffles the rows of each block with a generator seeded by ``(seed, epoch, block)`` and
cuts the resulting stream into batches, dropping the last partial batch of the epoch. Memory is
one block plus one batch; when everything fits in one block the shuffle is a full permutation.
A position in that stream is three integers, which is what ``state_dict`` stores.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from sparsecode._arrays import check_int

#: Default factor for :func:`drop_massive`: positions whose norm exceeds this many times the
#: median norm are dropped (SmolLM2's rare attention-sink positions reach ~70x the median).
MASSIVE_FACTOR = 10.0


@runtime_checkable
class ActivationSource(Protocol):
    """What the trainer consumes: batches of activations per hook point, resumable."""

    hookpoints: list[str]

    def __iter__(self) -> Iterator[dict[str, Tensor]]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def drop_massive(
    x: Tensor, factor: float = MASSIVE_FACTOR, median: float | Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Rows of ``x`` whose L2 norm is at most ``factor`` times the median row norm.

    Some language models write a few positions of enormous norm into the residual stream
    (attention sinks). They carry most of the variance, so left in they dominate both the
    training signal and the FVU. ``median`` fixes the reference norm (e.g. measured once on a
    first batch) so that filtering does not depend on batch composition; by default it is the
    median of ``x``'s own row norms. Returns ``(kept_rows, keep_mask)``.

    >>> x = torch.ones(5, 4); x[2] *= 1000
    >>> kept, mask = drop_massive(x)
    >>> kept.shape, mask.tolist()
    (torch.Size([4, 4]), [True, True, False, True, True])
    """
    mask = massive_mask(x, factor, median)
    return x[mask], mask


def massive_mask(
    x: Tensor, factor: float = MASSIVE_FACTOR, median: float | Tensor | None = None
) -> Tensor:
    """The keep mask of :func:`drop_massive`: ``norm(row) <= factor * median`` per row.

    >>> x = torch.ones(3, 2); x[0] *= 50
    >>> massive_mask(x).tolist()
    [False, True, True]
    """
    if not factor > 0:
        raise ValueError(f"factor must be > 0, got {factor}")
    norms = x.float().norm(dim=-1)
    ref = norms.median() if median is None else torch.as_tensor(median, dtype=norms.dtype)
    return norms <= factor * ref.to(norms.device)


def check_finite(x: Tensor | np.ndarray, what: str = "activations", *, row_offset: int = 0) -> None:
    """Raise ``ValueError`` if ``x`` holds NaN or inf, naming the first bad row and column.

    ``row_offset`` is added to the reported row, so a chunk of a larger array reports its row in
    the whole array.

    >>> check_finite(torch.ones(2, 3))
    >>> x = torch.zeros(4, 3); x[2, 1] = float("inf")
    >>> check_finite(x, row_offset=100)
    Traceback (most recent call last):
    ...
    ValueError: activations hold a non-finite value (inf) at row 102, column 1
    """
    # Fast path: a sum is finite when every term is (NaN and inf propagate); only a non-finite
    # sum (a bad value, or overflow of the sum itself) pays for the element-wise search.
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "fc":
            return
        with np.errstate(over="ignore", invalid="ignore"):
            if np.isfinite(x.sum(dtype=np.result_type(x.dtype, np.float32))):
                return
        finite = np.isfinite(x)
        if finite.all():
            return
        first = tuple(int(i) for i in np.argwhere(~finite)[0])
        value = x[first]
    else:
        if not (x.is_floating_point() or x.is_complex()):
            return
        acc = torch.promote_types(x.dtype, torch.float32)
        if x.numel() == 0 or bool(torch.isfinite(x.sum(dtype=acc))):
            return
        finite = torch.isfinite(x)
        if bool(finite.all()):
            return
        first = tuple((~finite).nonzero()[0].tolist())
        value = x[first].item()
    if len(first) == 0:
        where = ""
    elif len(first) == 1:
        where = f" at row {first[0] + row_offset}"
    else:
        rest = ", ".join(str(i) for i in first[1:])
        where = f" at row {first[0] + row_offset}, column {rest}"
    raise ValueError(f"{what} hold a non-finite value ({value}){where}")


def _generator(*key: int) -> torch.Generator:
    """A CPU generator seeded from a tuple of integers (stable across runs and platforms)."""
    words = [int(k) % 2**64 for k in key]
    state = np.random.SeedSequence(words).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def _check_epochs(epochs: int | None) -> None:
    if epochs is not None:
        check_int("epochs", epochs, 1)


class _BlockShuffledSource:
    """Shared engine of the file/array sources (see the module docstring for the scheme).

    Subclasses define ``hookpoints``, ``_unit_rows`` (training rows per unit) and ``_read_unit``
    (the training rows of one unit, in natural order, one tensor per hook point), then call
    ``_setup``.
    """

    hookpoints: list[str]
    _unit_rows: list[int]

    def _read_unit(self, unit: int) -> dict[str, Tensor]:
        raise NotImplementedError

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
    ) -> None:
        check_int("batch_size", batch_size, 1)
        check_int("seed", seed, -(2**63))
        _check_epochs(epochs)
        if massive_factor is not None and not massive_factor > 0:
            raise ValueError(f"massive_factor must be > 0 (or None), got {massive_factor}")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point torch dtype, got {dtype}")
        self.batch_size = batch_size
        self.seed = seed
        self.epochs = epochs
        self.shuffle = bool(shuffle)
        self.massive_factor = None if massive_factor is None else float(massive_factor)
        self.dtype = dtype
        self.device = torch.device(device)
        self._group = group
        self._kept: dict[int, int] = {}
        self.tokens_seen = 0
        self._pos = {"epoch": 0, "block": 0, "offset": 0, "batch": 0}
        n_train = sum(self._unit_rows)
        if n_train < batch_size:
            raise ValueError(
                f"only {n_train} training rows, fewer than batch_size={batch_size}: "
                "no full batch to yield (lower batch_size or holdout)"
            )
        #: Median row norm per hook point on the first unit; the massive filter's reference.
        self.massive_median: dict[str, float] | None = None
        if self.massive_factor is not None:
            first = self._read_unit(0)
            self.massive_median = {
                hp: float(t.float().norm(dim=-1).median()) for hp, t in first.items()
            }
            zero = [hp for hp, m in self.massive_median.items() if m == 0]
            if zero:
                raise ValueError(
                    f"the median row norm of the first {self._unit_rows[0]} rows is 0 at "
                    f"{zero}: massive_factor cannot filter relative to it"
                )
            self._keep_mask(0, first)

    # ----------------------------------------------------------------- the stream
    def _keep_mask(self, unit: int, data: dict[str, Tensor]) -> Tensor | None:
        """Rows of a unit that pass the massive filter on every hook point (None: no filter)."""
        if self.massive_factor is None:
            return None
        assert self.massive_median is not None
        mask = None
        for hp, t in data.items():
            m = massive_mask(t, self.massive_factor, self.massive_median[hp]).cpu()
            mask = m if mask is None else mask & m
        assert mask is not None
        self._kept[unit] = int(mask.sum())
        return mask

    def _epoch_blocks(self, epoch: int) -> list[list[int]]:
        n = len(self._unit_rows)
        if self.shuffle:
            order = torch.randperm(n, generator=_generator(self.seed, 0, epoch, 0)).tolist()
        else:
            order = list(range(n))
        return [order[i : i + self._group] for i in range(0, n, self._group)]

    def _block(self, epoch: int, index: int, units: list[int]) -> tuple[dict, Tensor]:
        """The rows of one block and the order (after the filter) in which they are served."""
        parts = [self._read_unit(u) for u in units]
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
        return data, order

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        """Batches from the current position on; a finished source starts over."""
        bs = self.batch_size
        if self.epochs is not None and self._pos["epoch"] >= self.epochs:
            self._pos = {"epoch": 0, "block": 0, "offset": 0, "batch": 0}
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
                        batch = {
                            hp: torch.cat([p[hp] for p in pieces]).to(
                                device=self.device, dtype=self.dtype
                            )
                            for hp in self.hookpoints
                        }
                        pieces, need, n_batch = [], bs, n_batch + 1
                        nxt = (b, off) if off < n else (b + 1, 0)
                        self._pos = {
                            "epoch": epoch,
                            "block": nxt[0],
                            "offset": nxt[1],
                            "batch": n_batch,
                        }
                        self.tokens_seen += bs
                        yield batch
                del data, order, dev_order
                b, off = b + 1, 0
            # the rest (< batch_size rows) of the epoch is dropped
            self._pos = {"epoch": epoch + 1, "block": 0, "offset": 0, "batch": 0}

    # ----------------------------------------------------------------- sizes
    def kept_rows(self) -> int:
        """Training rows served per epoch (after the massive filter, if any).

        With ``massive_factor`` set this reads every not-yet-seen unit once to count.
        """
        if self.massive_factor is None:
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
            "massive_factor": self.massive_factor,
            "hookpoints": list(self.hookpoints),
        }

    def state_dict(self) -> dict[str, Any]:
        """Position of the next batch: epoch, block, row offset in the block; JSON-serialisable."""
        return {**self._pos, "tokens_seen": self.tokens_seen, "config": self._config()}

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


#: Default bytes per chunk when an ``ArrayActivations`` reads a file (see ``chunk_rows``).
CHUNK_BYTES = 256 * 2**20


class ArrayActivations(_BlockShuffledSource):
    """Batches from one 2-D activation array: a tensor, a numpy array or a ``.npy`` file.

    A path is opened with ``np.load(mmap_mode="r")`` so files larger than memory work: the rows
    are read in contiguous chunks of ``chunk_rows`` rows (default: about 256 MiB of data for a
    file, all training rows for in-memory data), each chunk is checked for NaN/inf as it is first
    read, and rows are shuffled within a chunk. Shuffle scheme: per epoch the chunk order is
    permuted by a generator seeded by ``(seed, epoch)`` and the rows of each chunk by one seeded
    by ``(seed, epoch, chunk)``; batches are cut from that stream (a batch may span two chunks)
    and the last partial batch of each epoch is dropped. When all training rows fit in one chunk
    (the default for in-memory data) each epoch is a full permutation. ``shuffle=False`` serves
    rows in order.

    ``holdout=N`` reserves the last ``N`` rows: never served, returned by :meth:`heldout`.
    ``massive_factor`` drops rows whose norm exceeds that factor times the median row norm of the
    first chunk (see :func:`drop_massive`), in training batches and in :meth:`heldout` alike.
    ``epochs=None`` repeats forever. One iterator at a time: iteration continues from the
    current position (and starts over once the source is exhausted); ``state_dict`` /
    ``load_state_dict`` resume exactly.

    >>> x = torch.arange(20.0).reshape(10, 2)
    >>> src = ArrayActivations(x, batch_size=4, holdout=2, seed=0)
    >>> len(src), src.d_in, src.hookpoints
    (2, 2, ['activations'])
    >>> batches = [b["activations"] for b in src]
    >>> sorted(torch.cat(batches)[:, 0].tolist())  # 8 training rows, each once
    [0.0, 2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 14.0]
    >>> src.heldout()[:, 0].tolist()
    [16.0, 18.0]
    """

    def __init__(
        self,
        data: Tensor | np.ndarray | str | os.PathLike,
        *,
        batch_size: int = 4096,
        hookpoint: str = "activations",
        seed: int = 0,
        epochs: int | None = 1,
        shuffle: bool = True,
        holdout: int = 0,
        massive_factor: float | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        chunk_rows: int | None = None,
    ) -> None:
        self.path: Path | None = None
        if isinstance(data, (str, os.PathLike)):
            self.path = Path(data)
            arr = _open_npy(self.path)
        elif isinstance(data, Tensor):
            arr = data.detach()
        elif isinstance(data, np.ndarray):
            arr = data
        else:
            raise TypeError(
                "data must be a torch tensor, a numpy array or a path to a .npy file, "
                f"got {type(data).__name__}"
            )
        name = f"activations in {self.path}" if self.path else "activations"
        shape = tuple(arr.shape)
        if len(shape) != 2:
            raise ValueError(f"{name} must be a 2-D (rows, d_in) array, got shape {shape}")
        if shape[0] == 0 or shape[1] == 0:
            raise ValueError(f"{name} are empty (shape {shape})")
        if isinstance(arr, Tensor):
            if not arr.is_floating_point():
                raise ValueError(f"{name} must be floating point, got dtype {arr.dtype}")
        elif arr.dtype.kind != "f" or arr.dtype.itemsize > 8:
            raise ValueError(f"{name} must be float16, float32 or float64, got dtype {arr.dtype}")
        if not isinstance(hookpoint, str) or not hookpoint:
            raise ValueError(f"hookpoint must be a non-empty string, got {hookpoint!r}")
        check_int("holdout", holdout, 0)
        n = shape[0]
        if holdout >= n:
            raise ValueError(
                f"holdout={holdout} leaves no training rows: {name} have only {n} rows"
            )
        self._data = arr
        self._name = name
        self.hookpoints = [hookpoint]
        self.d_in = int(shape[1])
        self.n_rows = n
        self.holdout = holdout
        self.n_train = n - holdout
        in_memory = isinstance(arr, Tensor) or not isinstance(arr, np.memmap)
        if chunk_rows is None:
            itemsize = arr.element_size() if isinstance(arr, Tensor) else arr.dtype.itemsize
            by_bytes = max(1, CHUNK_BYTES // (self.d_in * itemsize))
            chunk_rows = self.n_train if in_memory else max(by_bytes, batch_size)
        check_int("chunk_rows", chunk_rows, 1)
        self.chunk_rows = min(chunk_rows, self.n_train)
        self._unit_rows = [
            min(self.chunk_rows, self.n_train - a) for a in range(0, self.n_train, self.chunk_rows)
        ]
        self._checked: set[int] = set()
        if in_memory:  # checked once up front; files are checked chunk by chunk as read
            step = max(1, 2**22 // self.d_in)
            for a in range(0, n, step):
                check_finite(arr[a : a + step], name, row_offset=a)
            self._checked.update(range(len(self._unit_rows)))
            self._heldout_checked = True
        else:
            self._heldout_checked = False
        self._setup(
            batch_size=batch_size,
            seed=seed,
            epochs=epochs,
            shuffle=shuffle,
            group=1,
            massive_factor=massive_factor,
            dtype=dtype,
            device=device,
        )

    def _rows(self, a: int, b: int) -> Tensor:
        """Rows ``a:b`` as a tensor (a view for in-memory data, a fresh read for a file)."""
        arr = self._data
        if isinstance(arr, Tensor):
            return arr[a:b]
        chunk = arr[a:b]
        if isinstance(chunk, np.memmap) or not chunk.dtype.isnative:
            chunk = np.array(chunk, dtype=chunk.dtype.newbyteorder("="))
        if any(s < 0 for s in chunk.strides):
            chunk = np.ascontiguousarray(chunk)
        with warnings.catch_warnings():  # read-only input arrays are only ever read
            warnings.filterwarnings("ignore", message=".*not writable.*")
            return torch.from_numpy(chunk)

    def _read_unit(self, unit: int) -> dict[str, Tensor]:
        a = unit * self.chunk_rows
        x = self._rows(a, a + self._unit_rows[unit])
        if unit not in self._checked:
            check_finite(x, self._name, row_offset=a)
            self._checked.add(unit)
        return {self.hookpoints[0]: x}

    def heldout(self) -> Tensor:
        """The last ``holdout`` rows (massive rows dropped if ``massive_factor`` is set)."""
        if self.holdout == 0:
            raise ValueError("no rows are held out: construct the source with holdout=N")
        x = self._rows(self.n_train, self.n_rows)
        if not self._heldout_checked:
            check_finite(x, self._name, row_offset=self.n_train)
            self._heldout_checked = True
        if self.massive_factor is not None:
            assert self.massive_median is not None
            hp = self.hookpoints[0]
            x = x[massive_mask(x, self.massive_factor, self.massive_median[hp]).to(x.device)]
        return x.to(device=self.device, dtype=self.dtype)

    def __repr__(self) -> str:
        src = str(self.path) if self.path else type(self._data).__name__
        return (
            f"ArrayActivations({src}, rows={self.n_rows}, d_in={self.d_in}, "
            f"batch_size={self.batch_size}, holdout={self.holdout})"
        )


def _open_npy(path: Path) -> np.ndarray:
    """Memory-map a ``.npy`` file, with errors that name the file."""
    if not path.exists():
        raise FileNotFoundError(f"activation file not found: {path}")
    if path.is_dir():
        raise IsADirectoryError(f"expected a .npy file, got the directory {path}")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise ValueError(f"could not read {path} as a .npy file: {e}") from e
    if not isinstance(arr, np.ndarray):
        kind = type(arr).__name__
        raise ValueError(f"{path} is not a .npy file holding one array (np.load gave {kind})")
    return arr
