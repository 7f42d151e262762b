"""Structured pruning benchmark: SmolLM2-135M (float32) with 10%, 20%, 30% fewer parameters.

Same data as ``bench_prune.py``: calibration ``--n-calib`` contexts of ``--seq-len`` tokens from
the training part of the built-in text (seeded permutation), perplexity on ``--n-eval`` contexts
of the held-out part. Rows at each reduction (fraction of all parameters removed, embeddings
included): ours (``prune_structured(method="ours")``: greedy OBS selection of MLP neurons on the
down_proj Gram + least-squares refit), magnitude-norm channel pruning (largest weight norms kept,
no refit), and unstructured Wanda at the same parameter count (the sparsity of the block
Linears that zeroes as many weights as the structured model removes; its speed is the dense
model's: the weights stay dense). Speed on the CPU, median of ``--repeats`` after one warm-up:
greedy generation at batch 1 (``--prompt-len`` prompt, ``--new-tokens`` new tokens), prefill
throughput at batch ``--batch`` (``--batch`` x ``--seq-len`` tokens, one forward) and decoding
throughput at batch ``--batch`` (``--new-tokens`` new tokens each, after a ``--prompt-len``
prompt). Results go to ``benchmarks/results/prune-structured-<device>.{json,md}`` after every
row.

With ``--lock`` the script takes the shared machine's benchmark lock (``/tmp/bench.lockdir``,
waiting while someone else holds it) for each reduction and releases it in between.

    python benchmarks/bench_prune_structured.py --threads 2 --lock      # ~25 min
    python benchmarks/bench_prune_structured.py --reductions 0.2 --methods ours,magnitude
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
import time
from pathlib import Path

from common import ROOT, pin_threads, threads_from_argv

N_THREADS = pin_threads(threads_from_argv())

METHODS = ["ours", "magnitude", "magnitude+ls", "wanda"]
LABEL = {"dense": "dense", "dense-again": "dense (speed re-measured last)",
         "ours": "ours (OBS + LS)", "magnitude": "magnitude-norm",
         "magnitude+ls": "magnitude-norm + LS refit", "wanda": "unstructured Wanda (same #params)"}
LOCK_DIR, LOCK_FILE = Path("/tmp/bench.lockdir"), Path("/tmp/bench.lock")


@contextlib.contextmanager
def bench_lock(enabled: bool):
    """The shared machine's benchmark lock (atomic mkdir), waiting while another holds it."""
    if not enabled:
        yield
        return
    while True:
        try:
            LOCK_DIR.mkdir()
            break
        except FileExistsError:
            time.sleep(1)
    LOCK_FILE.touch()
    try:
        yield
    finally:
        LOCK_FILE.unlink(missing_ok=True)
        LOCK_DIR.rmdir()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n-calib", type=int, default=32)
    p.add_argument("--n-eval", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--reductions", default="0.1,0.2,0.3")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--units", default="mlp", help="mlp or mlp+heads")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--speed-methods", default="ours",
                   help="methods whose speed is measured (magnitude-norm has the same shapes)")
    p.add_argument("--lock", action="store_true", help="take /tmp/bench.lockdir while running")
    p.add_argument("--out", default=None,
                   help="result file stem (default: prune-structured-<device>)")
    return p.parse_args(argv)


