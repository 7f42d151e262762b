"""Scaling of `sae train` from 1 to several processes (torchrun; gloo on CPU, NCCL on GPUs).

Each configuration is one `sae train --activations FILE.npy` run in its own process group,
started with ``python -m torch.distributed.run``; tokens/s is the run's own training time
(``train_seconds`` in its metrics.json: the training loop, without start-up, data loading and
the final evaluation). Float32 matmul so that every configuration trains the same SAE (up to
rounding); FVU is reported to show it.

    python benchmarks/smollm2_activations.py            # once: benchmarks/data/smollm2-l15.npy
    python benchmarks/bench_distributed.py               # 2-core CPU: ~5 minutes
    python benchmarks/bench_distributed.py --procs 1,2,4,8 --device cuda   # one multi-GPU node

Results: ``benchmarks/results/distributed-<device>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from common import (
    THREAD_ENV_VARS,
    cpu_name,
    device_tag,
    format_table,
    git_commit,
    now_iso,
    package_versions,
    write_json,
)

ROOT = Path(__file__).resolve().parents[1]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(procs: int, threads: int, shards: int, args, out: Path) -> dict:
    env = dict(os.environ, **{v: str(threads) for v in THREAD_ENV_VARS})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs),
           "--master-port", str(_port()), "-m", "sae", "train",
           "--activations", args.activations, "--d-sae", str(args.d_sae), "--k", str(args.k),
           "--batch-size", str(args.batch_size), "--tokens", str(args.tokens),
           "--matmul-dtype", "float32", "--device", args.device, "--no-progress",
           "--checkpoint-every", "0", "--out", str(out)]
    if shards > 1:
        cmd += ["--latent-shards", str(shards)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    m = json.loads((out / "metrics.json").read_text())["topk"]
    return {"procs": procs, "threads_per_proc": threads, "latent_shards": shards,
            "data_replicas": procs // shards, "train_seconds": m["train_seconds"],
            "tokens": m["train_tokens"], "tokens_per_s": m["train_tokens"] / m["train_seconds"],
            "fvu": m["fvu"], "l0": m["l0"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--activations", default=str(ROOT / "benchmarks/data/smollm2-l15.npy"))
    p.add_argument("--d-sae", type=int, default=9216)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=409600)
    p.add_argument("--device", default="cpu")
    p.add_argument("--configs", default="1x2,1x1,2x1,2x1s2",
                   help="PROCSxTHREADS[sSHARDS], comma-separated")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if not Path(args.activations).exists():
        raise SystemExit(f"{args.activations} not found: run benchmarks/smollm2_activations.py")
    tag = args.out or f"distributed-{device_tag(os.cpu_count() or 1)}"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, c in enumerate(args.configs.split(",")):
            pt, _, s = c.partition("s")
            procs, threads = (int(v) for v in pt.split("x"))
            r = run(procs, threads, int(s or 1), args, Path(tmp) / f"run{i}")
            rows.append(r)
            print(f"{procs} proc x {threads} thr, {r['latent_shards']} shard(s): "
                  f"{r['tokens_per_s']:,.0f} tok/s, FVU {r['fvu']:.4f}", flush=True)
    base = next((r for r in rows if r["procs"] == 1 and r["threads_per_proc"] == 1), rows[0])
    table = [[str(r["procs"]), str(r["threads_per_proc"]), str(r["data_replicas"]),
              str(r["latent_shards"]), f"{r['train_seconds']:.1f}", f"{r['tokens_per_s']:,.0f}",
              f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x", f"{r['fvu']:.4f}"]
             for r in rows]
    headers = ["processes", "threads each", "data replicas", "latent shards", "train [s]",
               "tokens/s", "vs 1 proc x 1 thread", "FVU"]
    meta = {"date": now_iso(), "cpu": cpu_name(), "cores": os.cpu_count(), "args": vars(args),
            "versions": package_versions("torch"), "git": git_commit(ROOT),
            "load_average": os.getloadavg()}
    results = ROOT / "benchmarks" / "results"
    write_json(results / f"{tag}.json", {"meta": meta, "rows": rows})
    md = [f"# `sae train` on several processes: {tag}", "",
          f"- date: {meta['date']}; CPU: {meta['cpu']} ({meta['cores']} cores); "
          f"load average at the end: {meta['load_average'][0]:.2f}",
          f"- versions: {meta['versions']}; git {meta['git']}",
          f"- data: `{Path(args.activations).name}`; TopK d_sae={args.d_sae}, k={args.k}, global "
          f"batch {args.batch_size}, {args.tokens} tokens, float32 matmul, device {args.device}",
          f"- command: `python benchmarks/bench_distributed.py {' '.join(argv or sys.argv[1:])}`",
          "", format_table(headers, table, markdown=True), "",
          "> tokens/s: training tokens / the training loop's wall time (rank 0). Every process",
          "> counts the global batch once.", ""]
    (results / f"{tag}.md").write_text("\n".join(md))
    print(f"wrote {results / tag}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
