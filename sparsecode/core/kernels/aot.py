"""Compile the Triton kernels for a GPU this machine need not have, and read their resource use.

Triton's compiler runs anywhere: ``ptxas`` ships in its wheel, and only loading and running a
kernel needs the GPU. Inside :func:`compile_only`, every Triton launch goes through Triton's own
just-in-time path (the same argument specialisation: 16-byte alignment, unit strides) for the
chosen architecture, and is compiled and recorded instead of run. So a CPU machine can check
what the interpreter cannot: that each kernel compiles for the GPU (``tl.dot`` shapes, layouts,
types), how many registers it takes and spills, how much shared memory it needs, and whether the
encoder matmul became a pipelined tensor-core loop (``wgmma`` fed by asynchronous copies).

:func:`resource_report` compiles every kernel configuration the host wrappers in
:mod:`.triton_ops` choose for one problem (``python -m sparsecode.core.kernels.aot`` prints it);
the tests assert that each one compiles and fits the SM, and ``benchmarks/kernel_resources.py``
records the table. These are static facts, not speed: only a run on the GPU measures that.

Example (needs ``triton``; a few seconds per kernel on first use, then Triton's cache):

>>> from sparsecode.core.kernels.aot import compile_only
>>> from sparsecode.core.kernels import triton_ops
>>> import torch
>>> idx, off = torch.tensor([0, 1]), torch.tensor([0, 2])
>>> with compile_only(arch=90) as launches:                     # doctest: +SKIP
...     _ = triton_ops.bag_sum(idx, torch.zeros(4, 64), off, None)
>>> launches[0].name, launches[0].shared_bytes, launches[0].spill_bytes  # doctest: +SKIP
('_bag_sum_kernel', 0, 0)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

#: Shared memory one thread block may use (opt-in maximum), bytes, per compute capability.
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
#: Registers per thread the hardware allows.
MAX_REGISTERS = 255


@dataclass
class Compiled:
    """One kernel as compiled for one launch configuration."""

    name: str
    meta: dict
    num_warps: int
    shared_bytes: int
    registers: int
    spill_bytes: int  # per-thread local-memory stack: register spills for these kernels
    ptx: str = field(repr=False)
    cubin: bytes = field(repr=False)

    @property
    def wgmma(self) -> bool:
        """Does a ``tl.dot`` run on Hopper's warp-group tensor-core instruction?"""
        return "wgmma.mma_async" in self.ptx

    @property
    def async_copies(self) -> bool:
        """Are operands staged by asynchronous copies (``cp.async`` / TMA): a pipelined loop?"""
        return "cp.async" in self.ptx

    @property
    def sass_instructions(self) -> int:
        """Machine instructions in the kernel (a static size: the tile loop is unrolled
        straight-line code, so this tracks the work per tile, not the time)."""
        return len(re.findall(r"/\*[0-9a-f]{4,}\*/", _cuobjdump("-sass", self.cubin)))


