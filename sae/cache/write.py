"""Writing a cache: :func:`write_cache` (atomic shards and manifest, resumable)."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import Tensor
from tqdm.auto import tqdm

from sparsecode._arrays import check_int
from sparsecode._files import atomic_write

from ..data import check_finite
from .format import (
    _SHARD_RE,
    _TENSOR,
    DTYPES,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    _check_hookpoint_name,
    _dtype_name,
    _file_problem,
    _jsonable,
    _shard_path,
    read_manifest,
)


def write_cache(
    batches: Iterable[dict[str, Tensor]],
    out_dir: str | os.PathLike,
    *,
    shard_tokens: int = 65536,
    dtype: torch.dtype = torch.float32,
    metadata: dict | None = None,
    total_tokens: int | None = None,
    progress: bool = True,
    resume: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write a stream of activation batches to a sharded on-disk cache; return its directory.

    ``batches`` yields ``dict[hookpoint -> (rows, d_in) tensor]`` (any
    :class:`~sae.data.ActivationSource`, or a plain iterable); all hook points of a batch must
    have the same rows. They are stored in ``dtype`` (float32, bfloat16 or float16) in shards of
    ``shard_tokens`` rows (the last may be shorter), at most ``total_tokens`` rows in all.
    NaN/inf, or values that overflow float16, raise ``ValueError`` naming the row.

    Resume: a cache whose writer was interrupted is continued when ``resume=True``. Listed
    shards are kept after checking their checksums (the first damaged one and everything after it
    are rewritten); temporary and unlisted files are deleted. The rows already stored are then
    skipped, and ``total_tokens=None`` keeps the target the cache was started with. If
    ``batches`` has ``state_dict``/``load_state_dict`` (an ActivationSource), the
    manifest stores its state at each shard boundary and resuming restores that state instead of
    re-reading the stream from the start (pass a freshly built source, configured as the first
    time; a state that is not JSON-serialisable falls back to skipping, with a warning);
    otherwise ``batches`` must yield the same rows in the same order as the first time (a
    deterministic source, e.g. the same model, text and seed).
    Either way a resumed cache is byte-identical to one written without interruption.

    A complete cache is not touched unless ``overwrite=True``; resuming a cache written with a
    different dtype, ``shard_tokens``, hook points, ``d_in`` or ``metadata`` raises.

    >>> import tempfile
    >>> x = torch.randn(10, 4)
    >>> d = write_cache([{"h": x[:6]}, {"h": x[6:]}], tempfile.mkdtemp(), shard_tokens=4,
    ...                 metadata={"model": "toy"}, progress=False)
    >>> m = read_manifest(d)
    >>> m["complete"], m["total_rows"], [s["rows"] for s in m["shards"]], m["d_in"]
    (True, 10, [4, 4, 2], {'h': 4})
    """
    check_int("shard_tokens", shard_tokens, 1)
    dtype_name = _dtype_name(dtype)
    if total_tokens is not None:
        check_int("total_tokens", total_tokens, 1)
    meta = _jsonable(metadata, "metadata") if metadata is not None else None
    if meta is not None and not isinstance(meta, dict):
        raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}")
    out = Path(out_dir)
    manifest = _prepare(out, dtype_name, shard_tokens, meta, resume=resume, overwrite=overwrite)
    if manifest is not None and total_tokens is None:
        total_tokens = manifest.get("total_tokens")  # a resumed write keeps its target
    if manifest is None:
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "complete": False,
            "hookpoints": None,
            "d_in": None,
            "dtype": dtype_name,
            "shard_tokens": shard_tokens,
            "total_rows": 0,
            "total_tokens": total_tokens,
            "metadata": meta if meta is not None else {},
            "shards": [],
        }
    return _Writer(out, manifest, total_tokens, progress).run(batches)


def _prepare(
    out: Path,
    dtype_name: str,
    shard_tokens: int,
    meta: dict | None,
    *,
    resume: bool,
    overwrite: bool,
) -> dict | None:
    """Decide between a fresh cache (None) and resuming the existing one (its manifest)."""
    if (out / MANIFEST).exists():
        old = read_manifest(out)
        n, k = old["total_rows"], len(old["shards"])
        if old["complete"] and not overwrite:
            raise FileExistsError(
                f"{out} already holds a complete activation cache ({n} rows); "
                "pass overwrite=True to replace it"
            )
        if not old["complete"] and not resume and not overwrite:
            raise FileExistsError(
                f"{out} holds an incomplete activation cache ({n} rows in {k} shards); pass "
                "resume=True to continue it or overwrite=True to start over"
            )
        if old["complete"] or not resume:
            _remove_cache(out, old)
            return None
        _check_agreement(out, old, dtype_name, shard_tokens, meta)
        _keep_valid_shards(out, old)
        return old
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"cache directory {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{out} is not empty and holds no {MANIFEST}; choose a new or empty directory, or "
            "pass overwrite=True to write into it"
        )
    return None


