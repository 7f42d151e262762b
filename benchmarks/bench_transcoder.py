"""Transcoders and crosscoders on SmolLM2-135M: our trainer against sparsify's transcoder.

What it measures
----------------
**Transcoder** (``--part transcoder``): the MLP of layer 15 of SmolLM2-135M, its input and output
captured over the built-in text (``benchmarks/smollm2_activations.py --hookpoint
model.layers.15.mlp:input,model.layers.15.mlp``; the last ``--holdout`` rows come from held-out
documents). A TopK transcoder (9,216 latents, k 32, batch 4,096, 2M tokens) is trained

1. by ours: ``sae.train.Trainer`` with ``SAEConfig(transcode=True)`` and our defaults, with and
   without the skip term (``skip=True``);
2. by sparsify: its own ``Trainer`` with ``SaeConfig(transcode=True)`` (and
   ``skip_connection=True``), its default optimizer (schedule-free sign-SGD) and loss, fed the
   very rows ours sees in the same order: the "model" it hooks is a stand-in whose ``mlp``
   module receives the input rows and returns the output rows (``PairLookup``).

Reported per contender: tokens/s of the library's training call; on the held-out rows the FVU
of the MLP output (mean-centred), L0 and dead latents; and, with the transcoder spliced into
the model in place of the MLP's output (:func:`sae.metrics.model_metrics`, held-out documents,
``--eval-contexts`` contexts of 128 tokens), CE-loss recovered, delta LM loss and KL. sparsify's
transcoder is read back by our ``sae.io.load_sparsify`` for the splice (averaged weights, as its
checkpoints hold). Target: ours >= 1.5x sparsify's tokens/s at an FVU no worse.

**Crosscoder** (``--part crosscoder``): the residual stream after layers 6, 12 and 18
(``--hookpoint model.layers.6,model.layers.12,model.layers.18``). A TopK crosscoder (9,216
latents, k 32) against three separate TopK SAEs of 3,072 latents each at k 11 (the same total
latent count and about the same active latents per token), trained side by side on the same
batches; FVU per layer on the held-out rows.

All contenders run in this one process, one after another, with ``--threads`` torch threads;
run it on a quiet machine.

    python benchmarks/bench_transcoder.py --part transcoder
    python benchmarks/bench_transcoder.py --part crosscoder --tokens 1000000
    python benchmarks/bench_transcoder.py --quick     # smoke test: 60k tokens, 1,024 latents

Results go to ``benchmarks/results/transcoder-<cpu>-<threads>t.{json,md}`` (and
``crosscoder-...``).
"""

# ruff: noqa: E402  (thread counts must be set in the environment before numpy/torch import)
from __future__ import annotations

from common import pin_threads, threads_from_argv

N_THREADS = pin_threads(threads_from_argv())

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from bench_sae_train import load_activations
from common import (
    ROOT,
    device_tag,
    format_table,
    git_commit,
    now_iso,
    package_versions,
    write_results,
)
from torch import Tensor, nn

DATA = ROOT / "benchmarks" / "data"
MLP_IN, MLP_OUT = "model.layers.15.mlp:input", "model.layers.15.mlp"


def load_places(path: Path, holdout: int) -> tuple[dict, dict, dict]:
    """Training and held-out rows per place of a side-by-side activation file (and the widths,
    from its ``.json``); rows above 10x the median norm are dropped for everyone."""
    widths = json.loads(path.with_suffix(".json").read_text())["places"]
    data = load_activations(path, holdout, 10.0)
    split = list(widths.values())
    train = dict(zip(widths, data.train.split(split, dim=1), strict=True))
    held = dict(zip(widths, data.heldout.split(split, dim=1), strict=True))
    return train, held, widths


