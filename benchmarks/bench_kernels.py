"""Fused sparse-encode kernels on a GPU: a TopK SAE training step, and batched OMP.

What it measures
----------------
1. One TopK SAE forward + backward step (reconstruction loss ``||x - x_hat||^2 / total variance``,
   gradients for all four parameters, no optimizer step) at the issue's size: d_in = 4096,
   d_sae = 131072, k = 64, 16,384 tokens, bf16 parameters and activations, for

   * ``ours (fused)``: :func:`sparsecode.core.kernels.topk_encode` (fused matmul + top-k Triton
     kernel, the (tokens x d_sae) pre-activations are never written) + ``sparse_decode`` (Triton
     bag-sum forward, pair-dot / sorted-by-atom backward) with the sparse encoder backward;
   * ``ours (SAE module)``: ``sae.models.SAE.training_forward`` (float32 master parameters, bf16
     matmul), i.e. what ``sae train`` runs;
   * ``sparsify``: EleutherAI's ``SparseCoder`` (``eai-sparsify``), bf16 parameters (its forward
     runs under bf16 autocast), ``fvu.backward()``;
   * ``dense torch``: ``F.linear`` -> ``topk`` -> scatter into a dense code -> dense decoder matmul,
     autograd backward.

   Reported per method: tokens/s (median of several steps, CUDA-synchronised wall clock), peak
   memory (``torch.cuda.max_memory_allocated`` during a step, and its excess over the memory held
   before the step), and the fraction of the roofline set by the encoder matmul: ``2 d_in d_sae``
   FLOPs per token forward plus twice that backward, at the GPU's dense bf16 peak (table below,
   or ``--peak-tflops``). Targets from the issue: >= 2x sparsify's tokens/s, <= 0.5x its peak
   memory, >= 50% of that roofline. A correctness line compares our loss with the dense loss and
   the fused top-k indices with ``torch.topk`` on a slice of tokens.

2. Batched OMP (``sparsecode.core.solvers.omp``, 8 atoms, 256-atom overcomplete DCT dictionary,
   8x8 camera patches as in ``bench_encode.py``, scaled to 1M signals by tiling) on the GPU, in
   float32, against SPAMS ``omp`` on this machine's CPU (if installed, timed on 100k signals and
   scaled per signal) and against the 2-thread SPAMS figure stored in
   ``benchmarks/results/encode-*.json``. Target: >= 25x SPAMS.

How to run
----------
    python benchmarks/bench_kernels.py            # on an H100 / H200; a few minutes
    python benchmarks/bench_kernels.py --smoke    # tiny sizes (also runs on CPU)

Without a GPU (and without ``--smoke``) it prints that there is nothing to measure and exits 0.
On the same GPU, ``python benchmarks/bench_sae_paths.py --d-in 2304 --d-sae 65536 --tokens 8192``
measures the other architectures' fused paths (BatchTopK, feature choice, ReLU / JumpReLU
pairs) against their dense paths, and where the ReLU / JumpReLU crossover lies on the GPU.
Results go to ``benchmarks/results/kernels-<device>.json`` and ``.md`` (``-smoke`` added).
"""

# ruff: noqa: E402

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
import argparse
import gc
import json
import re
import statistics
import time

import common  # noqa: F401  (puts this checkout's packages on sys.path)
import torch
import torch.nn.functional as F
from common import format_table, git_commit, now_iso, package_versions, tree_digest, write_json

from sparsecode.core.kernels import sparse_decode, topk_encode, triton_available, use_triton

#: dense bf16 tensor-core peaks (no sparsity), TFLOP/s
PEAK_BF16_TFLOPS = {"h100 pcie": 756.0, "h100": 989.5, "h200": 989.5, "gh200": 989.5,
                    "a100": 312.0, "l40s": 362.0, "b200": 2250.0}