def _check_agreement(
    out: Path, old: dict, dtype_name: str, shard_tokens: int, meta: dict | None
) -> None:
    pairs = [("dtype", dtype_name), ("shard_tokens", shard_tokens)]
    if meta is not None:
        pairs.append(("metadata", meta))
    for key, now in pairs:
        if old[key] != now:
            raise ValueError(
                f"cannot resume the cache at {out}: it was written with {key}={old[key]!r}, "
                f"this call asks for {key}={now!r} (pass the same value, or overwrite=True to "
                "start over)"
            )


def _keep_valid_shards(out: Path, m: dict) -> None:
    """Truncate the shard list at the first damaged shard and delete stray files."""
    for i in range(len(m["shards"])):
        for hp in m["hookpoints"]:
            problem = _file_problem(out, m, i, hp)
            if problem is not None:
                path = m["shards"][i]["files"][hp]["path"]
                warnings.warn(
                    f"resuming {out}: shard {path} {problem}; rewriting from shard {i} on",
                    stacklevel=3,
                )
                del m["shards"][i:]
                break
        else:
            continue
        break
    m["total_rows"] = sum(s["rows"] for s in m["shards"])
    atomic_write(out / MANIFEST, _manifest_bytes(m))
    for hp in m["hookpoints"] or []:
        _clean_dir(out / hp, keep=len(m["shards"]))


def _clean_dir(d: Path, keep: int) -> None:
    """Delete temporary files and shards with index >= ``keep`` from a hook point directory."""
    if not d.is_dir():
        return
    for f in d.iterdir():
        match = _SHARD_RE.match(f.name)
        stray_tmp = f.name.startswith(".shard_") and f.name.endswith(".tmp")
        if stray_tmp or (match is not None and int(match.group(1)) >= keep):
            f.unlink()


def _remove_cache(out: Path, m: dict) -> None:
    (out / MANIFEST).unlink()
    for hp in m["hookpoints"] or []:
        d = out / hp
        _clean_dir(d, keep=0)
        if d.is_dir() and not any(d.iterdir()):
            d.rmdir()


def _manifest_bytes(m: dict) -> bytes:
    return (json.dumps(m, indent=1) + "\n").encode()


