"""Input checking and numpy/torch conversion shared by the scikit-learn layer.

Rule: numpy in -> numpy out; torch in -> torch out on the input's device. Computation runs on
``device`` ("auto" picks CUDA when available for numpy input, the tensor's own device for torch
input). float32 and float64 are kept; other dtypes are converted to float64 (as scikit-learn).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np
import torch
from torch import Tensor

_FLOATS = (torch.float32, torch.float64)


def resolve_device(device: str | torch.device | None, like: Any = None) -> torch.device:
    """``"auto"``/``None``: the device of a torch input, else CUDA if present, else CPU."""
    if device is None or device == "auto":
        if isinstance(like, Tensor):
            return like.device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "meta":
        raise ValueError("device='meta' holds no data: use 'cpu', 'cuda' or 'auto'")
    return device


def to_tensor(
    a: Any,
    name: str,
    *,
    device: torch.device,
    dtype: torch.dtype | None = None,
    ndim: int = 2,
    allow_empty: bool = False,
) -> Tensor:
    """Convert ``a`` to a float tensor on ``device``; check its shape, emptiness, finiteness."""
    if isinstance(a, Tensor):
        if a.is_meta:
            raise ValueError(f"{name} is a meta tensor: it holds no data to compute with")
        t = a.detach()
    else:
        arr = np.asarray(a)
        if arr.dtype == object:
            raise ValueError(f"{name} must be a numeric array, got dtype object")
        if arr.dtype.kind not in "fiub":
            raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(arr))
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if dtype is None:
        dtype = t.dtype if t.dtype in _FLOATS else torch.float64
    t = t.to(device=device, dtype=dtype)
    if not allow_empty and t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)})")
    top = t.abs().amax() if t.numel() else t.new_zeros(())
    if not bool(torch.isfinite(top)):
        bad = (~torch.isfinite(t)).nonzero()[0].tolist()
        raise ValueError(f"{name} contains NaN or inf (first at index {tuple(bad)})")
    limit = math.sqrt(torch.finfo(t.dtype).max) / 1e3  # squares and sums of squares stay finite
    if float(top) > limit:
        raise ValueError(f"{name} holds values up to {float(top):.3g}: beyond {limit:.2g} their "
                         f"squares overflow {str(t.dtype).removeprefix('torch.')}; rescale "
                         "them (or pass float64)")
    return t


def to_output(t: Tensor, like: Any) -> Any:
    """Return ``t`` in the input's kind: numpy for numpy-like input, torch on its device else."""
    if isinstance(like, Tensor):
        return t.to(like.device)
    return t.cpu().numpy()


def check_dictionary(D: Tensor, X: Tensor) -> None:
    """Atoms must match the signals' feature count and have nonzero norm."""
    if D.shape[1] != X.shape[1]:
        raise ValueError(
            f"X has {X.shape[1]} features but the dictionary's atoms have {D.shape[1]} "
            f"(X shape {tuple(X.shape)}, dictionary shape {tuple(D.shape)})"
        )
    norms = torch.linalg.vector_norm(D, dim=1)
    if bool((norms == 0).any()):
        zero = (norms == 0).nonzero().squeeze(1)[:5].tolist()
        raise ValueError(f"dictionary has zero-norm atoms (rows {zero}...); remove or replace them")


def check_int(name: str, value: Any, low: int) -> None:
    """Hyperparameter check: ``value`` is an integer (not a bool) and ``>= low``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
