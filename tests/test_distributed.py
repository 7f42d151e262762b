"""Data-parallel and latent-sharded training with torch.distributed (gloo, 2-4 CPU processes).

Each test starts the ranks of ``tests/dist_worker.py`` as separate processes (the way torchrun
does: RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT) and compares what rank 0 wrote with a
single-process reference computed here.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
import dist_worker as w  # noqa: E402

from sae.data import ArrayActivations  # noqa: E402
from sae.train import Trainer  # noqa: E402

WORKER = Path(__file__).with_name("dist_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(scenario: str, out: Path, n: int = 2, shards: int = 1, timeout: float = 60,
           wait: float = 120) -> tuple[list[int], list[str]]:
    port = _free_port()
    procs = []
    for rank in range(n):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(n), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   TEST_LATENT_SHARDS=str(shards), TEST_TIMEOUT=str(timeout))
        procs.append(subprocess.Popen(
            [sys.executable, str(WORKER), scenario, str(out)], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=wait)[0])
        except subprocess.TimeoutExpired as e:
            for q in procs:
                q.kill()
            raise AssertionError(f"{scenario}: ranks still running after {wait} s (a hang)") from e
    return [p.returncode for p in procs], outs


def single_process(**cfg) -> Trainer:
    trainer = Trainer({"topk": w.make_sae()}, w.source(), w.train_cfg(**cfg))
    trainer.fit()
    return trainer


def assert_same_weights(got: dict, trainer: Trainer, atol: float = 1e-5) -> None:
    ref = trainer.saes["topk"].state_dict()
    assert set(got) == set(ref)
    for k, v in ref.items():
        np.testing.assert_allclose(got[k].double().numpy(), v.double().numpy(), atol=atol,
                                   rtol=0, err_msg=k)


@pytest.mark.parametrize(("n", "shards", "shape"),
                         [(2, 1, "sae"), (2, 2, "sae"), (4, 2, "sae"), (2, 1, "transcoder"),
                          (2, 2, "transcoder")],
                         ids=["data2", "latent2", "data2xlatent2", "transcoder-data2",
                              "transcoder-latent2"])
def test_distributed_training_equals_one_process_on_the_global_batch(tmp_path, monkeypatch, n,
                                                                     shards, shape):
    monkeypatch.setenv("TEST_SHAPE", shape)
    rc, outs = launch("train", tmp_path, n=n, shards=shards)
    assert rc == [0] * n, outs
    ref = single_process()
    assert_same_weights(load_file(str(tmp_path / "weights.safetensors")), ref)


def test_auxk_runs_in_the_reference_run():
    # the distributed comparisons above include AuxK steps (dead window = one batch)
    cfg = w.train_cfg(log_every=1)
    src = ArrayActivations(w.data(), batch_size=w.BATCH, seed=0, epochs=None)
    trainer = Trainer({"topk": w.make_sae()}, src, cfg)
    trainer.fit()
    assert sum("topk/auxk" in row for row in trainer.history) >= 2


@pytest.mark.parametrize("dead", ["every3", "low", "few"])
def test_latent_sharded_forward_equals_unsharded(tmp_path, monkeypatch, dead):
    monkeypatch.setenv("TEST_DEAD", dead)
    rc, outs = launch("forward", tmp_path, n=2, shards=2)
    assert rc == [0, 0], outs
    got = load_file(str(tmp_path / "forward.safetensors"))
    sae = w.make_sae()
    sae.tokens_since_fired[w.dead_latents()] = 10**6
    x = w.data()[: w.BATCH]
    out = sae.training_forward(x)
    out.loss.backward()
    assert "auxk" in out.terms
    code = sae.training_code(x)
    rows, cols, vals = code.rows, code.cols, code.values
    dense = torch.zeros(w.BATCH, w.D_SAE)
    dense[rows, cols] = vals.detach()
    assert torch.equal(got["codes"], dense)  # the sharded top-k is exact
    torch.testing.assert_close(got["loss"][0], out.loss.detach(), rtol=1e-6, atol=0)
    for name, p in sae.named_parameters():
        torch.testing.assert_close(got[f"grad/{name}"], p.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shards", [1, 2], ids=["data2", "latent2"])
def test_stop_on_one_rank_checkpoints_and_resumes_on_one_process(tmp_path, shards):
    rc, outs = launch("stop", tmp_path, n=2, shards=shards)
    assert rc == [0, 0], outs
    assert json.loads((tmp_path / "stopped.json").read_text())["step"] == 3
    ckpt = tmp_path / "checkpoint"
    src = ArrayActivations(w.data(), batch_size=w.BATCH, seed=0, epochs=None)
    resumed = Trainer({"topk": w.make_sae()}, src, w.train_cfg())
    resumed.resume(ckpt)
    assert resumed.step == 3
    resumed.fit()
    ref = single_process()
    got = {k: v for k, v in resumed.saes["topk"].state_dict().items()}
    assert_same_weights(got, ref)


def test_ranks_with_different_configurations_both_fail_naming_the_key(tmp_path):
    rc, outs = launch("mismatch", tmp_path)
    assert rc == [0, 0], outs
    for rank in (0, 1):
        msg = (tmp_path / f"error{rank}.txt").read_text()
        assert "k: rank 0 has 4, rank 1 has 5" in msg


def test_a_dead_rank_makes_the_other_fail_within_the_timeout(tmp_path):
    t0 = time.perf_counter()
    rc, outs = launch("kill", tmp_path, timeout=20, wait=90)
    assert rc[1] == 3  # the rank that died
    assert rc[0] == 1, outs  # the survivor raised instead of hanging
    err = json.loads((tmp_path / "error0.json").read_text())
    assert err["type"] in ("RuntimeError", "DistBackendError")
    assert err["seconds"] < 20 + 10
    assert time.perf_counter() - t0 < 90


def test_latent_sharding_rejects_other_architectures():
    import torch.distributed as dist

    from sae.distributed import LatentShards
    from sae.models import SAE, SAEConfig

    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="topk architecture, not 'batchtopk'"):
            LatentShards(None, 8, torch.device("cpu")).shard(
                SAE(SAEConfig(d_in=4, d_sae=8, architecture="batchtopk", k=2)))
    finally:
        dist.destroy_process_group()


def torchrun(args: list[str], n: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n),
           "--master-port", str(_free_port()), "-m", "sae", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_torchrun_sae_train_matches_one_process(tmp_path):
    from sae.cli import main

    acts = tmp_path / "acts.npy"
    g = np.random.default_rng(0)
    np.save(acts, (g.standard_normal((6000, 16)) * 2 + 1).astype(np.float32))
    common = ["--activations", str(acts), "--d-sae", "64", "--k", "4", "--tokens", "12000",
              "--batch-size", "256", "--holdout", "1000", "--matmul-dtype", "float32",
              "--no-progress"]
    assert main(["train", *common, "--out", str(tmp_path / "one")]) == 0
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())["topk"]
    for name, extra in (("data2", []), ("latent2", ["--latent-shards", "2"])):
        res = torchrun(["train", *common, *extra, "--out", str(tmp_path / name)])
        assert res.returncode == 0, res.stderr[-3000:]
        got = json.loads((tmp_path / name / "metrics.json").read_text())["topk"]
        assert got["train_tokens"] == one["train_tokens"]
        assert abs(got["fvu"] - one["fvu"]) < 0.01 * one["fvu"], (name, got["fvu"], one["fvu"])
        if name == "data2":  # each row's arithmetic is the same as in one process
            a = load_file(str(tmp_path / "one" / "topk" / "sae_weights.safetensors"))
            b = load_file(str(tmp_path / name / "topk" / "sae_weights.safetensors"))
            for k in a:
                torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-4, msg=f"{name} {k}")
        # latent shards: a shard's matmul over fewer columns rounds differently in the last
        # bit, which flips exact near-ties of the top-k after some dozens of steps, so weights
        # drift apart the way two float runs do (the step itself is exact: tests above)


def test_torchrun_rejects_a_batch_not_divisible_by_the_ranks(tmp_path):
    acts = tmp_path / "acts.npy"
    np.save(acts, np.ones((600, 8), np.float32))
    res = torchrun(["train", "--activations", str(acts), "--batch-size", "101",
                    "--tokens", "202", "--out", str(tmp_path / "run"), "--no-progress"])
    assert res.returncode != 0
    assert "--batch-size 101 is not divisible by the 2 data-parallel processes" in res.stderr


def test_latent_shards_without_torchrun_is_an_error(tmp_path):
    from sae.cli import main

    acts = tmp_path / "acts.npy"
    np.save(acts, np.ones((600, 8), np.float32))
    with pytest.raises(SystemExit, match="--latent-shards needs several processes"):
        main(["train", "--activations", str(acts), "--latent-shards", "2",
              "--out", str(tmp_path / "run")])


def test_torchrun_live_model_each_rank_computes_a_share(tiny_model_and_texts, tmp_path):
    from sae.cli import main

    model_dir, texts = tiny_model_and_texts
    common = ["--model", str(model_dir), "--text", str(texts), "--context-size", "16",
              "--hookpoint", "model.layers.1", "--d-sae", "64", "--k", "4",
              "--batch-size", "128", "--tokens", "4000", "--holdout", "256",
              "--device", "cpu", "--no-progress"]
    assert main(["train", *common, "--out", str(tmp_path / "one")]) == 0
    res = torchrun(["train", *common, "--out", str(tmp_path / "two")])
    assert res.returncode == 0, res.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())["topk"]
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())["topk"]
    assert two["train_tokens"] == one["train_tokens"]
    assert abs(two["fvu"] - one["fvu"]) < 0.05, (one["fvu"], two["fvu"])


def test_torchrun_resume_holds_the_lock_and_recovers_a_leftover_checkpoint(tmp_path, monkeypatch):
    """The run folder protocol under torchrun: rank 0 holds ``OUT/.lock`` (a held lock fails the
    launch, the folder untouched) and, on ``--resume``, recovers a checkpoint left as
    ``.checkpoint.*.tmp`` by a crash between renames before the other rank reads it."""
    import fcntl

    from sae.cli import main
    from sae.io import load

    acts = tmp_path / "acts.npy"
    np.save(acts, np.random.default_rng(0).standard_normal((3000, 16)).astype(np.float32))
    common = ["train", "--activations", str(acts), "--out", str(tmp_path / "run"), "--d-sae",
              "32", "--k", "3", "--tokens", "2560", "--batch-size", "128", "--holdout", "400",
              "--matmul-dtype", "float32", "--no-progress"]
    orig = Trainer._train_step

    def stop_at_step_3(self, batch):  # as a Ctrl-C: the checkpoint of step 3 is kept
        if self.step == 2:
            self.request_stop()
        return orig(self, batch)

    monkeypatch.setattr(Trainer, "_train_step", stop_at_step_3)
    assert main(common) == 130
    monkeypatch.undo()
    out = tmp_path / "run"
    os.rename(out / "checkpoint", out / ".checkpoint.x9y8z7.tmp")
    with open(out / ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.truncate(0)  # as a holder does
        held.write("pid 12345\n")
        held.flush()
        res = torchrun([*common, "--resume"])
    assert res.returncode != 0 and "in use by another `sae train` (pid 12345)" in res.stderr
    assert (out / ".checkpoint.x9y8z7.tmp").is_dir()
    res = torchrun([*common, "--resume"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resumed from {out / 'checkpoint'} at step 3" in res.stdout
    assert not [p.name for p in out.iterdir() if p.name.startswith((".checkpoint", "checkpoint"))]
    sae = load(out / "topk")  # verified: checksums, finite weights
    assert sae.cfg.d_sae == 32
