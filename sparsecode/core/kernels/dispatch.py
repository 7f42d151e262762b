"""Which implementation runs: Triton kernels or the torch fallbacks.

Rules (checked on every call, so tests and users can flip them at run time):

* ``SPARSECODE_DISABLE_TRITON=1`` forces the torch fallback everywhere.
* Otherwise the Triton kernels run when ``triton`` (3.4 or newer) imports and every tensor
  involved is on a CUDA device (and the op supports the dtype / shape; each op checks that).
* ``SPARSECODE_FORCE_TRITON=1`` together with ``TRITON_INTERPRET=1`` (set before ``triton`` is
  first imported) runs the kernels on CPU tensors in Triton's interpreter. This is how the tests
  check the kernels without a GPU; it is slow and float32-only (bf16 is wrong in the
  interpreter), so it is never chosen automatically.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

DISABLE_ENV = "SPARSECODE_DISABLE_TRITON"
FORCE_ENV = "SPARSECODE_FORCE_TRITON"


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def interpreter() -> bool:
    """Is Triton's CPU interpreter switched on (``TRITON_INTERPRET=1``)?"""
    return _flag("TRITON_INTERPRET")


#: Oldest Triton the kernels compile with (``tl.topk`` arrived in 3.4; checked by compiling
#: them for sm_80 / sm_90 with 3.0, 3.2, 3.3 and 3.4, see ``sparsecode.core.kernels.aot``).
MIN_TRITON = (3, 4)


def _version(text: str) -> tuple[int, int]:
    major, minor = (text.split("+")[0].split(".") + ["0"])[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


@functools.lru_cache(maxsize=1)
def _triton_imports() -> bool:
    try:
        import triton
    except Exception:  # ImportError, or a broken install
        return False
    # an older Triton (e.g. the one an older torch pins) cannot compile the kernels: fall back
    return _version(triton.__version__) >= MIN_TRITON


def triton_available() -> bool:
    """``triton`` (at least :data:`MIN_TRITON`) imports and the fallback is not forced by
    ``SPARSECODE_DISABLE_TRITON``."""
    return not _flag(DISABLE_ENV) and _triton_imports()


def use_triton(*tensors: Tensor | None) -> bool:
    """Should an op on these tensors run its Triton kernel? (``None`` entries are ignored.)"""
    if not triton_available():
        return False
    ts = [t for t in tensors if t is not None]
    if ts and all(t.is_cuda for t in ts):
        return True
    if _flag(FORCE_ENV) and interpreter():
        return all(t.device.type == "cpu" for t in ts)
    return False


def interpreter_dtype_ok(*tensors: Tensor | None) -> bool:
    """Under the interpreter only float32 / float64 are computed correctly."""
    if not interpreter():
        return True
    return all(t is None or not t.is_floating_point() or t.dtype in (torch.float32, torch.float64)
               for t in tensors)