def _tool(name: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: this triton wheel ships no NVIDIA tools")
    return path


def _cuobjdump(flag: str, cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([_tool("cuobjdump"), flag, f.name],
                              capture_output=True, text=True, check=True).stdout


def _resources(cubin: bytes) -> tuple[int, int]:
    """(registers, stack bytes per thread) of the one kernel in ``cubin``."""
    out = _cuobjdump("--dump-resource-usage", cubin)
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    if m is None:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{out}")
    return int(m[1]), int(m[2])


class _CompileOnlyDriver:
    """Stands in for Triton's CUDA driver: names the target, owns no device."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)
        # a device key of its own, so these kernels never sit in a real device's cache
        self.device = f"compile-only-sm{arch}"

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return self.device

    def get_current_stream(self, device=None):
        return 0


def _active_driver():
    """Triton's active driver as stored, without creating one (there is none without a GPU)."""
    from triton.runtime import driver

    # Triton >= 3.5 creates it lazily behind a property; older versions hold a lazy proxy
    return driver._active if "_active" in vars(driver) else driver.active


def _restore_driver(previous) -> None:
    from triton.runtime import driver

    if "_active" in vars(driver):
        driver._active = previous
    else:
        driver.active = previous


@contextlib.contextmanager
def compile_only(arch: int = 90, on_launch: Callable[[str, tuple, dict], None] | None = None
                 ) -> Iterator[list[Compiled]]:
    """Within the block, Triton launches compile for ``sm_<arch>`` and are recorded, not run.

    Yields the list the :class:`Compiled` records are appended to. Output tensors keep whatever
    they held (nothing runs); ``on_launch(name, args, kwargs)`` may fill them where a host
    wrapper reads a kernel's output to size the next launch.
    """
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    from .dispatch import interpreter

    if interpreter():
        raise RuntimeError("compile_only needs TRITON_INTERPRET unset (the interpreter compiles "
                           "nothing)")
    launches: list[Compiled] = []
    run = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        regs, stack = _resources(kernel.asm["cubin"])
        meta = {k: v for k, v in kwargs.items() if k in self.arg_names}  # not the options
        launches.append(Compiled(self.__name__, meta, kernel.metadata.num_warps,
                                 kernel.metadata.shared, regs, stack, kernel.asm["ptx"],
                                 kernel.asm["cubin"]))
        if on_launch is not None:
            on_launch(self.__name__, args, kwargs)
        return kernel

    previous = _active_driver()
    driver.set_active(_CompileOnlyDriver(arch))
    JITFunction.run = record
    try:
        yield launches
    finally:
        JITFunction.run = run
        _restore_driver(previous)


def _count_one_pair_per_row(name: str, args: tuple, kwargs: dict) -> None:
    # threshold_select sizes its writing pass from the counting pass's output: pretend one pair
    # per row so that the writing pass is compiled too
    if name == "_threshold_kernel" and not kwargs["WRITE"]:
        args[4].fill_(1)


def resource_report(arch: int = 90, dtype: torch.dtype = torch.bfloat16, d: int = 4096,
                    ks: tuple[int, ...] = (64,)) -> list[Compiled]:
    """Compile every kernel the host wrappers launch for ``d``-dimensional inputs in ``dtype``:
    the fused top-k encoder for each ``k`` in ``ks``, both passes of the threshold encoder, the
    bag sum (decode forward, weight gradients) and the pair dot products (value gradients).

    Tensors are small CPU tensors with the problem's row length: the block sizes depend on
    ``k`` only, and Triton specialises on alignment and unit strides, not on the sizes.
    """
    from . import triton_ops

    g = torch.Generator().manual_seed(0)
    n_tokens, n_atoms = 64, 512
    x = torch.randn(n_tokens, d, generator=g).to(dtype)
    W = torch.randn(n_atoms, d, generator=g).to(dtype)
    b = torch.zeros(n_atoms)
    rows = torch.arange(n_tokens).repeat_interleave(4)
    cols = torch.randint(0, n_atoms, (rows.numel(),), generator=g)
    vals = torch.randn(rows.numel(), generator=g).to(dtype)
    csr = torch.arange(0, rows.numel() + 1, 4)
    with compile_only(arch, on_launch=_count_one_pair_per_row) as launches:
        for k in ks:
            triton_ops.topk_candidates(x, W, b, k)
        triton_ops.threshold_select(x, W, b, torch.zeros(n_atoms))
        triton_ops.bag_sum(cols, W, csr, vals)
        triton_ops.pair_dot(x, rows, W, cols, torch.float32)
    return launches


def format_report(launches: list[Compiled], arch: int) -> str:
    """A markdown table of :func:`resource_report`'s records."""
    lines = ["| kernel | meta | warps | registers | spill bytes | shared KiB | SASS instructions "
             "| wgmma | async copies |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in launches:
        meta = ", ".join(f"{k}={v}" for k, v in c.meta.items())
        wgmma = ("yes" if c.wgmma else "no") if arch >= 90 else "n/a"
        lines.append(f"| {c.name} | {meta} | {c.num_warps} | {c.registers} | {c.spill_bytes} "
                     f"| {c.shared_bytes / 1024:.1f} | {c.sass_instructions} | {wgmma} | "
                     f"{'yes' if c.async_copies else 'no'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--d", type=int, default=4096, help="input width (default 4096)")
    p.add_argument("--k", type=int, nargs="+", default=[64], help="top-k values (default 64)")
    a = p.parse_args(argv)
    launches = resource_report(a.arch, getattr(torch, a.dtype), a.d, tuple(a.k))
    print(format_report(launches, a.arch))


if __name__ == "__main__":
    main()
