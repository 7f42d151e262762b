"""Write real SmolLM2-135M activations for the SAE benchmarks to an ``(N, 576)`` ``.npy`` file.

The residual stream after ``model.layers.15`` (the default hook point) over the built-in text:
first the 90% of documents used for training (shuffled positions), then the 10% held out by
``split_texts(seed=0)``, so the last rows of the file (the benchmark's held-out slice) come
from documents never trained on. Position 0 (BOS) and massive-norm positions are dropped, as in
``sae train``. One model pass, about 3 minutes on 2 CPU cores.

    python benchmarks/smollm2_activations.py --out benchmarks/data/smollm2-l15.npy
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from sae.live import LiveActivations
from sparsecode import lm, text


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "data" / "smollm2-l15.npy")
    p.add_argument("--hookpoint", default="model.layers.15")
    p.add_argument("--context-size", type=int, default=128)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    model, tok = lm.load_model("smollm2")
    train, held = text.split_texts(text.builtin_texts(), holdout_fraction=0.1, seed=0)
    parts = []
    for docs in (train, held):
        tokens = text.pack_tokens(tok, docs, context_size=args.context_size)
        src = LiveActivations(model, tokens, [args.hookpoint], batch_size=4096,
                                 drop_last=False, progress=True)
        parts.append(torch.cat([b[args.hookpoint] for b in src]))
    acts = torch.cat(parts).numpy()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.save(args.out, acts)
    print(f"{acts.shape} activations ({parts[1].shape[0]} held-out rows last) -> {args.out} "
          f"in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
