"""Reading a cache: :class:`CachedActivations`, a shuffled, resumable activation source."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import safetensors.torch
import torch
from torch import Tensor

from sparsecode._arrays import check_int

from ..stream import BlockShuffledSource
from .format import _TENSOR, DTYPES, read_manifest


class CachedActivations(BlockShuffledSource):
    """Batches read from a cache written by :func:`write_cache` (an ActivationSource).

    Shuffle scheme (bounded memory): each epoch permutes the shard order with a generator seeded
    by ``(seed, epoch)``, reads the shards ``window_shards`` at a time and shuffles the rows within
    each window with a generator seeded by ``(seed, epoch, window)``; batches are cut from that
    stream (dropping the last partial batch of the epoch). Memory is about ``window_shards *
    shard_tokens * sum(d_in) * itemsize`` (twice that while a window is assembled). All hook
    points of a batch come from the same token positions. ``shuffle=False`` reads in order.

    ``holdout=N`` reserves the cache's last ``N`` rows, returned by :meth:`heldout`.
    ``verify=True`` checks each shard file's sha256 against the manifest before its first use
    (:func:`verify_cache` checks a whole cache up front). ``massive_factor`` drops positions
    whose norm at any selected hook point exceeds that factor times the median of the first
    shard (see :func:`sae.data.drop_massive`). Batches are ``dtype`` on ``device``; a
    bfloat16/float16 cache read with the same dtype is bit-exact. One iterator at a time:
    iteration continues from the current position (and starts over once the source is
    exhausted); ``state_dict``/``load_state_dict`` resume exactly.

    >>> import tempfile
    >>> from sae.cache import write_cache
    >>> x = torch.arange(24.0).reshape(12, 2)
    >>> d = write_cache([{"h": x}], tempfile.mkdtemp(), shard_tokens=5, progress=False)
    >>> src = CachedActivations(d, batch_size=4, holdout=2)
    >>> len(src), src.d_in
    (2, {'h': 2})
    >>> rows = torch.cat([b["h"] for b in src])[:, 0]  # 8 of the 10 training rows, shuffled
    >>> len(rows), len(set(rows.tolist())), bool((rows < 20).all())
    (8, 8, True)
    >>> src.heldout()["h"][:, 0].tolist()
    [20.0, 22.0]
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike,
        *,
        batch_size: int = 4096,
        hookpoints: list[str] | str | None = None,
        seed: int = 0,
        epochs: int | None = 1,
        shuffle: bool = True,
        holdout: int = 0,
        verify: bool = False,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        window_shards: int = 2,
        massive_factor: float | None = None,
        allow_incomplete: bool = False,
    ) -> None:
        self.cache_dir = Path(cache_dir)
        m = read_manifest(self.cache_dir)
        if not m["complete"] and not allow_incomplete:
            raise ValueError(
                f"the cache at {self.cache_dir} is incomplete ({m['total_rows']} rows; its writer "
                "was interrupted): finish it with write_cache(..., resume=True), or pass "
                "allow_incomplete=True to read the shards written so far"
            )
        if hookpoints is None:
            hps = list(m["hookpoints"])
        else:
            hps = [hookpoints] if isinstance(hookpoints, str) else list(hookpoints)
        unknown = [hp for hp in hps if hp not in m["hookpoints"]]
        if unknown or not hps or len(set(hps)) != len(hps):
            raise ValueError(
                f"hookpoints={hps} must be distinct hook points of the cache at "
                f"{self.cache_dir}, which holds {m['hookpoints']}"
                + (f" (not there: {unknown})" if unknown else "")
            )
        check_int("holdout", holdout, 0)
        check_int("window_shards", window_shards, 1)
        n = sum(s["rows"] for s in m["shards"])
        if holdout >= n:
            raise ValueError(
                f"holdout={holdout} leaves no training rows: the cache at {self.cache_dir} "
                f"holds {n} rows"
            )
        self.manifest = m
        self.metadata: dict = m.get("metadata", {})
        self.hookpoints = hps
        self.d_in: dict[str, int] = {hp: int(m["d_in"][hp]) for hp in hps}
        self.storage_dtype = DTYPES[m["dtype"]]
        self.n_rows = n
        self.holdout = holdout
        self.n_train = n - holdout
        self.verify = bool(verify)
        self._verified: set[tuple[int, str]] = set()
        self._starts = [0]
        for s in m["shards"]:
            self._starts.append(self._starts[-1] + s["rows"])
        self._units = [i for i in range(len(m["shards"])) if self._starts[i] < self.n_train]
        self._unit_rows = [
            min(m["shards"][i]["rows"], self.n_train - self._starts[i]) for i in self._units
        ]
        self._setup(
            batch_size=batch_size,
            seed=seed,
            epochs=epochs,
            shuffle=shuffle,
            group=window_shards,
            massive_factor=massive_factor,
            dtype=dtype,
            device=device,
        )

    def _load_shard(self, index: int, hp: str) -> Tensor:
        shard = self.manifest["shards"][index]
        info = shard["files"][hp]
        path = self.cache_dir / info["path"]
        if not path.is_file():
            raise FileNotFoundError(
                f"shard {info['path']} listed in the manifest of {self.cache_dir} is missing"
            )
        if self.verify and (index, hp) not in self._verified:
            data = path.read_bytes()
            digest = hashlib.sha256(data).hexdigest()
            if digest != info["sha256"]:
                raise ValueError(
                    f"shard {info['path']} of the cache at {self.cache_dir} is corrupt: its "
                    f"sha256 is {digest}, the manifest says {info['sha256']}"
                )
            tensors = safetensors.torch.load(data)
            self._verified.add((index, hp))
        else:
            tensors = safetensors.torch.load_file(path)
        x = tensors.get(_TENSOR)
        want = (shard["rows"], self.d_in[hp])
        if x is None or tuple(x.shape) != want or x.dtype != self.storage_dtype:
            got = "no tensor" if x is None else f"{tuple(x.shape)} {x.dtype}"
            raise ValueError(
                f"shard {info['path']} of the cache at {self.cache_dir} holds {got}, the "
                f"manifest says {want} {self.storage_dtype} in {_TENSOR!r}"
            )
        return x

    def _read_unit(self, unit: int) -> dict[str, Tensor]:
        index, rows = self._units[unit], self._unit_rows[unit]
        return {hp: self._load_shard(index, hp)[:rows] for hp in self.hookpoints}

    def heldout(self) -> dict[str, Tensor]:
        """The cache's last ``holdout`` rows per hook point (massive rows dropped if filtering)."""
        if self.holdout == 0:
            raise ValueError("no rows are held out: construct the source with holdout=N")
        parts: dict[str, list[Tensor]] = {hp: [] for hp in self.hookpoints}
        for i, s in enumerate(self.manifest["shards"]):
            lo = max(self.n_train - self._starts[i], 0)
            if lo >= s["rows"]:
                continue
            for hp in self.hookpoints:
                parts[hp].append(self._load_shard(i, hp)[lo:])
        out = {hp: torch.cat(p) for hp, p in parts.items()}
        keep = self.massive.keep(out)
        if keep is not None:
            out = {hp: x[keep] for hp, x in out.items()}
        return {hp: x.to(device=self.device, dtype=self.dtype) for hp, x in out.items()}

    def __repr__(self) -> str:
        return (
            f"CachedActivations({str(self.cache_dir)!r}, rows={self.n_rows}, "
            f"hookpoints={self.hookpoints}, batch_size={self.batch_size}, holdout={self.holdout})"
        )