TARGETS = {"vs_sparsify_speed": 2.0, "vs_sparsify_memory": 0.5, "roofline": 0.5, "omp_vs_spams": 25}


def gpu_peak_tflops(name: str, override: float | None) -> float | None:
    if override:
        return override
    low = name.lower()
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key in low:
            return PEAK_BF16_TFLOPS[key]
    return None


def device_slug(dev: torch.device) -> str:
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
    else:
        from common import device_tag

        return device_tag(torch.get_num_threads())
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def measure(step, dev, repeats: int, warmup: int = 2) -> dict:
    """Median seconds of ``step()`` and its peak memory (CUDA only)."""
    for _ in range(warmup):
        step()
    sync(dev)
    gc.collect()
    base = peak = None
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    for _ in range(repeats):
        sync(dev)
        t0 = time.perf_counter()
        step()
        sync(dev)
        times.append(time.perf_counter() - t0)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev)
    return {"time_s": statistics.median(times), "times_s": times,
            "peak_bytes": peak, "step_extra_bytes": None if peak is None else peak - base}


# ------------------------------------------------------------------ the SAE step, four ways
def make_params(d_in, d_sae, dev, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    W_dec = torch.randn(d_sae, d_in, generator=g)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    p = {"W_enc": W_dec.clone(), "b_enc": torch.zeros(d_sae), "W_dec": W_dec,
         "b_dec": torch.zeros(d_in)}
    return {k: v.to(dev, dtype).requires_grad_() for k, v in p.items()}


def loss_of(x, x_hat):
    tv = (x.float() - x.float().mean(0)).pow(2).sum()
    return (x.float() - x_hat.float()).pow(2).sum() / tv


def ours_step(p, x, k):
    def step():
        for t in p.values():
            t.grad = None
        N = x.shape[0]
        vals, idx = topk_encode(x, p["W_enc"], p["b_enc"], p["b_dec"], k)
        rows = torch.arange(N, device=x.device).repeat_interleave(k)
        x_hat = sparse_decode(vals.reshape(-1), rows, idx.reshape(-1), p["W_dec"], N,
                              bias=p["b_dec"])
        loss = loss_of(x, x_hat)
        loss.backward()
        return loss.detach()
    return step


def dense_step(p, x, k):
    def step():
        for t in p.values():
            t.grad = None
        pre = F.linear(x - p["b_dec"], p["W_enc"], p["b_enc"])
        top = pre.topk(k, dim=1, sorted=False)
        z = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())
        x_hat = z @ p["W_dec"] + p["b_dec"]
        loss = loss_of(x, x_hat)
        loss.backward()
        return loss.detach()
    return step


def sparsify_step(d_in, d_sae, k, x, dev, dtype):
    from sparsify import SparseCoder, SparseCoderConfig

    sae = SparseCoder(d_in, SparseCoderConfig(num_latents=d_sae, k=k), device=dev, dtype=dtype)

    def step():
        sae.zero_grad(set_to_none=True)
        out = sae(x)
        out.fvu.backward()
        return out.fvu.detach()
    return step, sae


def sae_module_step(d_in, d_sae, k, x, dev):
    from sae.models import SAE, SAEConfig

    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, architecture="topk", k=k)).to(dev)
    xf = x.float()

    def step():
        sae.zero_grad(set_to_none=True)
        out = sae.training_forward(xf, matmul_dtype=torch.bfloat16)
        out.loss.backward()
        return out.loss.detach()
    return step, sae


