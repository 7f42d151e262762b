"""Integrity checks shared by the SAE folder and checkpoint readers and writers: safetensors
reads whose errors name the file, finiteness of weights, file checksums.

An SAE folder records the SHA-256 of its weight files in a separate ``checksums.json``
(``{"sha256": {file name: hex digest}}``), written last: ``cfg.json`` stays exactly what SAELens
and sparsify parse, readers that do not know the file ignore it, and a folder without it (saved
before checksums, or by another tool) loads unverified."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import safetensors.torch as st
import torch
from torch import Tensor

__all__ = ["CHECKSUMS_FILENAME", "check_finite_tensors", "checksum_writer", "load_tensors",
           "sha256", "verify_checksums"]

#: The file of an SAE folder that records its weight files' checksums.
CHECKSUMS_FILENAME = "checksums.json"


def load_tensors(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """``safetensors.torch.load_file`` with errors (truncated, corrupted, not safetensors)
    that name the file."""
    try:
        return st.load_file(str(path))
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors raises its own SafetensorError, or OSError
        raise ValueError(f"{path} is not a readable safetensors file ({e}); it may be truncated "
                         "or corrupted") from e


def check_finite_tensors(tensors: Mapping[str, Tensor], where: Any) -> None:
    """Raise ``ValueError`` naming the first tensor that holds NaN or inf (and ``where``)."""
    for key, t in tensors.items():
        if (t.is_floating_point() or t.is_complex()) and t.numel() \
                and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(f"{where}: {key} holds {bad} non-finite value(s) (NaN or inf)")


def sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(2**20):
            h.update(block)
    return h.hexdigest()


def checksum_writer(names: Sequence[str]) -> Callable[[Path], None]:
    """A writer (for :func:`sparsecode._files.atomic_folder`, listed after the files it covers)
    of ``checksums.json``: the SHA-256 of each sibling file in ``names``."""

    def write(path: Path) -> None:
        sums = {name: sha256(path.parent / name) for name in names}
        path.write_text(json.dumps({"sha256": sums}, indent=1) + "\n")

    return write


def verify_checksums(folder: str | Path) -> None:
    """Check the files listed in ``folder/checksums.json`` against their recorded SHA-256; a
    folder without that file passes. Raises ``ValueError`` naming the damaged file (or a
    malformed ``checksums.json``)."""
    path = Path(folder) / CHECKSUMS_FILENAME
    if not path.is_file():
        return
    try:
        sums = json.loads(path.read_text())["sha256"]
    except (ValueError, UnicodeDecodeError, TypeError, KeyError) as e:
        raise ValueError(f"{path} is damaged (not a JSON object with a 'sha256' mapping): "
                         f"{e}") from e
    if not isinstance(sums, dict):
        raise ValueError(f"{path} is damaged: 'sha256' is not a mapping of file names")
    for name, want in sums.items():
        target = path.parent / str(name)
        if not target.is_file():
            raise ValueError(f"{target} is listed in {path} but missing: the folder is "
                             "incomplete")
        if sha256(target) != want:
            raise ValueError(f"{target} does not match its checksum in {path}: the file is "
                             "corrupted (if another tool rewrote it on purpose, delete "
                             f"{CHECKSUMS_FILENAME})")
