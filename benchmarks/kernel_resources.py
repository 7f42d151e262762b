"""Static resources of the Triton kernels as compiled for A100 (sm_80) and H100 (sm_90).

Runs on any machine (no GPU): :mod:`sparsecode.core.kernels.aot` compiles every kernel
configuration the host wrappers launch through Triton's own just-in-time path for the named
architecture and reads registers, register spills, shared memory and instruction counts from the
binary, and whether the encoder matmul became a pipelined tensor-core loop. These are facts
about the code, not speed: ``bench_kernels.py`` (and its ``--sweep``) measures that on a GPU.

    python benchmarks/kernel_resources.py          # ~1 minute on first run (Triton caches)

Results: ``benchmarks/results/kernel-resources.json`` and ``.md``.
"""

# ruff: noqa: E402

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
import argparse
import dataclasses

import common  # noqa: F401  (puts this checkout's packages on sys.path)
import torch
from common import git_commit, now_iso, package_versions, write_json

from sparsecode.core.kernels import aot

CASES = [(90, torch.bfloat16), (90, torch.float16), (90, torch.float32), (80, torch.bfloat16)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d", type=int, default=4096, help="input width (default 4096)")
    ap.add_argument("--k", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    meta = {"date": now_iso(), "command": " ".join(sys.argv), "git": git_commit(HERE.parent),
            "versions": package_versions("torch", "triton"), "d": args.d, "k": args.k}
    md = ["# Triton kernels: static resources per GPU architecture", "",
          f"{meta['date']}, git {meta['git']}, triton {meta['versions']['triton']}, "
          f"d = {args.d}; `python benchmarks/kernel_resources.py`. Compiled, not run: "
          "registers and spills per thread, shared memory per program, machine instructions "
          "(static count), wgmma = Hopper warp-group tensor-core instruction, async copies = "
          "operands staged by `cp.async` (a pipelined matmul loop).", ""]
    results = []
    for arch, dtype in CASES:
        ks = tuple(args.k) if dtype == torch.bfloat16 else (64,)
        launches = aot.resource_report(arch, dtype, d=args.d, ks=ks)
        name = f"sm_{arch}, {str(dtype).removeprefix('torch.')}"
        print(f"## {name}\n{aot.format_report(launches, arch)}\n", flush=True)
        md += [f"## {name}", "", aot.format_report(launches, arch), ""]
        for c in launches:
            rec = {k: v for k, v in dataclasses.asdict(c).items() if k not in ("ptx", "cubin")}
            results.append({"arch": arch, "dtype": str(dtype), **rec,
                            "sass_instructions": c.sass_instructions, "wgmma": c.wgmma,
                            "async_copies": c.async_copies})
    write_json(args.out / "kernel-resources.json", {**meta, "results": results})
    (args.out / "kernel-resources.md").write_text("\n".join(md))
    print(f"wrote {args.out / 'kernel-resources.json'} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