def run_sae(args, dev, dtype) -> tuple[list[dict], dict]:
    N, d_in, d_sae, k = args.tokens, args.d_in, args.d_sae, args.k
    g = torch.Generator(device="cpu").manual_seed(1)
    x = (torch.randn(N, d_in, generator=g) + 0.5).to(dev, dtype)
    flops = 6.0 * d_in * d_sae * N  # encoder matmul forward + twice that backward
    peak_tf = gpu_peak_tflops(torch.cuda.get_device_name(dev), args.peak_tflops) \
        if dev.type == "cuda" else None
    rows, checks = [], {}

    def record(name, fn, note=""):
        try:
            r = measure(fn, dev, args.repeats)
        except torch.cuda.OutOfMemoryError as e:  # a peer that does not fit is a result too
            r = {"time_s": None, "error": f"out of memory: {str(e)[:120]}"}
        except Exception as e:  # noqa: BLE001 - report and go on
            r = {"time_s": None, "error": f"{type(e).__name__}: {e}"[:300]}
        r.update(method=name, note=note)
        if r.get("time_s"):
            r["tokens_per_s"] = N / r["time_s"]
            r["roofline_frac"] = (flops / (peak_tf * 1e12)) / r["time_s"] if peak_tf else None
        rows.append(r)
        print(f"  {name}: {r.get('tokens_per_s') or r.get('error')}", flush=True)
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    p = make_params(d_in, d_sae, dev, dtype)
    triton_on = use_triton(x, p["W_enc"])
    record("ours (fused)", ours_step(p, x, k),
           "Triton kernels" if triton_on else "torch fallback (no Triton on this device)")
    # correctness on the same parameters: loss vs the dense step, top-k indices vs torch.topk
    with torch.no_grad():
        sl = x[: min(N, 512)]
        v, i = topk_encode(sl, p["W_enc"], p["b_enc"], p["b_dec"], k, relu=False)
        ref = F.linear(sl - p["b_dec"], p["W_enc"], p["b_enc"]).float().topk(k, dim=1)
        same = (i.sort(1).values == ref.indices.sort(1).values).float().mean().item()
        checks["topk_index_agreement"] = same
        checks["topk_max_abs_value_diff"] = (v.float() - ref.values).abs().max().item()
    loss_ours = ours_step(p, x, k)()
    if not args.skip_dense:
        loss_dense = dense_step(p, x, k)()
        checks["loss_rel_diff_vs_dense"] = abs(float(loss_ours) - float(loss_dense)) / float(
            loss_dense)
        record("dense torch", dense_step(p, x, k))
    del p
    gc.collect()
    if not args.skip_sparsify:
        try:
            step, sae = sparsify_step(d_in, d_sae, k, x, dev, dtype)
            record("sparsify", step, "eai-sparsify SparseCoder, bf16 autocast")
            del sae, step
        except ImportError:
            rows.append({"method": "sparsify", "time_s": None, "error": "not installed"})
    if not args.skip_module:
        step, sae = sae_module_step(d_in, d_sae, k, x, dev)
        record("ours (SAE module)", step, "fp32 parameters, bf16 matmul")
        del sae, step
    return rows, {**checks, "flops_per_step": flops, "peak_bf16_tflops": peak_tf,
                  "triton_used": triton_on}


