"""The cache's format: layout constants, the manifest, shard checks (see :mod:`sae.cache`)."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

FORMAT = "sparsecode-activation-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
#: Storage dtypes a cache may use, by the name the manifest records.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_TENSOR = "activations"
_SHARD_RE = re.compile(r"^shard_(\d+)\.safetensors$")


# --------------------------------------------------------------------------- small helpers
def _dtype_name(dtype: torch.dtype) -> str:
    for name, d in DTYPES.items():
        if d == dtype:
            return name
    raise ValueError(f"cache dtype must be one of torch.{', torch.'.join(DTYPES)}; got {dtype}")


def _shard_path(hookpoint: str, index: int) -> str:
    return f"{hookpoint}/shard_{index:05d}.safetensors"


def _check_hookpoint_name(hp: Any) -> None:
    bad = (
        not isinstance(hp, str)
        or hp in ("", ".", "..", MANIFEST)
        or hp.startswith(".")
        or any(c in hp for c in "/\\\0")
    )
    if bad:
        raise ValueError(
            f"hook point name {hp!r} cannot name a cache directory: it must be a non-empty "
            "string without '/', '\\' or a leading '.'"
        )


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _jsonable(obj: Any, what: str) -> Any:
    """A JSON round trip of ``obj`` (a deep copy), or a ``TypeError`` naming ``what``."""
    try:
        return json.loads(json.dumps(obj))
    except (TypeError, ValueError) as e:
        raise TypeError(f"{what} must be JSON-serialisable: {e}") from e


def read_manifest(cache_dir: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``manifest.json`` of a cache, checked for format and version.

    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> read_manifest(d)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    FileNotFoundError: no activation cache at ...: .../manifest.json does not exist
    """
    path = Path(cache_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no activation cache at {cache_dir}: {path} does not exist")
    try:
        m = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ValueError(f"{path} is not the manifest of an activation cache (format != {FORMAT})")
    if m.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{path} has format_version {m['format_version']}; this version of the code reads "
            f"up to {FORMAT_VERSION} (upgrade the package)"
        )
    keys = {"complete", "hookpoints", "d_in", "dtype", "shard_tokens", "total_rows", "shards"}
    missing = keys - set(m)
    if missing:
        raise ValueError(f"{path} lacks the keys {sorted(missing)}")
    if m["dtype"] not in DTYPES:
        raise ValueError(f"{path} names an unknown storage dtype {m['dtype']!r}")
    return m


def _file_problem(cache_dir: Path, manifest: dict, index: int, hp: str) -> str | None:
    """What is wrong with one shard file (missing, size, checksum, header), or None."""
    info = manifest["shards"][index]["files"][hp]
    path = cache_dir / info["path"]
    if not path.is_file():
        return "is missing"
    size = path.stat().st_size
    if size != info["bytes"]:
        return f"has {size} bytes, the manifest says {info['bytes']}"
    digest = _sha256_file(path)
    if digest != info["sha256"]:
        return f"has sha256 {digest}, the manifest says {info['sha256']}"
    try:
        with safe_open(path, framework="pt") as f:
            if _TENSOR not in f.keys():
                return f"holds no tensor {_TENSOR!r}"
            shape = list(f.get_slice(_TENSOR).get_shape())
    except Exception as e:  # noqa: BLE001 - any parse failure is a damaged shard
        return f"is not a readable safetensors file ({e})"
    want = [manifest["shards"][index]["rows"], manifest["d_in"][hp]]
    if shape != want:
        return f"holds shape {shape}, the manifest says {want}"
    return None


def verify_cache(cache_dir: str | os.PathLike) -> None:
    """Check every listed shard file against the manifest (size, sha256, shape); raise if not.

    A missing file raises ``FileNotFoundError``, any other mismatch ``ValueError``; both name the
    shard. An incomplete cache is checked as far as it goes.

    >>> import tempfile
    >>> from sae.cache import write_cache
    >>> d = write_cache([{"h": torch.ones(3, 2)}], tempfile.mkdtemp(), progress=False)
    >>> verify_cache(d)
    """
    cache_dir = Path(cache_dir)
    m = read_manifest(cache_dir)
    for i, shard in enumerate(m["shards"]):
        for hp in m["hookpoints"]:
            problem = _file_problem(cache_dir, m, i, hp)
            if problem is not None:
                err = FileNotFoundError if problem == "is missing" else ValueError
                path = shard["files"][hp]["path"]
                raise err(f"cache at {cache_dir}: shard {path} {problem}")
    rows = sum(s["rows"] for s in m["shards"])
    if rows != m["total_rows"]:
        raise ValueError(
            f"cache at {cache_dir}: the shards hold {rows} rows, "
            f"the manifest says {m['total_rows']}"
        )


# --------------------------------------------------------------------------- writing