class _Writer:
    """One run of :func:`write_cache` (fresh or resumed)."""

    def __init__(self, out: Path, manifest: dict, total_tokens: int | None, progress: bool):
        self.out = out
        self.m = manifest
        self.total = total_tokens
        self.progress = progress
        self.storage = DTYPES[manifest["dtype"]]
        self.shard_tokens = manifest["shard_tokens"]
        self.buffer: dict[str, list[Tensor]] = {}
        self.buffered = 0

    @property
    def rows_done(self) -> int:
        return self.m["total_rows"]

    def run(self, batches: Iterable[dict[str, Tensor]]) -> Path:
        resumable = callable(getattr(batches, "state_dict", None)) and callable(
            getattr(batches, "load_state_dict", None)
        )
        # Where the stream starts: restore the source's state at the last shard boundary when
        # the manifest has one, else re-read from the start and skip the stored rows.
        pos, skip = 0, self.rows_done
        record = self.m["shards"][-1].get("resume") if self.m["shards"] else None
        if resumable and record is not None:
            batches.load_state_dict(record["state"])  # type: ignore[attr-defined]
            pos = record["rows_at_state"]
            skip = self.rows_done - pos
        if self.total is not None:
            if self.rows_done > self.total:
                raise ValueError(
                    f"the cache at {self.out} already holds {self.rows_done} rows, more than "
                    f"total_tokens={self.total}"
                )
            self.m["total_tokens"] = self.total
        anchor = self._snapshot(batches, pos) if resumable else None
        bar = tqdm(
            total=self.total,
            initial=self.rows_done,
            unit="tok",
            unit_scale=True,
            disable=not self.progress,
            desc=f"caching to {self.out.name}",
        )
        try:
            for batch in batches if self.rows_done != self.total else ():
                n = self._check_structure(batch, pos)
                prev = anchor
                if anchor is not None:
                    anchor = self._snapshot(batches, pos + n)
                lo = min(skip, n)
                skip -= lo
                stored = self.rows_done + self.buffered
                room = n - lo if self.total is None else max(0, self.total - stored)
                hi = lo + min(n - lo, room)
                if hi > lo:
                    self._append(batch, lo, hi, stored)
                    bar.update(hi - lo)
                while self.buffered >= self.shard_tokens:
                    end = self.rows_done + self.shard_tokens
                    rec = anchor if anchor is not None and anchor[1] == end else prev
                    self._write_shard(self.shard_tokens, rec)
                    bar.set_postfix(shards=len(self.m["shards"]), refresh=False)
                pos += n
                if self.total is not None and self.rows_done + self.buffered >= self.total:
                    break
        finally:
            bar.close()
        if skip > 0:
            raise ValueError(
                f"the batch source ended after {pos} rows but the cache at {self.out} already "
                f"holds {self.rows_done}: it is not the source the cache was written from "
                "(resuming needs the same deterministic source)"
            )
        if self.m["hookpoints"] is None:
            raise ValueError("the batch source yielded no batches: nothing to cache")
        if self.buffered:
            self._write_shard(self.buffered, None)
        if self.total is not None and self.rows_done < self.total:
            warnings.warn(
                f"the batch source ended after {self.rows_done} rows, before "
                f"total_tokens={self.total}",
                stacklevel=3,
            )
        self.m["complete"] = True
        atomic_write(self.out / MANIFEST, _manifest_bytes(self.m))
        return self.out

    def _snapshot(self, batches: Any, pos: int) -> tuple[dict, int] | None:
        """The source's state at stream row ``pos``, as JSON data (None: not serialisable)."""
        try:
            return _jsonable(batches.state_dict(), "state"), pos
        except TypeError:
            warnings.warn(
                "the batch source's state_dict() is not JSON-serialisable; a resumed write "
                "will re-read the source from the start",
                stacklevel=4,
            )
            return None

    def _check_structure(self, batch: Any, pos: int) -> int:
        """Check a batch's hook points and shapes; set up the cache on the first batch."""
        if not isinstance(batch, dict) or not batch:
            raise TypeError(
                "batches must be non-empty dicts of hookpoint -> tensor, "
                f"got {type(batch).__name__}"
            )
        for hp, t in batch.items():
            if not isinstance(t, Tensor):
                raise TypeError(f"hook point {hp!r}: expected a torch tensor, got {type(t)}")
            if t.dim() != 2:
                raise ValueError(
                    f"hook point {hp!r}: expected a 2-D (rows, d_in) tensor, got shape "
                    f"{tuple(t.shape)}"
                )
            if not t.is_floating_point():
                raise ValueError(f"hook point {hp!r}: expected floating point, got {t.dtype}")
        rows = {hp: t.shape[0] for hp, t in batch.items()}
        if len(set(rows.values())) != 1:
            raise ValueError(f"hook points of one batch must have the same rows, got {rows}")
        if self.m["hookpoints"] is None:
            for hp in batch:
                _check_hookpoint_name(hp)
            self.m["hookpoints"] = list(batch)
            self.m["d_in"] = {hp: int(t.shape[1]) for hp, t in batch.items()}
            self.out.mkdir(parents=True, exist_ok=True)
            for hp in batch:
                (self.out / hp).mkdir(exist_ok=True)
                _clean_dir(self.out / hp, keep=0)
            atomic_write(self.out / MANIFEST, _manifest_bytes(self.m))
        if set(batch) != set(self.m["hookpoints"]):
            raise ValueError(
                f"batch at row {pos} has hook points {sorted(batch)}, the cache at {self.out} "
                f"has {sorted(self.m['hookpoints'])}"
            )
        for hp, t in batch.items():
            if t.shape[1] != self.m["d_in"][hp]:
                raise ValueError(
                    f"batch at row {pos}: hook point {hp!r} has d_in={t.shape[1]}, the cache "
                    f"at {self.out} has d_in={self.m['d_in'][hp]}"
                )
        return next(iter(rows.values()))

    def _append(self, batch: dict[str, Tensor], lo: int, hi: int, row: int) -> None:
        for hp in self.m["hookpoints"]:
            x = batch[hp][lo:hi].detach()
            check_finite(x, f"activations at hook point {hp!r}", row_offset=row)
            y = x.to(device="cpu", dtype=self.storage)
            if self.storage == torch.float16:
                try:
                    check_finite(
                        y, f"activations at hook point {hp!r} cast to float16", row_offset=row
                    )
                except ValueError as e:
                    raise ValueError(
                        f"{e}: the value exceeds the float16 range (65504); write the cache with "
                        "dtype=torch.bfloat16 or torch.float32"
                    ) from None
            self.buffer.setdefault(hp, []).append(y)
        self.buffered += hi - lo

    def _write_shard(self, rows: int, record: tuple[dict, int] | None) -> None:
        """Write the first ``rows`` buffered rows as the next shard, then the manifest."""
        index = len(self.m["shards"])
        files = {}
        for hp in self.m["hookpoints"]:
            x = torch.cat(self.buffer[hp]) if len(self.buffer[hp]) > 1 else self.buffer[hp][0]
            shard, rest = x[:rows].contiguous(), x[rows:]
            self.buffer[hp] = [rest] if len(rest) else []
            data = safetensors.torch.save({_TENSOR: shard})
            rel = _shard_path(hp, index)
            (self.out / hp).mkdir(parents=True, exist_ok=True)
            atomic_write(self.out / rel, data)
            files[hp] = {
                "path": rel,
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        self.buffered -= rows
        resume = None if record is None else {"state": record[0], "rows_at_state": record[1]}
        self.m["shards"].append({"rows": rows, "files": files, "resume": resume})
        self.m["total_rows"] += rows
        atomic_write(self.out / MANIFEST, _manifest_bytes(self.m))


# --------------------------------------------------------------------------- reading