# ------------------------------------------------------------------ batched OMP
def run_omp(args, dev) -> dict:
    import numpy as np

    from sparsecode.core.solvers import LeastSquares, omp
    from sparsecode.datasets import image_patches, overcomplete_dct

    D = overcomplete_dct(8, 256)
    base = image_patches(n_patches=None if not args.smoke else 20_000)
    n_sig = args.omp_signals
    X = np.resize(base, (n_sig, base.shape[1]))
    Xt = torch.as_tensor(X, dtype=torch.float32, device=dev)
    Dt = torch.as_tensor(D, dtype=torch.float32, device=dev)
    out = {"n_signals": n_sig, "n_atoms": 256, "n_nonzero": 8, "dtype": "float32"}
    for sel in ("omp", "ormp"):
        def call(sel=sel):
            return omp(LeastSquares.from_data(Xt, Dt), n_nonzero_coefs=8, selection=sel)
        r = measure(call, dev, max(1, args.repeats // 2), warmup=1)
        out[f"ours_{sel}_s"] = r["time_s"]
        out[f"ours_{sel}_peak_bytes"] = r["peak_bytes"]
    try:
        import spams

        n_sp = min(n_sig, 100_000)
        Xf = np.asfortranarray(X[:n_sp].T, dtype=np.float64)
        Df = np.asfortranarray(D.T, dtype=np.float64)
        threads = os.cpu_count() or 1
        t = measure(lambda: spams.omp(Xf, Df, L=8, numThreads=threads), torch.device("cpu"),
                    3, warmup=1)["time_s"]
        out["spams_here_s_per_signal"] = t / n_sp
        out["spams_here_threads"] = threads
    except ImportError:
        out["spams_here_s_per_signal"] = None
    stored = sorted((HERE / "results").glob("encode-*.json"))
    for f in stored:
        if "quick" in f.name:
            continue
        data = json.loads(f.read_text())
        for r in data.get("results", []):
            if r.get("task") == "omp" and r.get("library") == "SPAMS" and r.get("time_s"):
                out["spams_stored_s_per_signal"] = r["time_s"] / r["n_samples"]
                out["spams_stored_source"] = f"{f.name} ({data.get('threads')} threads)"
                break
    best = min(out["ours_omp_s"], out["ours_ormp_s"])
    for key in ("spams_here", "spams_stored"):
        per = out.get(f"{key}_s_per_signal")
        out[f"ratio_vs_{key}"] = None if not per else per * n_sig / out["ours_ormp_s"]
    out["ours_best_s"] = best
    return out


# ------------------------------------------------------------------ block-size sweep
#: (BM, BN, BK, num_warps) tried by ``--sweep`` for the fused top-k encoder, besides the default
SWEEP_BLOCKS = [(64, 128, 64, 8), (64, 128, 64, 4), (64, 64, 64, 8), (64, 128, 32, 8),
                (64, 256, 64, 8), (128, 128, 64, 8), (128, 128, 64, 16), (32, 128, 64, 8)]


def run_sweep(args, dev, dtype) -> list[dict]:
    """Time the fused top-k encode forward (kernel + the final ``topk`` over its candidates) for
    each block configuration, with the compiled kernel's static resources beside it."""
    from sparsecode.core.kernels import aot, triton_ops

    N, d_in, d_sae, k = args.tokens, args.d_in, args.d_sae, args.k
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(N, d_in, generator=g).to(dev, dtype)
    p = make_params(d_in, d_sae, dev, dtype)
    W, b = p["W_enc"].detach(), p["b_enc"].detach()
    kp = triton_ops._next_pow2(k)
    try:
        default = triton_ops.blocks_for(kp)
    except RuntimeError:  # no GPU driver (a CPU smoke run): the blocks an H100 would get
        with aot.compile_only(90):
            default = triton_ops.blocks_for(kp)
    arch = torch.cuda.get_device_capability(dev) if dev.type == "cuda" else (9, 0)
    arch = 10 * arch[0] + arch[1]
    ref = None
    rows = []
    for blocks in [default] + [c for c in SWEEP_BLOCKS if c != default and c[1] >= kp]:
        row = {"blocks": list(blocks), "default": blocks == default}
        try:
            with aot.compile_only(arch) as compiled:
                triton_ops.topk_candidates(x[:64].cpu(), W[:512].cpu(), b[:512].cpu(), k,
                                           blocks=blocks)
            c = compiled[0]
            row.update(registers=c.registers, spill_bytes=c.spill_bytes,
                       shared_kib=c.shared_bytes / 1024)
        except Exception as e:  # noqa: BLE001 - e.g. under the interpreter
            row["static_error"] = f"{type(e).__name__}: {e}"[:200]
        try:
            def fwd(blocks=blocks):
                keys = triton_ops.topk_candidates(x, W, b, k, blocks=blocks)
                return keys.topk(k, dim=1, sorted=True).values

            keys = fwd()
            ref = keys if ref is None else ref
            row["same_selection"] = bool(torch.equal(keys, ref))
            r = measure(fwd, dev, args.repeats)
            row.update(time_s=r["time_s"], tokens_per_s=N / r["time_s"],
                       tflops=2.0 * N * d_in * d_sae / r["time_s"] / 1e12)
        except Exception as e:  # noqa: BLE001 - a configuration that fails is a result too
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        rows.append(row)
        print(f"  {blocks}: {row.get('tokens_per_s') or row.get('error')}", flush=True)
    return rows


# ------------------------------------------------------------------ main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes; also runs on CPU")
    ap.add_argument("--tokens", type=int, default=16_384)
    ap.add_argument("--d-in", type=int, default=4096)
    ap.add_argument("--d-sae", type=int, default=131_072)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--omp-signals", type=int, default=1_000_000)
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="dense bf16 peak of the GPU (default: from a table by device name)")
    ap.add_argument("--skip-sparsify", action="store_true")
    ap.add_argument("--skip-dense", action="store_true")
    ap.add_argument("--skip-module", action="store_true")
    ap.add_argument("--skip-omp", action="store_true")
    ap.add_argument("--sweep", action="store_true",
                    help="time the fused top-k encoder's block sizes instead (needs a GPU)")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)

    has_gpu = torch.cuda.is_available()
    if not has_gpu and not args.smoke:
        print("No GPU available (torch.cuda.is_available() is False): nothing to measure. "
              "Run this on an H100/H200, or pass --smoke for a tiny CPU run.")
        return 0
    dev = torch.device("cuda" if has_gpu else "cpu")
    if not has_gpu:  # sparsify's Triton decoder needs a GPU driver
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    dtype = torch.bfloat16
    if args.smoke:
        args.tokens, args.d_in, args.d_sae, args.k = 256, 64, 1024, 8
        args.repeats, args.omp_signals = 2, 20_000
        if not has_gpu:
            dtype = torch.float32  # CPU smoke run: bf16 topk/scatter paths are slow there
    print(f"device: {torch.cuda.get_device_name(dev) if has_gpu else 'cpu'}; triton available: "
          f"{triton_available()}; tokens={args.tokens} d_in={args.d_in} d_sae={args.d_sae} "
          f"k={args.k} dtype={dtype}", flush=True)

    if args.sweep:
        return write_sweep(args, dev, run_sweep(args, dev, dtype), dtype)

    sae_rows, sae_info = run_sae(args, dev, dtype)
    omp_info = None if args.skip_omp else run_omp(args, dev)

    by = {r["method"]: r for r in sae_rows}
    ours, peer = by.get("ours (fused)", {}), by.get("sparsify", {})
    checks = {}
    if ours.get("time_s") and peer.get("time_s"):
        checks["speed_vs_sparsify"] = peer["time_s"] / ours["time_s"]
        if ours.get("peak_bytes") and peer.get("peak_bytes"):
            checks["memory_vs_sparsify"] = ours["peak_bytes"] / peer["peak_bytes"]
    if ours.get("roofline_frac") is not None:
        checks["roofline_frac"] = ours["roofline_frac"]
    if omp_info and omp_info.get("ratio_vs_spams_stored"):
        checks["omp_vs_spams_stored"] = omp_info["ratio_vs_spams_stored"]
    met = {"speed_vs_sparsify": lambda v: v >= TARGETS["vs_sparsify_speed"],
           "memory_vs_sparsify": lambda v: v <= TARGETS["vs_sparsify_memory"],
           "roofline_frac": lambda v: v >= TARGETS["roofline"],
           "omp_vs_spams_stored": lambda v: v >= TARGETS["omp_vs_spams"]}
    checks["targets_met"] = {name: bool(f(checks[name])) for name, f in met.items()
                             if checks.get(name) is not None}

    def gib(b):
        return "" if b is None else f"{b / 2**30:.2f}"

    table = format_table(
        ["method", "tokens/s", "step ms", "peak GiB", "step extra GiB", "roofline", "note"],
        [[r["method"],
          f"{r['tokens_per_s']:,.0f}" if r.get("tokens_per_s") else "-",
          f"{1e3 * r['time_s']:.1f}" if r.get("time_s") else "-",
          gib(r.get("peak_bytes")), gib(r.get("step_extra_bytes")),
          f"{100 * r['roofline_frac']:.0f}%" if r.get("roofline_frac") else "-",
          r.get("error") or r.get("note", "")] for r in sae_rows])
    print(table)
    print("checks:", json.dumps({**sae_info, **checks}, indent=1, default=str))
    if omp_info:
        print("omp:", json.dumps(omp_info, indent=1, default=str))

    device = device_slug(dev) + ("-smoke" if args.smoke else "")
    meta = {"date": now_iso(), "device": torch.cuda.get_device_name(dev) if has_gpu else "cpu",
            "command": " ".join(sys.argv), "git": git_commit(HERE.parent),
            "sparsecode_source_sha256": tree_digest(HERE.parent / "sparsecode"),
            "versions": package_versions("torch", "triton", "eai-sparsify", "spams-bin"),
            "config": {"tokens": args.tokens, "d_in": args.d_in, "d_sae": args.d_sae,
                       "k": args.k, "dtype": str(dtype), "repeats": args.repeats},
            "targets": TARGETS}
    write_json(args.out / f"kernels-{device}.json",
               {**meta, "sae_step": sae_rows, "sae_info": sae_info, "omp": omp_info,
                "checks": checks})
    md = [f"# Fused sparse-encode kernels on {meta['device']}", "",
          f"{meta['date']}, git {meta['git']}, config {meta['config']}", "", "```", table, "```",
          "", "checks: `" + json.dumps({**sae_info, **checks}, default=str) + "`", ""]
    if omp_info:
        md += ["omp: `" + json.dumps(omp_info, default=str) + "`", ""]
    (args.out / f"kernels-{device}.md").write_text("\n".join(md))
    print(f"wrote {args.out / f'kernels-{device}.json'} and .md")
    return 0


