"""Write real SmolLM2-135M activations for the SAE benchmarks to an ``(N, 576)`` ``.npy`` file.

The residual stream after ``model.layers.15`` (the default hook point; a comma list of hook
points, e.g. ``model.layers.15.mlp:input,model.layers.15.mlp`` for a transcoder, writes them side
by side, ``(N, sum of widths)``, with ``<out>.json`` naming the places and their widths, all
from one forward per batch) over the built-in text:
first the 90% of documents used for training (shuffled positions), then the 10% held out by
``split_texts(seed=0)``, so the last rows of the file (the benchmark's held-out slice) come
from documents never trained on. Position 0 (BOS) and massive-norm positions are dropped, as in
``sae train``. One model pass, about 3 minutes on 2 CPU cores.

    python benchmarks/smollm2_activations.py --out benchmarks/data/smollm2-l15.npy
    python benchmarks/smollm2_activations.py --out benchmarks/data/smollm2-l15-mlp.npy \
        --hookpoint model.layers.15.mlp:input,model.layers.15.mlp
"""

from __future__ import annotations

import argparse
import json
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
    places = args.hookpoint.split(",")
    parts = []
    for docs in (train, held):
        tokens = text.pack_tokens(tok, docs, context_size=args.context_size)
        src = LiveActivations(model, tokens, places, batch_size=4096, drop_last=False,
                              progress=True)
        parts.append(torch.cat([torch.cat([b[p] for p in places], dim=1) for b in src]))
    acts = torch.cat(parts).numpy()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.save(args.out, acts)
    if len(places) > 1:
        widths = {p: lm.hidden_size(model, p) for p in places}
        args.out.with_suffix(".json").write_text(json.dumps({"places": widths}, indent=1))
    print(f"{acts.shape} activations ({parts[1].shape[0]} held-out rows last) -> {args.out} "
          f"in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
