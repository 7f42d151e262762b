"""Integrity checks shared by the SAE folder and checkpoint readers and writers: safetensors
reads whose errors name the file, finiteness of weights, file checksums."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors.torch as st
import torch
from torch import Tensor

__all__ = ["check_finite_tensors", "load_tensors", "sha256"]


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
