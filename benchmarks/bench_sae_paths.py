"""Sparse (pairs) against dense training paths of the SAE module, on CPU or GPU.

What it measures
----------------
One ``SAE.training_forward`` + backward step (no optimizer step) per setting:

* ``relu`` and ``jumprelu`` at a sweep of code densities (the fraction of the ``(N, d_sae)``
  pre-activations above the cut: 0 for ReLU, ``theta - bandwidth / 2`` for JumpReLU, set through
  ``b_enc`` / ``threshold`` from a quantile of the pre-activations), run both ways: the pairs path
  (``threshold_encode`` -> sparse decode, sparse backward) and the dense path (the whole
  ``(N, d_sae)`` matrix through autograd). The module picks between them by the last batch's
  density against ``sae.models.SPARSE_CODE_MAX_DENSITY``; this sweep is where that constant's
  crossover comes from.
* ``batchtopk`` and ``feature_choice`` (auxiliary loss off): the module's fused paths
  (``batch_topk_encode``, two passes; ``feature_choice_encode``, the transposed top-m) against
  the dense reference (dense pre-activations -> ``BatchTopK`` / ``FeatureChoice`` support ->
  gather with the sparse backward), which is what the module ran before the fused paths.

Both ways give the same loss and gradients (tests/test_sae_models.py, tests/test_kernels.py);
the loss of each pair is printed as a check. Reported: median seconds per step, the ratio
dense / pairs, and on CUDA the peak memory of a step.

How to run
----------
    python benchmarks/bench_sae_paths.py                 # CPU: d_in 576, d_sae 4608, 2048 tokens
    python benchmarks/bench_sae_paths.py --threads 2
    python benchmarks/bench_sae_paths.py --d-in 2304 --d-sae 65536 --tokens 8192   # on a GPU

Results go to ``benchmarks/results/sae-paths-<device>.json`` and ``.md``.
"""

# ruff: noqa: E402

from pathlib import Path

HERE = Path(__file__).resolve().parent
import argparse
import math

import common  # noqa: F401  (puts this checkout's packages on sys.path)
import torch
from bench_kernels import device_slug, measure
from common import format_table, git_commit, now_iso, package_versions, write_json

from sae import models
from sae.models import SAE, SAEConfig
from sparsecode.core import operators as ops
from sparsecode.core.kernels import gather_preact, preact, sparse_decode

DENSITIES = (0.002, 0.01, 0.03, 0.08, 0.15)


def module_step(sae, x):
    def step():
        sae.zero_grad(set_to_none=True)
        out = sae.training_forward(x)
        out.loss.backward()
        return float(out.loss.detach())
    return step


def dense_support_step(sae, x, op):
    """The reference: dense pre-activations, ``op``'s support, sparse gather and decode."""
    def step():
        sae.zero_grad(set_to_none=True)
        W_rows = sae.W_enc.T
        with torch.no_grad():
            pre = preact(x, W_rows, sae.b_enc, sae.b_dec)
        rows, cols = op.support(pre)
        vals = gather_preact(x, W_rows, sae.b_enc, sae.b_dec, rows, cols, pre)
        x_hat = sparse_decode(vals, rows, cols, sae.W_dec, x.shape[0], bias=sae.b_dec)
        loss = (x - x_hat).pow(2).sum(dim=-1).mean()
        loss.backward()
        return float(loss.detach())
    return step


def set_density(sae, x, density):
    """Move ``b_enc`` (ReLU) or ``threshold`` (JumpReLU) so that about ``density`` of the
    entries lie above the cut."""
    with torch.no_grad():
        pre = (x[:512] - sae.b_dec) @ sae.W_enc
        q = float(torch.quantile(pre.flatten()[:2**24].float(), 1 - density))
        if sae.architecture == "relu":
            sae.b_enc.fill_(-q)
        else:
            sae.b_enc.zero_()
            sae.threshold.fill_(q + sae.cfg.bandwidth / 2)