def measure_speed(model, evals, args) -> dict:
    """Tokens/s: greedy generation at batch 1, prefill and decoding at batch ``args.batch``."""
    import torch
    from common import time_median

    def generate(ids):
        return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                              pad_token_id=0)

    one = evals[:1, : args.prompt_len]
    many = evals[: args.batch, : args.prompt_len]
    full = evals[: args.batch]
    with torch.no_grad():
        t1, _, _ = time_median(lambda: generate(one), args.repeats, warmup=True)
        tp, _, _ = time_median(lambda: model(input_ids=full, use_cache=True), args.repeats,
                               warmup=True)
        tg, _, _ = time_median(lambda: generate(many), args.repeats, warmup=True)
        tq, _, _ = time_median(lambda: model(input_ids=many, use_cache=True), args.repeats)
    n = len(many)
    return {
        "gen_b1_tok_s": args.new_tokens / t1,
        "prefill_tok_s": full.numel() / tp,
        "gen_b16_tok_s": n * args.new_tokens / tg,  # whole generate call (prompt included)
        "decode_b16_tok_s": n * args.new_tokens / max(tg - tq, 1e-9),  # prompt prefill removed
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    first = contextlib.ExitStack()  # the lock of the first phase (model load + dense row)
    try:
        return run(args, argv, first)
    finally:
        first.close()


def run(args: argparse.Namespace, argv, first: contextlib.ExitStack) -> int:
    import torch
    from common import (
        cpu_name,
        device_tag,
        format_table,
        git_commit,
        lm_contexts,
        now_iso,
        package_versions,
        write_json,
    )

    torch.set_num_threads(args.threads)
    from sparsecode.lm import decoder_layers, load_model
    from sparsecode.prune import evaluate_perplexity, prune, prune_structured

    first.enter_context(bench_lock(args.lock))  # loading is heavy too: under the lock
    t0 = time.perf_counter()
    dense, tok = load_model("smollm2", dtype=torch.float32)
    load_s = time.perf_counter() - t0
    calib, held_out = lm_contexts(tok, args.seq_len, args.n_calib)
    evals = held_out[: max(args.n_eval, args.batch)]
    ev = evals[: args.n_eval]
    total = sum(p.numel() for p in dense.parameters())
    _, blocks = decoder_layers(dense)
    block_linear = sum(m.weight.numel() for b in blocks for m in b.modules()
                       if isinstance(m, torch.nn.Linear))
    device = f"{cpu_name()} ({os.cpu_count()} cores)" if not torch.cuda.is_available() \
        else torch.cuda.get_device_name()
    stem = args.out or f"prune-structured-{device_tag(args.threads)}"
    out_dir = ROOT / "benchmarks" / "results"
    meta = {
        "date": now_iso(), "device": device, "threads": args.threads,
        "versions": package_versions("torch", "transformers"), "git": git_commit(ROOT),
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1 de-quantised to float32)",
        "parameters": total, "block_linear_parameters": block_linear,
        "units": args.units,
        "calibration": f"{len(calib)} x {args.seq_len} tokens of builtin_texts() training split",
        "evaluation": f"{len(ev)} x {args.seq_len} tokens of the held-out split",
        "speed": f"batch 1: greedy generate, {args.prompt_len}-token prompt + "
                 f"{args.new_tokens} new tokens; batch {args.batch}: prefill of "
                 f"{args.batch} x {args.seq_len} tokens, decode = {args.batch} x "
                 f"{args.new_tokens} new tokens / (generate time - prompt prefill time); "
                 f"median of {args.repeats} after a warm-up",
        "model_load_s": round(load_s, 1),
        "command": "python benchmarks/bench_prune_structured.py " + " ".join(argv or sys.argv[1:]),
    }
    rows: list[dict] = []

    def fmt(v, spec=".1f"):
        return "" if v is None else format(v, spec)

    def save() -> None:
        write_json(out_dir / f"{stem}.json", {"meta": meta, "rows": rows})
        headers = ["reduction", "method", "params [M]", "perplexity", "x dense",
                   "MLP layer err", "tok/s b1", "prefill tok/s b16", "decode tok/s b16",
                   "prune [s]"]
        dppl = next((r["perplexity"] for r in rows if r["method"] == "dense"), None)
        table = [[f"{r['reduction']:.0%}" if r["reduction"] else "-", LABEL[r["method"]],
                  f"{r['params'] / 1e6:.1f}", f"{r['perplexity']:.2f}",
                  f"{r['perplexity'] / dppl:.2f}" if dppl else "",
                  fmt(r.get("mean_layer_error"), ".4f"),
                  fmt(r.get("gen_b1_tok_s")), fmt(r.get("prefill_tok_s"), ".0f"),
                  fmt(r.get("decode_b16_tok_s")), fmt(r.get("seconds"))] for r in rows]
        md = [f"# Structured pruning benchmark: {stem.removeprefix('prune-structured-')}", ""]
        md += [f"- {k}: {v}" for k, v in meta.items()]
        md += ["", format_table(headers, table, markdown=True), "",
               "> reduction: fraction of all parameters removed (embeddings included). "
               "params: parameters of the model (unstructured Wanda: non-zero parameters; its "
               "tensors stay dense, so its speed is the dense model's and is not re-measured; the "
               "magnitude-norm rows have exactly the "
               "shapes of ours, so their speed is measured only when listed in --speed-methods). "
               "MLP layer err: mean over the 30 down_proj layers of "
               "tr((W - W') H (W - W')^T) / tr(W H W^T) on the calibration inputs each saw "
               "(Wanda: mean over all 210 Linears of its own layer error). "
               "prune [s]: the whole pruning call, one run."]
        (out_dir / f"{stem}.md").write_text("\n".join(md) + "\n")
        print(format_table(headers, table), flush=True)

    with first:
        t0 = time.perf_counter()
        ppl = evaluate_perplexity(dense, ev)
        row = {"reduction": 0.0, "method": "dense", "params": total, "perplexity": ppl,
               "eval_s": round(time.perf_counter() - t0, 1)}
        row.update(measure_speed(dense, evals, args))
        rows.append(row)
        save()
    for red in (float(r) for r in args.reductions.split(",")):
        with bench_lock(args.lock):
            for method in args.methods.split(","):
                model = copy.deepcopy(dense)
                row = {"reduction": red, "method": method}
                if method == "wanda":
                    sparsity = red * total / block_linear
                    rep = prune(model, calib, sparsity=sparsity, method="wanda")
                    errs = [r.error for r in rep.layers]
                    row.update(params=total - round(rep.sparsity * block_linear),
                               sparsity=rep.sparsity, seconds=rep.seconds,
                               mean_layer_error=sum(errs) / len(errs))
                else:
                    base = method.removesuffix("+ls")
                    rep = prune_structured(model, calib, red, method=base, units=args.units,
                                           refit=True if method == "magnitude+ls" else None)
                    row.update(params=rep.params_after, achieved=rep.reduction,
                               neurons_removed=rep.neurons_removed,
                               kv_groups_removed=rep.kv_groups_removed,
                               intermediate_size=model.config.intermediate_size,
                               seconds=rep.seconds, mean_layer_error=rep.mean_error("neurons"),
                               layers=[{"name": r.name, "error": r.error} for r in rep.layers])
                t0 = time.perf_counter()
                row["perplexity"] = evaluate_perplexity(model, ev)
                row["eval_s"] = round(time.perf_counter() - t0, 1)
                if method in args.speed_methods.split(","):
                    row.update(measure_speed(model, evals, args))
                rows.append(row)
                save()
                del model
    with bench_lock(args.lock):  # the dense speed once more, after the pruned models: drift check
        row = {"reduction": 0.0, "method": "dense-again", "params": total,
               "perplexity": rows[0]["perplexity"]}
        row.update(measure_speed(dense, evals, args))
        rows.append(row)
        save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