def write_sweep(args, dev, rows: list[dict], dtype) -> int:
    table = format_table(
        ["BM, BN, BK, warps", "default", "tokens/s", "TFLOP/s", "registers", "spill B",
         "shared KiB", "same selection", "error"],
        [[", ".join(map(str, r["blocks"])), "yes" if r["default"] else "",
          f"{r['tokens_per_s']:,.0f}" if r.get("tokens_per_s") else "-",
          f"{r['tflops']:.0f}" if r.get("tflops") else "-", str(r.get("registers", "-")),
          str(r.get("spill_bytes", "-")), f"{r['shared_kib']:.0f}" if "shared_kib" in r else "-",
          str(r.get("same_selection", "-")), r.get("error", r.get("static_error", ""))]
         for r in rows])
    print(table)
    device = device_slug(dev) + ("-smoke" if args.smoke else "")
    meta = {"date": now_iso(), "device": torch.cuda.get_device_name(dev) if dev.type == "cuda"
            else "cpu", "command": " ".join(sys.argv), "git": git_commit(HERE.parent),
            "config": {"tokens": args.tokens, "d_in": args.d_in, "d_sae": args.d_sae,
                       "k": args.k, "dtype": str(dtype), "repeats": args.repeats}}
    write_json(args.out / f"kernels-sweep-{device}.json", {**meta, "results": rows})
    (args.out / f"kernels-sweep-{device}.md").write_text("\n".join(
        [f"# Fused top-k encoder block sizes on {meta['device']}", "",
         f"{meta['date']}, git {meta['git']}, config {meta['config']}", "", "```", table, "```",
         ""]))
    print(f"wrote {args.out / f'kernels-sweep-{device}.json'} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
