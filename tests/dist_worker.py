"""One rank of the distributed tests (started by tests/test_distributed.py with RANK etc. set).

``python tests/dist_worker.py SCENARIO OUT_DIR``; rank 0 writes its results under OUT_DIR.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from sae import distributed
from sae.data import ArrayActivations
from sae.models import SAE, SAEConfig
from sae.train import TrainConfig, Trainer

D_IN, D_SAE, K, BATCH, STEPS = 16, 64, 4, 64, 6


#: TEST_SHAPE=transcoder: a skip transcoder reading "in" (D_IN) and writing "out" (D_OUT).
D_OUT = 12
TRANSCODER = {"hook_name": "in", "hook_name_out": "out"}


def transcoding() -> bool:
    return os.environ.get("TEST_SHAPE", "sae") == "transcoder"


def data() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    width = D_IN + D_OUT if transcoding() else D_IN
    return torch.randn(BATCH * 8, width, generator=g) * 3 + 1


def source() -> ArrayActivations:
    places = {"in": D_IN, "out": D_OUT} if transcoding() else None
    return ArrayActivations(data(), batch_size=BATCH, seed=0, epochs=None, places=places)


def make_sae(k: int = K, dead_tokens: int | None = BATCH) -> SAE:
    shape = dict(d_out=D_OUT, transcode=True, skip=True, metadata=dict(TRANSCODER)) \
        if transcoding() else {}
    cfg = SAEConfig(d_in=D_IN, d_sae=D_SAE, k=k, dead_tokens=dead_tokens, aux_k=8, **shape)
    return SAE(cfg, generator=torch.Generator().manual_seed(0))


def dead_latents() -> list[int]:
    """Latents marked dead in the "forward" scenario (TEST_DEAD: "every3", "low", "few")."""
    pattern = os.environ.get("TEST_DEAD", "every3")
    if pattern == "low":  # all on the first shard
        return list(range(0, D_SAE // 2))
    if pattern == "few":  # fewer than aux_k, on the second shard only
        return [40, 41, 50]
    return list(range(0, D_SAE, 3))


def train_cfg(**kw) -> TrainConfig:
    return TrainConfig(total_tokens=BATCH * STEPS, lr=1e-2, progress=False, **kw)


def save_weights(trainer: Trainer, path: Path) -> None:
    full = trainer.full_saes()["topk"]
    if trainer.is_main:
        save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(path))


def main() -> None:
    scenario, out = sys.argv[1], Path(sys.argv[2])
    shards = int(os.environ.get("TEST_LATENT_SHARDS", "1"))
    d = distributed.init(shards, timeout_s=float(os.environ.get("TEST_TIMEOUT", "60")))
    src = distributed.RankSlice(source(), d.data_rank, d.data_size)
    if scenario == "train":  # a few steps; whole weights written by rank 0
        trainer = Trainer({"topk": make_sae()}, src, train_cfg(), out_dir=out, dist=d)
        trainer.fit()
        save_weights(trainer, out / "weights.safetensors")
    elif scenario == "forward":  # one sharded forward + backward on the initial weights
        sae = make_sae()
        sae.tokens_since_fired[dead_latents()] = 10**6  # AuxK runs
        trainer = Trainer({"topk": sae}, src, train_cfg(), dist=d)
        shard = trainer.saes["topk"]
        x = data()[:BATCH]
        out_ = shard.training_forward(x)
        out_.loss.backward()
        grads = {n: shard.collective.whole(n, p.grad) for n, p in shard.named_parameters()}
        code = shard.training_code(x)
        dense = torch.zeros(BATCH, D_SAE)
        dense[code.rows, code.cols + shard.collective.offset] = code.values.detach()
        torch.distributed.all_reduce(dense)
        if d.is_main:
            save_file({"loss": out_.loss.detach().reshape(1), "codes": dense,
                       **{f"grad/{n}": g for n, g in grads.items()}},
                      str(out / "forward.safetensors"))
    elif scenario == "stop":  # rank 1 asks to stop after step 3: all checkpoint and stop
        trainer = Trainer({"topk": make_sae()}, src, train_cfg(checkpoint_every=0),
                          out_dir=out, dist=d)
        orig = trainer._train_step

        def step(batch):
            row = orig(batch)
            if trainer.step == 2 and d.rank == 1:
                trainer.request_stop()
            return row

        trainer._train_step = step
        try:
            trainer.fit()
        except KeyboardInterrupt:
            if d.is_main:
                (out / "stopped.json").write_text(json.dumps({"step": trainer.step}))
    elif scenario == "mismatch":  # rank 1 has another k: both ranks must say so
        try:
            distributed.check_consistent("SAE configuration",
                                         make_sae(k=K + d.rank).cfg.to_dict())
        except ValueError as e:
            (out / f"error{d.rank}.txt").write_text(str(e))
    elif scenario == "kill":  # rank 1 dies after two steps; rank 0 must fail, not hang
        trainer = Trainer({"topk": make_sae()}, src, TrainConfig(
            total_tokens=BATCH * 1000, lr=1e-2, progress=False), dist=d)
        orig = trainer._train_step

        def step(batch):
            if trainer.step == 2 and d.rank == 1:
                os._exit(3)
            return orig(batch)

        trainer._train_step = step
        t0 = time.perf_counter()
        try:
            trainer.fit()
        except Exception as e:  # noqa: BLE001 - the point is which error arrives, and when
            (out / f"error{d.rank}.json").write_text(json.dumps(
                {"type": type(e).__name__, "message": str(e)[:500],
                 "seconds": time.perf_counter() - t0}))
            os._exit(1)
    else:
        raise SystemExit(f"unknown scenario {scenario}")
    distributed.shutdown()


if __name__ == "__main__":
    main()