def order_of_rows(n_rows: int, batch_size: int, tokens: int, seed: int) -> Tensor:
    """The row indices of the batches our ArrayActivations serves, in order."""
    from sae.data import ArrayActivations

    src = ArrayActivations(torch.arange(n_rows, dtype=torch.float64)[:, None],
                           batch_size=batch_size, seed=seed, epochs=None, dtype=torch.float64)
    n_steps = -(-tokens // batch_size)
    it = iter(src)
    return torch.cat([next(it)["activations"][:, 0].long() for _ in range(n_steps)])


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


# ------------------------------------------------------------------------------ transcoder
def run_ours_transcoder(args, train: dict, widths: dict, skip: bool):
    from sae.data import ArrayActivations
    from sae.io import load
    from sae.models import SAE, SAEConfig
    from sae.train import TrainConfig, Trainer

    src = ArrayActivations(torch.cat([train[MLP_IN], train[MLP_OUT]], 1),
                           batch_size=args.batch_size, seed=args.seed, epochs=None,
                           places=widths)
    cfg = SAEConfig(d_in=widths[MLP_IN], d_out=widths[MLP_OUT], d_sae=args.d_sae, k=args.k,
                    transcode=True, skip=skip,
                    metadata={"hook_name": MLP_IN, "hook_name_out": MLP_OUT,
                              "model_name": "smollm2"})
    sae = SAE(cfg, generator=torch.Generator().manual_seed(args.seed))
    trainer = Trainer({"tc": sae}, src, TrainConfig(total_tokens=args.tokens, progress=False,
                                                    seed=args.seed))
    loop_s, _ = timed(trainer.fit)
    with tempfile.TemporaryDirectory() as tmp:
        saved = load(trainer.save(tmp)["tc"])  # raw-activation weights, scales folded in
    return saved, {"tokens": trainer.tokens, "loop_s": loop_s}


class _Out(nn.Module):
    """The stand-in MLP: returns the output rows of the ids its parent was called with."""

    def __init__(self, rows: Tensor):
        super().__init__()
        self.rows = nn.Embedding.from_pretrained(rows, freeze=True)
        self.ids: Tensor | None = None

    def forward(self, h: Tensor) -> Tensor:
        return self.rows(self.ids)


class PairLookup(nn.Module):
    """A stand-in "language model" for sparsify's Trainer: token id ``i`` -> input row ``i``
    into the ``mlp`` module, which outputs output row ``i``; sparsify's transcoder hook on
    ``mlp`` receives exactly our (input, output) rows."""

    def __init__(self, x: Tensor, y: Tensor):
        super().__init__()
        self.embed = nn.Embedding.from_pretrained(x, freeze=True)
        self.mlp = _Out(y)

    @property
    def base_model(self) -> nn.Module:
        return self

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dummy_inputs(self) -> dict[str, Tensor]:
        return {"input_ids": torch.zeros(1, 2, dtype=torch.long)}

    def forward(self, input_ids: Tensor) -> Tensor:
        self.mlp.ids = input_ids
        return self.mlp(self.embed(input_ids))


def run_sparsify_transcoder(args, train: dict, skip: bool):
    from bench_sae_train import TokenRows
    from sparsify import SaeConfig, TrainConfig, Trainer

    from sae.io import load_sparsify

    order = order_of_rows(len(train[MLP_IN]), args.batch_size, args.tokens, args.seed)
    ctx = 256 if args.batch_size % 256 == 0 else args.batch_size
    dataset = TokenRows(order.view(-1, ctx))
    model = PairLookup(train[MLP_IN], train[MLP_OUT])
    with tempfile.TemporaryDirectory(prefix="bench-sparsify-") as tmp:
        cfg = TrainConfig(SaeConfig(k=args.k, num_latents=args.d_sae, transcode=True,
                                    skip_connection=skip),
                          batch_size=args.batch_size // ctx, hookpoints=["mlp"],
                          log_to_wandb=False, save_dir=tmp)
        trainer = Trainer(cfg, dataset, model)
        trainer.save = lambda: None  # no checkpoint writing inside the timed loop
        loop_s, _ = timed(trainer.fit)
        opt = trainer.optimizers[0]
        if hasattr(opt, "eval"):
            opt.eval()  # the averaged iterate: what sparsify's checkpoints hold
        trainer.saes["mlp"].save_to_disk(Path(tmp) / "tc")
        ours = load_sparsify(Path(tmp) / "tc")
    ours.cfg.metadata.update(hook_name=MLP_IN, hook_name_out=MLP_OUT)
    return ours, {"tokens": trainer.global_step * args.batch_size, "loop_s": loop_s,
                  "optimizer": cfg.optimizer}


def spliced(args, model, tokens, sae) -> dict:
    from sae.metrics import model_metrics

    m = model_metrics(model, sae, None, tokens[: args.eval_contexts])
    keys = ("ce_clean", "ce_sae", "ce_zero", "ce_loss_recovered", "delta_lm_loss", "kl_sae")
    return {k: m[k] for k in keys}


def transcoder_part(args) -> tuple[list[str], dict]:
    from sae.metrics import evaluate
    from sparsecode import lm, text

    path = args.activations or DATA / "smollm2-l15-mlp.npy"
    train, held, widths = load_places(Path(path), args.holdout)
    model, tok = lm.load_model("smollm2")
    held_docs = text.split_texts(text.builtin_texts(), holdout_fraction=0.1, seed=0)[1]
    tokens = text.pack_tokens(tok, held_docs, context_size=128)
    runs = {
        "ours": lambda: run_ours_transcoder(args, train, widths, skip=False),
        "ours --skip": lambda: run_ours_transcoder(args, train, widths, skip=True),
        "sparsify": lambda: run_sparsify_transcoder(args, train, skip=False),
        "sparsify skip": lambda: run_sparsify_transcoder(args, train, skip=True),
    }
    results = {}
    for name, run in runs.items():
        if args.only and name.split()[0] not in args.only:
            continue
        print(f"training {name} ...", flush=True)
        sae, info = run()
        m = evaluate(sae, held[MLP_IN], y=held[MLP_OUT])
        info.update(tokens_per_s=info["tokens"] / info["loop_s"], fvu=m["fvu"], l0=m["l0"],
                    dead_fraction=m["dead_fraction"], **spliced(args, model, tokens, sae))
        results[name] = info
        print(name, json.dumps(info), flush=True)
    return report("transcoder", args, results, widths), results


# ------------------------------------------------------------------------------ crosscoder
def crosscoder_part(args) -> tuple[list[str], dict]:
    from sae.data import ArrayActivations
    from sae.metrics import evaluate
    from sae.models import SAE, SAEConfig
    from sae.train import TrainConfig, Trainer

    path = args.activations or DATA / "smollm2-l6-12-18.npy"
    train, held, widths = load_places(Path(path), args.holdout)
    names = list(widths)
    data = torch.cat([train[p] for p in names], 1)
    gen = torch.Generator().manual_seed(args.seed)
    cc_cfg = SAEConfig(d_in=sum(widths.values()), d_sae=args.d_sae, k=args.k,
                       places=list(widths.values()), metadata={"hook_names": names})
    k_each = max(1, round(args.k / len(names)))
    per_layer = {f"sae@{p}": SAEConfig(d_in=w, d_sae=args.d_sae // len(names), k=k_each,
                                       metadata={"hook_name": p}) for p, w in widths.items()}
    results = {}
    for name, configs in (("crosscoder", {"crosscoder": cc_cfg}), ("3 SAEs", per_layer)):
        saes = {n: SAE(c, generator=gen) for n, c in configs.items()}
        src = ArrayActivations(data, batch_size=args.batch_size, seed=args.seed, epochs=None,
                               places=widths)
        trainer = Trainer(saes, src, TrainConfig(total_tokens=args.tokens, progress=False,
                                                 seed=args.seed))
        print(f"training {name} ...", flush=True)
        loop_s, _ = timed(trainer.fit)
        row = {"tokens": trainer.tokens, "loop_s": loop_s,
               "tokens_per_s": trainer.tokens / loop_s, "fvu_per_layer": {}, "l0": 0.0}
        for n, sae in saes.items():
            x, _ = trainer.inputs(n, held)
            m = evaluate(sae.eval(), x)
            row["l0"] += m["l0"]
            if sae.cfg.places is None:
                row["fvu_per_layer"][sae.cfg.metadata["hook_name"]] = m["fvu"]
            else:
                row["fvu_per_layer"].update({p: m[f"fvu_place{i}"] for i, p in enumerate(names)})
        results[name] = row
        print(name, json.dumps(row), flush=True)
    return report("crosscoder", args, results, widths), results


# ------------------------------------------------------------------------------ report
def report(part: str, args, results: dict, widths: dict) -> list[str]:
    v = package_versions("torch", "eai-sparsify", "sparsecode")
    lines = [f"# {part} benchmark ({device_tag(N_THREADS)}, {now_iso()})", "",
             f"torch {v['torch']}, eai-sparsify {v['eai-sparsify']}, git "
             f"{git_commit(ROOT)}; places {widths}; {args.tokens} tokens, batch "
             f"{args.batch_size}, d_sae {args.d_sae}, k {args.k}.", ""]
    if part == "transcoder":
        peer = results.get("sparsify", {}).get("tokens_per_s")
        headers = ["contender", "tokens/s", "x sparsify", "FVU (MLP out)", "L0", "dead %",
                   "CE recovered", "delta LM loss", "KL"]
        rows = [[n, f"{r['tokens_per_s']:.0f}",
                 f"{r['tokens_per_s'] / peer:.2f}" if peer else "",
                 f"{r['fvu']:.4f}", f"{r['l0']:.1f}", f"{100 * r['dead_fraction']:.2f}",
                 f"{r['ce_loss_recovered']:.4f}", f"{r['delta_lm_loss']:.4f}",
                 f"{r['kl_sae']:.4f}"] for n, r in results.items()]
    else:
        layers = list(widths)
        headers = ["contender", "tokens/s", "total L0", *[f"FVU {p}" for p in layers]]
        rows = [[n, f"{r['tokens_per_s']:.0f}", f"{r['l0']:.1f}",
                 *[f"{r['fvu_per_layer'][p]:.4f}" for p in layers]] for n, r in results.items()]
    return lines + [format_table(headers, rows, markdown=True)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=("transcoder", "crosscoder"), default="transcoder")
    p.add_argument("--activations", type=Path, default=None)
    p.add_argument("--tokens", type=int, default=2_000_000)
    p.add_argument("--d-sae", type=int, default=9216)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--holdout", type=int, default=16384)
    p.add_argument("--eval-contexts", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="*", default=None, help="ours and/or sparsify")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=N_THREADS)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.d_sae, args.eval_contexts = 60_000, 1024, 4
    return args


def main(argv=None) -> None:
    import os

    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # sparsify's eager path on CPU
    os.environ.setdefault("WANDB_MODE", "disabled")
    args = parse_args(argv)
    run = transcoder_part if args.part == "transcoder" else crosscoder_part
    lines, results = run(args)
    stem = f"{args.part}-{device_tag(N_THREADS)}" + ("-quick" if args.quick else "")
    write_results(args.out, stem, lines, {"args": {k: str(v) for k, v in vars(args).items()},
                                          "results": results})


if __name__ == "__main__":
    main()
