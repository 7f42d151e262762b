"""Prune the built-in SmolLM2-135M to 50% sparsity and compare perplexities (offline).

Calibration: contexts from the training split of the built-in text; perplexity on the held-out
split. Prints one line per method, e.g. ``wanda: perplexity 53.1 (dense 17.9), 12 s``.

    python examples/prune_smollm2.py                          # wanda and iht at 50%
    python examples/prune_smollm2.py --pattern 2:4 --methods sparsegpt,iht
    python examples/prune_smollm2.py --n-calib 8 --n-eval 4 --blocks 4   # quick look
"""

from __future__ import annotations

import argparse

import torch

from sparsecode.lm import load_model
from sparsecode.prune import decoder_layers, evaluate_perplexity, prune
from sparsecode.text import builtin_texts, pack_tokens, split_texts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="wanda,iht")
    ap.add_argument("--sparsity", type=float, default=None)
    ap.add_argument("--pattern", default="unstructured")
    ap.add_argument("--allocation", default="uniform")
    ap.add_argument("--n-calib", type=int, default=32)
    ap.add_argument("--n-eval", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--blocks", type=int, default=0, help="keep only the first N blocks (0: all)")
    args = ap.parse_args()

    model, tok = load_model("smollm2")
    if args.blocks:  # a shorter model for a quick look
        _, layers = decoder_layers(model)
        del layers[args.blocks:]
        model.config.num_hidden_layers = args.blocks
    train, held = split_texts(builtin_texts(), seed=0)
    calib = pack_tokens(tok, train, args.seq_len)
    calib = calib[torch.randperm(len(calib), generator=torch.Generator().manual_seed(0))]
    calib = calib[: args.n_calib]
    evals = pack_tokens(tok, held, args.seq_len)[: args.n_eval]
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    dense = evaluate_perplexity(model, evals)
    for method in args.methods.split(","):
        model.load_state_dict(dense_state)
        rep = prune(model, calib, args.sparsity, method, args.pattern, args.allocation)
        ppl = evaluate_perplexity(model, evals)
        print(f"{method}: perplexity {ppl:.2f} (dense {dense:.2f}), sparsity {rep.sparsity:.3f}, "
              f"{rep.seconds:.0f} s")


if __name__ == "__main__":
    main()
