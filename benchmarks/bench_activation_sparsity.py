"""Activation sparsity at inference: SmolLM2-135M (float32), every Linear of the 30 blocks.

Calibration: ``--n-calib`` contexts of ``--seq-len`` tokens of the built-in text's training
split (seeded permutation); perplexity and achieved sparsity on ``--n-eval`` held-out contexts
(``split_texts(builtin_texts(), seed=0)[1]``, disjoint documents). Rows, at each sparsity of
every block Linear's input (weighted by the weights that read it):

* TEAL uniform (``magnitude``, ``uniform``), WINA (``wina``, uniform), CATS (``cats``,
  uniform), top-k (``topk``, uniform), the Fisher-estimated global allocation (``magnitude``,
  ``global``), the default of ``sparsecode sparsify``: TEAL's block-wise greedy allocation
  with our cost per weight column (``magnitude``, ``greedy``), and the gated MLP's input
  rotated into its principal basis (LaRoSA-style, ``rotate=True``) with uniform and global
  allocation.

Target: at 40% the perplexity increase of the best row over dense is at most half of TEAL
uniform's. A rotated rule reads one ``576 x 576`` rotation per block and token on top of its
sparse columns (9.4% of a block's Linear weights), so its rows are also compared with
unrotated rows at the sparsity that reads as many weights.

Speed (``--skip-speed`` to leave out), batch 1, ``--threads`` threads:

* per activation of a SmolLM2 block (q/k/v: 576 -> 576+192+192, o: 576 -> 576, gate/up:
  576 -> 2x1536, down: 1536 -> 576): the dense ``F.linear`` of one token for each Linear
  reading it (as the model runs them) against what ``sparse_decode`` runs: the threshold and
  one ``sparse_input_linear`` over the stacked transposed weight (plus the ``576 x 576``
  rotation for the rotated gate/up input), at input sparsities 0-90%, each call on the next
  of a ring of distinct weights totalling 256 MB (as in decoding, where the 540 MB of weights
  stream from memory rather than sit in cache; median of ``--reps`` passes over the ring),
  and the sum over one block; target: the block's Linears >= 1.3x faster at 50%;
* greedy generation of ``--gen-tokens`` tokens after a 16-token prompt: dense, the rules as
  hooks, and ``sparse_decode(model, rules)`` at 40/50/65%, tokens/s (median of 3).

Composition (``--skip-prune`` to leave out): Wanda 50% weight pruning, then ours at 40% on the
pruned model.

    python benchmarks/bench_activation_sparsity.py            # ~25 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from common import ROOT, pin_threads

CONFIGS = {  # key -> (label, method, allocation, rotate)
    "teal": ("TEAL uniform", "magnitude", "uniform", False),
    "wina": ("WINA", "wina", "uniform", False),
    "cats": ("CATS", "cats", "uniform", False),
    "topk": ("top-k", "topk", "uniform", False),
    "global": ("Fisher global (magnitude)", "magnitude", "global", False),
    "ours": ("ours: TEAL greedy with cost per weight (default)", "magnitude", "greedy", False),
    "larosa": ("rotated MLP input (LaRoSA), uniform", "magnitude", "uniform", True),
    "larosa-global": ("rotated MLP input, Fisher global", "magnitude", "global", True),
}
OURS = CONFIGS["ours"][0]
# one group per activation of a SmolLM2 block: (outputs of the Linears reading it, input width)
GROUPS = {"q/k/v": ([576, 192, 192], 576), "o": ([576], 576), "gate/up": ([1536, 1536], 576),
          "down": ([576], 1536), "gate/up rotated": ([1536, 1536], 576)}
ROTATION_SHARE = 576 * 576 / 3_538_944  # a rotation's weights / one block's Linear weights
RING_BYTES = 256e6  # distinct weights per timed shape: more than any CPU cache


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n-calib", type=int, default=32)
    p.add_argument("--n-eval", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--sparsities", default="0.25,0.4,0.5,0.65")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--skip-prune", action="store_true")
    p.add_argument("--out", default=None, help="result file stem (default: "
                                               "activation-sparsity-<device>)")
    p.add_argument("--carry", default=None, help="a results JSON whose quality rows are kept "
                                                 "(configs whose code did not change)")
    return p.parse_args(argv)


def quality_rows(model, calib, evals, configs, sparsities, dense_ppl, partial):
    """One row per configuration and sparsity; rows already in the JSON file ``partial`` (an
    interrupted run) are kept, new ones appended to it as they finish."""
    from common import write_json

    from sparsecode.activations import calibrate, evaluate_perplexity, measure_sparsity

    rows = json.loads(partial.read_text()) if partial.exists() else []
    done = {(r["config"], r["target"]) for r in rows}
    cals = {}
    for key in configs:
        label, method, allocation, rotate = CONFIGS[key]
        if all((label, s) in done for s in sparsities) and key != "ours":
            continue
        if (method, rotate) not in cals:
            t0 = time.perf_counter()
            cals[method, rotate] = (calibrate(model, calib, method, rotate=rotate),
                                    time.perf_counter() - t0)
        cal, cal_s = cals[method, rotate]
        for s in sparsities:
            if (label, s) in done:
                continue
            t0 = time.perf_counter()
            plan = cal.plan(s, allocation)
            plan_s = time.perf_counter() - t0
            got = measure_sparsity(plan, model, evals)
            plan.achieved = got
            with plan.attached(model):
                ppl = evaluate_perplexity(model, evals)
            rows.append({"config": label, "method": method, "allocation": allocation,
                         "rotate": rotate, "target": s, "achieved": plan.achieved_sparsity,
                         "perplexity": ppl,
                         "increase": ppl - dense_ppl, "calibrate_s": round(cal_s, 1),
                         "plan_s": round(plan_s, 1)})
            print(f"  {label:<22} {s:.2f}: perplexity {ppl:.3f} ({ppl - dense_ppl:+.3f}), "
                  f"held-out sparsity {plan.achieved_sparsity:.3f}, plan {plan_s:.1f} s",
                  flush=True)
            write_json(partial, rows)
    return rows, cals


def _ring_time(fn, weights, reps: int) -> float:
    """Median seconds per call of ``fn(w)`` over ``reps`` passes over the ring ``weights``."""
    fn(weights[0])
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for w in weights:
            fn(w)
        out.append((time.perf_counter() - t0) / len(weights))
    return statistics.median(out)


def layer_speed(reps: int) -> list[dict]:
    """Per activation of a block: dense Linears vs the rule + one fused sparse gather."""
    import torch
    import torch.nn.functional as F

    from sparsecode.activations import sparse_input_linear

    gen = torch.Generator().manual_seed(0)
    rows = []
    for name, (outs, in_f) in GROUPS.items():
        rotated = "rotated" in name
        size = sum(outs) * in_f + (in_f * in_f if rotated else 0)
        n = max(8, int(RING_BYTES // (size * 4)))
        Ws = [[torch.randn(o, in_f, generator=gen) for o in outs] for _ in range(n)]
        Wts = [(torch.cat(ws).T.contiguous(),
                torch.linalg.qr(torch.randn(in_f, in_f, generator=gen))[0] if rotated else None)
               for ws in Ws]
        x = torch.randn(1, 1, in_f, generator=gen)
        with torch.no_grad():
            dense = _ring_time(lambda ws, x=x: [F.linear(x, w) for w in ws], Ws, reps)
            for s in (0.0, 0.25, 0.4, 0.5, 0.65, 0.8, 0.9):
                thr = float(x.abs().flatten().kthvalue(max(1, round(s * in_f))).values) if s else 0

                def sparse(wq, thr=thr, x=x):  # rotated: x Q is as Gaussian as x
                    w_t, Q = wq
                    z = x if Q is None else x @ Q
                    z = torch.where(z.abs() > thr, z, 0)
                    return sparse_input_linear(z, w_t)

                t = _ring_time(sparse, Wts, reps)
                rows.append({"layer": name, "outputs": outs, "in": in_f, "sparsity": s,
                             "dense_us": dense * 1e6, "sparse_us": t * 1e6,
                             "speedup": dense / t})
        del Ws, Wts
    return rows


def generation_speed(model, tok, cals, n_tokens: int, sparsities) -> list[dict]:
    import torch

    from sparsecode.activations import sparse_decode

    prompt = tok("The Python standard library provides", return_tensors="pt")["input_ids"]
    prompt = prompt[:, :16]

    def tps() -> float:
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            with torch.no_grad():
                model.generate(prompt, max_new_tokens=n_tokens, min_new_tokens=n_tokens,
                               do_sample=False)
            times.append(time.perf_counter() - t0)
        return n_tokens / statistics.median(times)

    rows = [{"config": "dense", "sparsity": 0.0, "tokens_per_s": tps()}]
    print(f"  dense: {rows[0]['tokens_per_s']:.1f} tokens/s", flush=True)
    for s in sparsities:
        for label, cal, allocation in cals:
            plan = cal.plan(s, allocation)
            with plan.attached(model):
                rows.append({"config": f"{label}, hooks (dense Linears)", "sparsity": s,
                             "tokens_per_s": tps()})
                with sparse_decode(model, plan):
                    rows.append({"config": f"{label} + sparse_decode", "sparsity": s,
                                 "tokens_per_s": tps()})
            for r in rows[-2:]:
                print(f"  {r['config']} {s:.2f}: {r['tokens_per_s']:.1f} tokens/s", flush=True)
    return rows


def prune_composition(model, calib, evals, dense_ppl) -> list[dict]:
    from sparsecode.activations import evaluate_perplexity, sparsify_activations
    from sparsecode.prune import prune

    rep = prune(model, calib, 0.5, "wanda")
    ppl_w = evaluate_perplexity(model, evals)
    rules = sparsify_activations(model, calib, 0.4, "magnitude", "greedy", heldout=evals)
    ppl_both = evaluate_perplexity(model, evals)
    rules.remove()
    out = [{"config": "Wanda 50% weights", "perplexity": ppl_w, "weight_sparsity": rep.sparsity,
            "activation_sparsity": 0.0},
           {"config": "Wanda 50% weights + ours 40% activations", "perplexity": ppl_both,
            "weight_sparsity": rep.sparsity, "activation_sparsity": rules.achieved_sparsity}]
    for r in out:
        print(f"  {r['config']}: perplexity {r['perplexity']:.3f} (dense {dense_ppl:.3f})",
              flush=True)
    return out


def report(meta, dense_ppl, rows, layers, gen_rows, combo, sparsities) -> tuple[list, list]:
    from common import format_table

    lines = [f"# Activation sparsity benchmark: {meta['device_tag']}", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items() if k != "device_tag"]
    lines += ["", f"Dense perplexity: {dense_ppl:.3f}", ""]
    by = {(r["config"], r["target"]): r for r in rows}
    configs = list(dict.fromkeys(r["config"] for r in rows))
    table = [[c] + [f"{by[c, s]['perplexity']:.2f} ({by[c, s]['achieved']:.3f})"
                    if (c, s) in by else "" for s in sparsities] for c in configs]
    lines += [format_table(["config"] + [f"{s:.0%}" for s in sparsities], table, markdown=True),
              "", "> perplexity on the held-out contexts (achieved held-out sparsity, weighted "
              "by the weights that read each activation)", ""]
    checks = []
    if ("TEAL uniform", 0.4) in by:
        best = min((r for r in rows if r["target"] == 0.4 and r["config"] != "TEAL uniform"),
                   key=lambda r: r["increase"], default=None)
        teal = by["TEAL uniform", 0.4]["increase"]
        if best is not None:
            ok = best["increase"] <= 0.5 * teal
            checks.append(f"[{'  MET  ' if ok else 'NOT MET'}] 40%: best ({best['config']}) "
                          f"+{best['increase']:.3f} perplexity vs TEAL uniform +{teal:.3f} "
                          f"(need <= half: {0.5 * teal:.3f})")
    rot = [r for r in rows if r.get("rotate") and r["target"] == 0.5]
    plain = [r for r in rows if not r.get("rotate") and r["target"] == 0.4]
    if rot and plain:
        r, q = min(rot, key=lambda r: r["perplexity"]), min(plain, key=lambda r: r["perplexity"])
        checks.append(f"[ info  ] equal weights read: rotated at 50% reads "
                      f"{0.5 + ROTATION_SHARE:.3f} of a dense block, unrotated at 40% 0.600: "
                      f"best rotated ({r['config']}) {r['perplexity']:.2f} vs best unrotated "
                      f"({q['config']}) {q['perplexity']:.2f}")
    if layers:
        lines += ["## Sparse-input Linear, one token", ""]
        sp = sorted({r["sparsity"] for r in layers})
        tab = []
        for name in GROUPS:
            mine = {r["sparsity"]: r for r in layers if r["layer"] == name}
            tab.append([name, f"{mine[0.0]['dense_us']:.1f}"]
                       + [f"{mine[s]['sparse_us']:.1f} ({mine[s]['speedup']:.2f}x)" for s in sp])

        def block_ratio(s, mlp):
            mine = [r for r in layers if r["sparsity"] == s
                    and r["layer"] in ("q/k/v", "o", "down", mlp)]
            dense = [r for r in layers if r["sparsity"] == s
                     and r["layer"] in ("q/k/v", "o", "down", "gate/up")]
            return sum(r["dense_us"] for r in dense) / sum(r["sparse_us"] for r in mine)

        block = {s: block_ratio(s, "gate/up") for s in sp}
        tab.append(["block (7 Linears)", ""] + [f"{block[s]:.2f}x" for s in sp])
        tab.append(["block, MLP input rotated", ""]
                   + [f"{block_ratio(s, 'gate/up rotated'):.2f}x" for s in sp])
        lines += [format_table(["layer", "dense [us]"] + [f"{s:.0%} [us]" for s in sp], tab,
                               markdown=True), ""]
        even = next((s for s in sp if block[s] >= 1.0), None)
        lines += [f"Break-even (block Linears as fast as dense): {even:.0%} input sparsity."
                  if even is not None else "No break-even up to 90%.", ""]
        lines += ["Dense: one `F.linear` per Linear; sparse: the threshold and one "
                  "`sparse_input_linear` per activation over the stacked transposed weight "
                  "(what `sparse_decode` runs), the rotated row adds the 576 x 576 rotation.",
                  ""]
        ok = block[0.5] >= 1.3
        checks.append(f"[{'  MET  ' if ok else 'NOT MET'}] 50%: block Linears {block[0.5]:.2f}x "
                      "dense (need >= 1.3x)")
    if gen_rows:
        lines += ["## Greedy generation, batch 1", "",
                  format_table(["config", "sparsity", "tokens/s", "x dense"],
                               [[r["config"], f"{r['sparsity']:.0%}", f"{r['tokens_per_s']:.1f}",
                                 f"{r['tokens_per_s'] / gen_rows[0]['tokens_per_s']:.2f}x"]
                                for r in gen_rows], markdown=True), ""]
    if combo:
        lines += ["## With pruned weights", "",
                  format_table(["config", "perplexity", "weight sparsity", "activation sparsity"],
                               [[r["config"], f"{r['perplexity']:.3f}",
                                 f"{r['weight_sparsity']:.3f}",
                                 f"{r['activation_sparsity']:.3f}"] for r in combo],
                               markdown=True), ""]
    lines += ["## Targets", "", *(f"- `{c}`" for c in checks)]
    return lines, checks


def main(argv=None) -> int:
    args = parse_args(argv)
    pin_threads(args.threads)
    import torch
    from common import (
        cpu_name,
        device_tag,
        git_commit,
        lm_contexts,
        now_iso,
        package_versions,
        write_results,
    )

    torch.set_num_threads(args.threads)
    from sparsecode.activations import evaluate_perplexity
    from sparsecode.lm import load_model

    model, tok = load_model("smollm2", dtype=torch.float32)
    calib, held_out = lm_contexts(tok, args.seq_len, args.n_calib)
    evals = held_out[: args.n_eval]
    sparsities = [float(s) for s in args.sparsities.split(",")]
    configs = args.configs.split(",")
    meta = {"device_tag": device_tag(args.threads), "date": now_iso(),
            "device": f"{cpu_name()}", "threads": args.threads,
            "versions": package_versions("torch", "transformers"), "git": git_commit(ROOT),
            "model": "SmolLM2-135M-Instruct (GGUF Q4_1 de-quantised to float32)",
            "calibration": f"{len(calib)} x {args.seq_len} tokens, training split",
            "evaluation": f"{len(evals)} x {args.seq_len} tokens, held-out split",
            "command": "python benchmarks/bench_activation_sparsity.py "
                       + " ".join(argv or sys.argv[1:])}
    dense_ppl = evaluate_perplexity(model, evals)
    print(f"dense perplexity {dense_ppl:.3f}", flush=True)
    stem = args.out or f"activation-sparsity-{meta['device_tag']}"
    partial = ROOT / "benchmarks" / "results" / f"{stem}.partial.json"
    if args.carry and not partial.exists():
        from common import write_json

        old = json.loads(Path(args.carry).read_text())
        kept = [r for r in old["rows"] if r["config"] in {CONFIGS[k][0] for k in configs}]
        write_json(partial, kept)
        names = ", ".join(sorted({r["config"] for r in kept}))
        meta["carried"] = (f"quality rows of {names} from the run at {old['meta']['git']} "
                           "(code paths unchanged)")
    rows, cals = quality_rows(model, calib, evals, configs, sparsities, dense_ppl, partial)
    layers, gen_rows, combo = [], [], []
    if not args.skip_speed:
        layers = layer_speed(args.reps)
        gen_cals = [(CONFIGS[k][0], cals[CONFIGS[k][1], CONFIGS[k][3]][0], CONFIGS[k][2])
                    for k in ("ours", "larosa") if (CONFIGS[k][1], CONFIGS[k][3]) in cals]
        gen_rows = generation_speed(model, tok, gen_cals, args.gen_tokens,
                                    [s for s in (0.4, 0.5, 0.65) if s in sparsities])
    if not args.skip_prune:
        combo = prune_composition(model, calib, evals, dense_ppl)
    lines, checks = report(meta, dense_ppl, rows, layers, gen_rows, combo, sparsities)
    write_results(ROOT / "benchmarks" / "results", stem, lines,
                  {"meta": meta, "dense_perplexity": dense_ppl, "rows": rows,
                   "layer_speed": layers, "generation": gen_rows, "pruned": combo,
                   "targets": checks})
    partial.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