def forced(max_density, step):
    """Run ``step`` with the module's path forced (dense: -1, pairs: 2)."""
    def run():
        saved = models.SPARSE_CODE_MAX_DENSITY
        models.SPARSE_CODE_MAX_DENSITY = max_density
        try:
            return step()
        finally:
            models.SPARSE_CODE_MAX_DENSITY = saved
    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d-in", type=int, default=576)
    ap.add_argument("--d-sae", type=int, default=4608)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    x = torch.randn(args.tokens, args.d_in, device=dev)
    print(f"device {device_slug(dev)}; tokens {args.tokens}, d_in {args.d_in}, "
          f"d_sae {args.d_sae}, k {args.k}", flush=True)
    results = []

    def record(arch, setting, sae, pairs, dense):
        r = {"architecture": arch, "setting": setting}
        for name, fn in (("pairs", pairs), ("dense", dense)):
            m = measure(fn, dev, args.repeats)
            r[name] = {**m, "loss": fn()}
        r["density"] = getattr(sae, "_last_density", None)
        r["dense_over_pairs"] = r["dense"]["time_s"] / r["pairs"]["time_s"]
        results.append(r)
        print(f"{arch:10s} {setting:14s} pairs {r['pairs']['time_s'] * 1e3:8.1f} ms  dense "
              f"{r['dense']['time_s'] * 1e3:8.1f} ms  x{r['dense_over_pairs']:.2f}  "
              f"loss {r['pairs']['loss']:.4f} / {r['dense']['loss']:.4f}", flush=True)

    for arch in ("relu", "jumprelu"):
        sae = SAE(SAEConfig(d_in=args.d_in, d_sae=args.d_sae, architecture=arch,
                            k=args.k)).to(dev)
        for density in DENSITIES:
            set_density(sae, x, density)
            step = module_step(sae, x)
            record(arch, f"density {density:g}", sae, forced(2.0, step), forced(-1.0, step))
    m = math.ceil(args.k * args.tokens / args.d_sae)
    for arch, op in (("batchtopk", ops.BatchTopK(args.k, positive=True)),
                     ("feature_choice", ops.FeatureChoice(m, positive=True))):
        sae = SAE(SAEConfig(d_in=args.d_in, d_sae=args.d_sae, architecture=arch, k=args.k,
                            aux_coefficient=0.0)).to(dev)
        record(arch, f"k {args.k}", sae, module_step(sae, x), dense_support_step(sae, x, op))

    def mib(r):
        b = r.get("peak_bytes")
        return "" if b is None else f"{b / 2**20:.0f}"

    rows = [[r["architecture"], r["setting"], f"{r['pairs']['time_s'] * 1e3:.1f}",
             f"{r['dense']['time_s'] * 1e3:.1f}", f"{r['dense_over_pairs']:.2f}",
             mib(r["pairs"]), mib(r["dense"])] for r in results]
    headers = ["architecture", "setting", "pairs [ms]", "dense [ms]", "dense / pairs",
               "pairs peak [MiB]", "dense peak [MiB]"]
    print(format_table(headers, rows))
    slug = device_slug(dev)
    info = {"when": now_iso(), "commit": git_commit(HERE.parent), "device": slug,
            "threads": torch.get_num_threads(), "args": vars(args) | {"out": str(args.out)},
            "versions": package_versions("torch"), "results": results}
    write_json(args.out / f"sae-paths-{slug}.json", info)
    (args.out / f"sae-paths-{slug}.md").write_text(
        f"# SAE training paths: pairs vs dense ({slug})\n\n"
        f"`python benchmarks/bench_sae_paths.py` at {info['commit']}, {info['when']}; tokens "
        f"{args.tokens}, d_in {args.d_in}, d_sae {args.d_sae}, k {args.k}, "
        f"{info['threads']} threads.\n\n" + format_table(headers, rows, markdown=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
