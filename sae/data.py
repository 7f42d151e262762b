"""Activation data for SAE training: the batch-source protocol and in-memory / ``.npy`` sources.

Every source (an in-memory array, a ``.npy`` file, an on-disk cache, a live model) is an iterable
of batches, each batch a ``dict`` mapping a hook point name to a float ``(batch_size, d_in)``
tensor, so that several dictionaries (at several hook points) can train from one stream.
Sources are deterministic given their seed and support exact resume through ``state_dict`` /
``load_state_dict``: after loading a state, iteration continues with the batch that would have
come next.

Sources:

* :class:`ArrayActivations` (here): a tensor, a numpy array or a ``.npy`` file (memory-mapped,
  so files larger than memory work), shuffled in bounded memory, with a held-out tail.
* :class:`sae.cache.CachedActivations`: the sharded on-disk cache that ``sae cache`` writes.
* :class:`sae.live.LiveActivations`: a language model run over token contexts.

All are :class:`sae.stream.BlockShuffledSource` (one shuffle engine, one resume state) and drop
massive-norm rows with :class:`sae.massive.MassiveFilter` (re-exported here).
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

from .massive import MASSIVE_FACTOR, MassiveFilter, drop_massive, massive_mask
from .stream import BlockShuffledSource

__all__ = [
    "MASSIVE_FACTOR", "ActivationSource", "ArrayActivations", "BlockShuffledSource",
    "MassiveFilter", "check_finite", "drop_massive", "massive_mask", "open_activations",
]

@runtime_checkable
class ActivationSource(Protocol):
    """What the trainer consumes: batches of activations per hook point, resumable."""

    hookpoints: list[str]

    def __iter__(self) -> Iterator[dict[str, Tensor]]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


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


#: Default bytes per chunk when an ``ArrayActivations`` reads a file (see ``chunk_rows``).
CHUNK_BYTES = 256 * 2**20


class ArrayActivations(BlockShuffledSource):
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
    ``places`` (hook point -> width, in column order) splits each row into several aligned
    activations (a transcoder's input and output, a crosscoder's layers side by side): batches
    then hold one entry per place, and the massive filter drops a row from all places at once.
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
        places: dict[str, int] | None = None,
    ) -> None:
        self.path = Path(data) if isinstance(data, (str, os.PathLike)) else None
        arr, name = _as_array(data)
        shape = tuple(arr.shape)
        if not isinstance(hookpoint, str) or not hookpoint:
            raise ValueError(f"hookpoint must be a non-empty string, got {hookpoint!r}")
        places = {hookpoint: int(shape[1])} if places is None else dict(places)
        if sum(places.values()) != shape[1] or min(places.values()) < 1:
            raise ValueError(f"places {places} do not split the {shape[1]} columns of {name}")
        check_int("holdout", holdout, 0)
        n = shape[0]
        if holdout >= n:
            raise ValueError(
                f"holdout={holdout} leaves no training rows: {name} have only {n} rows"
            )
        self._data = arr
        self._name = name
        self.places = places
        self.hookpoints = list(places)
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
        return self._split(x)

    def _split(self, x: Tensor) -> dict[str, Tensor]:
        parts = x.split(list(self.places.values()), dim=1)
        return dict(zip(self.hookpoints, parts, strict=True))

    def heldout_batch(self) -> dict[str, Tensor]:
        """The last ``holdout`` rows per place (massive rows dropped if ``massive_factor`` is
        set)."""
        if self.holdout == 0:
            raise ValueError("no rows are held out: construct the source with holdout=N")
        x = self._rows(self.n_train, self.n_rows)
        if not self._heldout_checked:
            check_finite(x, self._name, row_offset=self.n_train)
            self._heldout_checked = True
        keep = self.massive.keep(self._split(x))
        if keep is not None:
            x = x[keep.to(x.device)]
        return self._split(x.to(device=self.device, dtype=self.dtype))

    def heldout(self) -> Tensor:
        """The last ``holdout`` rows of a one-place source (see :meth:`heldout_batch`)."""
        if len(self.places) != 1:
            raise ValueError("a source of several places: use heldout_batch()")
        return self.heldout_batch()[self.hookpoints[0]]

    def __repr__(self) -> str:
        src = str(self.path) if self.path else type(self._data).__name__
        return (
            f"ArrayActivations({src}, rows={self.n_rows}, d_in={self.d_in}, "
            f"batch_size={self.batch_size}, holdout={self.holdout})"
        )


def _as_array(data: Tensor | np.ndarray | str | os.PathLike) -> tuple[Any, str]:
    """The 2-D float array behind ``data`` (a ``.npy`` file is memory-mapped) and how to name
    it in errors."""
    if isinstance(data, (str, os.PathLike)):
        arr, name = _open_npy(Path(data)), f"activations in {Path(data)}"
    elif isinstance(data, Tensor):
        arr, name = data.detach(), "activations"
    elif isinstance(data, np.ndarray):
        arr, name = data, "activations"
    else:
        raise TypeError(
            "data must be a torch tensor, a numpy array or a path to a .npy file, "
            f"got {type(data).__name__}"
        )
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
    return arr, name


def open_activations(path: str | os.PathLike) -> np.ndarray:
    """The 2-D float array of a ``.npy`` file, memory-mapped and checked as every command
    reads one (``sae train --activations``, ``sae eval --activations``): float16/32/64 only,
    errors naming the file."""
    return _as_array(path)[0]


#: The first bytes of every ``.npy`` file.
NPY_MAGIC = b"\x93NUMPY"


def _open_npy(path: Path) -> np.ndarray:
    """Memory-map a ``.npy`` file, with errors that name the file."""
    if not path.exists():
        raise FileNotFoundError(f"activation file not found: {path}")
    if path.is_dir():
        raise IsADirectoryError(f"expected a .npy file, got the directory {path}")
    with open(path, "rb") as f:
        head = f.read(len(NPY_MAGIC))
    if head != NPY_MAGIC:
        what = "an empty file" if not head else "not a .npy file (it lacks the .npy header)"
        raise ValueError(f"{path} is {what}: write activations with numpy.save")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise ValueError(f"could not read {path} as a .npy file: {e}") from e
    if not isinstance(arr, np.ndarray):
        kind = type(arr).__name__
        raise ValueError(f"{path} is not a .npy file holding one array (np.load gave {kind})")
    return arr
