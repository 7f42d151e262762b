"""SAE training speed and quality: our ``sae.train.Trainer`` against SAELens and sparsify.

What it measures
----------------
A TopK sparse autoencoder (9,216 latents, k = 32, batch 4,096 tokens, 2M training tokens) is
trained on the same cached activations (an ``(N, d_in)`` float32 ``.npy`` array, e.g. the
SmolLM2-135M residual stream with d_in = 576) by

1. ours: ``sae.train.Trainer`` with ``SAE(SAEConfig(architecture="topk"))`` and our defaults,
   twice: encoder matmul in float32 and in bfloat16 (``TrainConfig(matmul_dtype=...)``);
2. SAELens: ``TopKTrainingSAE`` trained by its own ``SAETrainer``, with the settings of its
   ``LanguageModelSAERunnerConfig`` defaults (Adam, lr 3e-4 constant, no input normalisation,
   b_dec at zero, AuxK with a 1,000-step dead window) and an iterator of activation batches
   as its data provider (no language model is needed);
3. sparsify: its own ``Trainer`` with its default optimizer (schedule-free sign-SGD, "signum")
   and loss, run unchanged: the "language model" it hooks is an ``nn.Embedding`` holding the
   activation rows, and the token ids it reads are row indices packed into sequences, so its
   hook receives exactly our activation rows.

Every contender sees the same training rows in the same batch order (one
``sae.data.ArrayActivations`` shuffle, seeded alike; sparsify gets the row indices of those
batches) and none sees the held-out rows (the last ``--holdout`` rows of the array). Rows whose
norm is above ``--massive-factor`` (default 10) times the median training-row norm are dropped
from both, for everyone (SmolLM2's rare attention-sink positions; ``--massive-factor 0`` keeps
all rows).

Each contender runs in its own subprocess with ``torch.set_num_threads(--threads)`` (and the
BLAS/OpenMP thread variables), so that its peak memory is its own:

* tokens/s: tokens trained divided by the wall time of the library's training call (``fit()``:
  initialisation from the first batch, every step, the data provider; not the data loading, the
  model construction or the evaluation). sparsify's end-of-training checkpoint write is
  switched off (``Trainer.save`` is a no-op during the timed call); SAELens and ours write none.
* held-out quality, by ONE function (``heldout_metrics``, using ``sae.metrics``) on each
  library's reconstruction of the raw held-out activations: FVU (mean-centred), L0, the
  fraction of latents that never fire on the held-out rows ("dead"), MSE and cosine. Each
  library's input convention is undone first: ours scales inputs by a constant (reconstruction
  divided back), SAELens folds its scaling (none by default) into the weights at the end of
  ``fit``, sparsify trains on raw activations; sparsify's schedule-free optimizer is switched
  to its averaged (eval) weights, which is what its checkpoints contain.
* memory: peak RSS of the subprocess (``ru_maxrss``) right after training, and the RSS after
  imports and data loading ("baseline"); their difference is the training's own memory.

Speed ratios ``x SAELens`` / ``x sparsify`` are tokens/s of a row divided by that peer's. The
target (ours >= 1.5x the faster peer's tokens/s, with a held-out FVU no worse than the better
peer's) is checked for each of our rows.

How to run
----------
    python benchmarks/bench_sae_train.py --activations acts.npy     # full run (quiet machine!)
    python benchmarks/bench_sae_train.py --quick --threads 1        # smoke test, synthetic data

``--quick`` trains 100k tokens with 2,048 latents; without ``--activations`` a synthetic
activation-like array (planted sparse features on a large mean offset, a few massive rows) is
generated. ``--only`` picks contenders, ``--repeats`` runs each several times (medians are
reported). Results go to ``benchmarks/results/sae-train-<cpu>-<threads>t.json`` and ``.md``
(``-quick`` / ``-synthetic`` appended for those runs).
"""

# ruff: noqa: E402  (thread counts must be set in the environment before numpy/torch import)

from common import THREAD_ENV_VARS, pin_threads, threads_from_argv

N_THREADS = pin_threads(threads_from_argv())

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

import argparse
import json
import math
import resource
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from common import (
    cpu_name,
    device_tag,
    format_table,
    git_commit,
    now_iso,
    package_versions,
    tree_digest,
    write_json,
)
from torch import Tensor, nn

D_SAE = 9216
K = 32
BATCH = 4096
TOKENS = 2_000_000
HOLDOUT = 16384
MASSIVE_FACTOR = 10.0
QUICK = {"tokens": 100_000, "d_sae": 2048, "holdout": 4096, "synthetic_rows": 32768}
SYNTHETIC_ROWS = 262_144
SYNTHETIC_D_IN = 576
TARGETS = {"speedup_vs_faster_peer": 1.5, "fvu_rel_tolerance": 0.0}
CONTENDERS = ("ours-fp32", "ours-bf16", "saelens", "sparsify")
LIBRARY = {"ours-fp32": "sparsecode", "ours-bf16": "sparsecode", "saelens": "SAELens",
           "sparsify": "sparsify"}
PEERS = ("saelens", "sparsify")
HOOK = "activations"  # the hook point name of our activation source


# --------------------------------------------------------------------------------------------
# Data: one loader for every contender (same rows, same filter, same held-out tail)
# --------------------------------------------------------------------------------------------


@dataclass
class Data:
    train: Tensor  # (n_train, d_in) float32, in memory
    heldout: Tensor  # (n_heldout, d_in) float32
    info: dict

    @property
    def d_in(self) -> int:
        return int(self.train.shape[1])


def load_activations(path: Path, holdout: int, massive_factor: float | None,
                     chunk_rows: int = 65536) -> Data:
    """The training rows (all but the last ``holdout``) and the held-out rows of a ``.npy``
    array, as float32 tensors, with rows above ``massive_factor`` x the median training-row
    norm dropped from both. Reads the file in chunks (one copy of the kept rows in memory)."""
    from sae.data import check_finite

    arr = np.load(path, mmap_mode="r", allow_pickle=False)
    if arr.ndim != 2 or arr.dtype.kind != "f":
        raise ValueError(f"{path}: expected a 2-D float array, got {arr.dtype} {arr.shape}")
    n, d = arr.shape
    if not 0 < holdout < n:
        raise ValueError(f"--holdout {holdout} must be in (0, {n}) for {n} rows")
    n_train = n - holdout
    norms = np.empty(n, dtype=np.float64)
    for a in range(0, n, chunk_rows):
        block = np.asarray(arr[a : a + chunk_rows], dtype=np.float32)
        check_finite(block, f"activations in {path}", row_offset=a)
        norms[a : a + len(block)] = np.linalg.norm(block.astype(np.float64), axis=1)
    median = float(np.median(norms[:n_train]))
    if massive_factor:
        keep = norms <= massive_factor * median
    else:
        keep = np.ones(n, dtype=bool)

    def gather(lo: int, hi: int) -> Tensor:
        out = torch.empty(int(keep[lo:hi].sum()), d, dtype=torch.float32)
        pos = 0
        for a in range(lo, hi, chunk_rows):
            b = min(a + chunk_rows, hi)
            block = np.asarray(arr[a:b], dtype=np.float32)[keep[a:b]]
            out[pos : pos + len(block)] = torch.from_numpy(block)
            pos += len(block)
        return out

    train, held = gather(0, n_train), gather(n_train, n)
    kept_norms = norms[:n_train][keep[:n_train]]
    info = {
        "path": str(path), "rows": int(n), "d_in": int(d), "dtype": str(arr.dtype),
        "file_bytes": path.stat().st_size, "holdout_rows": int(holdout),
        "massive_factor": massive_factor, "median_norm": median,
        "dropped_train_rows": int(n_train - len(train)),
        "dropped_heldout_rows": int(holdout - len(held)),
        "train_rows": int(len(train)), "heldout_rows_kept": int(len(held)),
        "train_mean_norm": float(kept_norms.mean()),
        "train_norm_of_mean": float(train.double().mean(dim=0).norm()),
    }
    return Data(train, held, info)


def synthetic_activations(n: int, d: int, seed: int = 0) -> np.ndarray:
    """Activation-like rows for development: a few of 2*d planted unit directions active per
    row (Zipf-distributed frequencies, positive magnitudes), a large shared mean offset (norm
    100, as in real residual streams), noise, and ~0.02% massive rows (60x the norm)."""
    g = torch.Generator().manual_seed(seed)
    n_feat = 2 * d
    F = torch.randn(n_feat, d, generator=g)
    F /= F.norm(dim=1, keepdim=True)
    offset = torch.randn(d, generator=g)
    offset *= 100.0 / offset.norm()
    w = torch.arange(1, n_feat + 1, dtype=torch.float64).pow(-0.8)
    p = (24 * w / w.sum()).clamp(max=1.0).float()
    out = np.empty((n, d), dtype=np.float32)
    for a in range(0, n, 8192):
        m = min(8192, n - a)
        active = torch.rand(m, n_feat, generator=g) < p
        mags = 0.5 + torch.rand(m, n_feat, generator=g)
        x = 8.0 * ((active * mags) @ F) + offset + 0.5 * torch.randn(m, d, generator=g)
        massive = torch.rand(m, generator=g) < 2e-4
        x[massive] *= 60.0
        out[a : a + m] = x.numpy()
    return out


def batch_source(data_2d: Tensor, batch_size: int, seed: int, dtype=torch.float32):
    """The shuffled batch stream every contender follows (an endless ArrayActivations)."""
    from sae.data import ArrayActivations

    return ArrayActivations(data_2d, batch_size=batch_size, seed=seed, epochs=None,
                            hookpoint=HOOK, dtype=dtype)


# --------------------------------------------------------------------------------------------
# Measurements shared by all contenders
# --------------------------------------------------------------------------------------------


def rss_now_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rss_peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


@torch.no_grad()
def heldout_metrics(reconstruct, x: Tensor, d_sae: int, chunk: int = 4096) -> dict:
    """Quality of one trained SAE on the raw held-out rows ``x``, the same way for everyone.

    ``reconstruct(xb) -> (x_hat, z)`` gives the reconstruction of the raw rows ``xb`` and the
    dense latent codes ``(len(xb), d_sae)``. FVU is ``sae.metrics.fvu`` (mean-centred) over all
    held-out rows at once; "dead" latents never fire on ``x``, "dense" ones on > 10% of rows.
    """
    from sae import metrics

    parts, counts, nnz = [], torch.zeros(d_sae, dtype=torch.float64), 0
    for a in range(0, len(x), chunk):
        xb = x[a : a + chunk]
        x_hat, z = reconstruct(xb)
        parts.append(x_hat.float())
        active = z != 0
        nnz += int(active.sum())
        counts += active.sum(dim=0).double()
    x_hat = torch.cat(parts)
    dens = counts / len(x)
    return {
        "fvu": metrics.fvu(x, x_hat),
        "mse": metrics.mse(x, x_hat),
        "cosine": metrics.cosine(x, x_hat),
        "l0": nnz / len(x),
        "dead_fraction": float((dens == 0).double().mean()),
        "dense_fraction": float((dens > metrics.DENSE_THRESHOLD).double().mean()),
    }


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


# --------------------------------------------------------------------------------------------
# The contenders (each runs in a child process; `prepare` is untimed and before the baseline)
# --------------------------------------------------------------------------------------------


def run_ours(args, data: Data, matmul_dtype: str) -> dict:
    from sae.models import SAE, SAEConfig
    from sae.optim import base_lr, default_warmup
    from sae.train import TrainConfig, Trainer

    source = batch_source(data.train, args.batch_size, args.seed)
    base = (rss_now_mib(), rss_peak_mib())
    t0 = time.perf_counter()
    sae = SAE(SAEConfig(d_in=data.d_in, d_sae=args.d_sae, architecture="topk", k=args.k),
              generator=torch.Generator().manual_seed(args.seed))
    cfg = TrainConfig(total_tokens=args.tokens, matmul_dtype=matmul_dtype, progress=False,
                      seed=args.seed)
    trainer = Trainer({"topk": sae}, source, cfg, heldout=data.heldout)
    setup_s = time.perf_counter() - t0
    loop_s, _ = timed(trainer.fit)
    peak = rss_peak_mib()
    scale = trainer.scales["topk"]["in"][0]
    sae.eval()

    def reconstruct(xb):
        z = sae.encode(xb * scale)
        return sae.decode(z) / scale, z

    m = heldout_metrics(reconstruct, data.heldout, args.d_sae)
    own = trainer.evaluate()  # the trainer's own held-out evaluation, as a cross-check
    opt = trainer.optimizers["topk"]
    n_steps = trainer.n_steps or 0
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else default_warmup(n_steps)
    return {
        "steps": trainer.step, "tokens": trainer.tokens, "loop_s": loop_s, "setup_s": setup_s,
        "baseline_rss_mib": base[0], "baseline_peak_rss_mib": base[1], "peak_rss_mib": peak,
        **m,
        "optimizer": (f"Adam(betas={cfg.betas}), lr {base_lr(sae, cfg.lr):.3g}, linear warm-up "
                      f"{warmup} steps, linear decay over the last {cfg.decay_fraction:.0%}, "
                      f"grad clip {cfg.grad_clip}"),
        "settings": {"matmul_dtype": matmul_dtype, "b_dec_init": cfg.b_dec_init,
                     "normalize_input": cfg.normalize_input, "input_scale": scale,
                     "aux_k": sae.cfg.aux_k, "aux_coefficient": sae.cfg.aux_coefficient,
                     "dead_tokens": sae.cfg.dead_tokens, "unit_norm_decoder": True,
                     "final_lr": opt.param_groups[0]["lr"]},
        "extra": {"trainer_evaluate_fvu": own.get("topk/heldout/fvu"),
                  "train_dead_fraction_at_end": float(sae.dead_mask().float().mean())},
    }


def run_saelens(args, data: Data) -> dict:
    from sae_lens.config import LanguageModelSAERunnerConfig, LoggingConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    source = batch_source(data.train, args.batch_size, args.seed)
    provider = (batch[HOOK] for batch in source)  # SAELens' DataProvider: Iterator[Tensor]
    base = (rss_now_mib(), rss_peak_mib())
    t0 = time.perf_counter()
    # The defaults of SAELens' own training entry point, minus the language model: only the
    # shared settings (d_sae, k, batch size, tokens) are given; wandb logging and checkpoint /
    # output folders are off (neither changes the training).
    runner_cfg = LanguageModelSAERunnerConfig(
        sae=TopKTrainingSAEConfig(d_in=data.d_in, d_sae=args.d_sae, k=args.k),
        training_tokens=args.tokens, train_batch_size_tokens=args.batch_size,
        logger=LoggingConfig(log_to_wandb=False), checkpoint_path=None, output_path=None,
        verbose=False)
    torch.manual_seed(args.seed)
    sae = TopKTrainingSAE(runner_cfg.sae)
    trainer_cfg = runner_cfg.to_sae_trainer_config()
    trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=provider)
    setup_s = time.perf_counter() - t0
    loop_s, sae = timed(trainer.fit)
    peak = rss_peak_mib()
    sae.eval()

    def reconstruct(xb):
        z = sae.encode(xb)
        return sae.decode(z), z

    m = heldout_metrics(reconstruct, data.heldout, args.d_sae)
    scfg = sae.cfg
    return {
        "steps": trainer.n_training_steps, "tokens": trainer.n_training_samples,
        "loop_s": loop_s, "setup_s": setup_s,
        "baseline_rss_mib": base[0], "baseline_peak_rss_mib": base[1], "peak_rss_mib": peak,
        **m,
        "optimizer": (f"Adam(betas=({trainer_cfg.adam_beta1}, {trainer_cfg.adam_beta2})), lr "
                      f"{trainer_cfg.lr:.3g} {trainer_cfg.lr_scheduler_name}, warm-up "
                      f"{trainer_cfg.lr_warm_up_steps}, decay {trainer_cfg.lr_decay_steps} steps,"
                      f" grad clip 1.0"),
        "settings": {"normalize_activations": runner_cfg.sae.normalize_activations,
                     "decoder_init_norm": scfg.decoder_init_norm,
                     "rescale_acts_by_decoder_norm": scfg.rescale_acts_by_decoder_norm,
                     "aux_loss_coefficient": scfg.aux_loss_coefficient,
                     "dead_feature_window_steps": trainer_cfg.dead_feature_window,
                     "apply_b_dec_to_input": scfg.apply_b_dec_to_input,
                     "b_dec_init": "zeros", "autocast": trainer_cfg.autocast},
        "extra": {"train_dead_latents_at_end": int(trainer.dead_neurons.sum()),
                  "auxk_could_run": trainer.n_training_steps > trainer_cfg.dead_feature_window,
                  "b_dec_norm": float(sae.b_dec.norm())},
    }


class RowLookupModel(nn.Module):
    """A stand-in "language model" for sparsify's Trainer: token id ``i`` -> row ``i`` of the
    activation array (an ``nn.Embedding`` sharing the array's memory). sparsify hooks the
    ``embed`` module, so its training loop receives exactly these rows."""

    def __init__(self, rows: Tensor):
        super().__init__()
        self.embed = nn.Embedding.from_pretrained(rows, freeze=True)

    @property
    def base_model(self) -> nn.Module:  # what sparsify resolves hook points against
        return self

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dummy_inputs(self) -> dict[str, Tensor]:  # used by sparsify to find the input width
        return {"input_ids": torch.zeros(1, 2, dtype=torch.long)}

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.embed(input_ids)


class TokenRows(torch.utils.data.Dataset):
    """Sequences of row indices in the shape of a tokenized dataset (``{"input_ids": ...}``)."""

    def __init__(self, ids: Tensor):
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"input_ids": self.ids[i]}


def run_sparsify(args, data: Data) -> dict:
    from sparsify import SaeConfig, TrainConfig, Trainer

    # the row indices of the very batches the other contenders train on, in their order
    n_steps = math.ceil(args.tokens / args.batch_size)
    index_rows = torch.arange(len(data.train), dtype=torch.float64)[:, None]
    order = torch.empty(n_steps * args.batch_size, dtype=torch.long)
    stream = iter(batch_source(index_rows, args.batch_size, args.seed, dtype=torch.float64))
    for i in range(n_steps):
        order[i * args.batch_size : (i + 1) * args.batch_size] = next(stream)[HOOK][:, 0].long()
    ctx = 256 if args.batch_size % 256 == 0 else args.batch_size  # tokens per "sequence"
    dataset = TokenRows(order.view(-1, ctx))
    model = RowLookupModel(data.train)
    tmp = tempfile.TemporaryDirectory(prefix="bench-sparsify-")
    base = (rss_now_mib(), rss_peak_mib())
    t0 = time.perf_counter()
    cfg = TrainConfig(SaeConfig(k=args.k, num_latents=args.d_sae),
                      batch_size=args.batch_size // ctx, hookpoints=["embed"],
                      log_to_wandb=False, save_dir=tmp.name)
    trainer = Trainer(cfg, dataset, model)
    trainer.save = lambda: None  # no checkpoint writing inside the timed loop
    setup_s = time.perf_counter() - t0
    loop_s, _ = timed(trainer.fit)
    peak = rss_peak_mib()
    tmp.cleanup()
    sae = trainer.saes["embed"]
    opt = trainer.optimizers[0]

    def reconstruct(xb):
        top_acts, top_indices, _ = sae.encode(xb)
        z = torch.zeros(len(xb), sae.num_latents).scatter_(1, top_indices, top_acts.float())
        return sae.decode(top_acts, top_indices), z

    m_train_weights = heldout_metrics(reconstruct, data.heldout, args.d_sae)
    schedule_free = hasattr(opt, "eval") and hasattr(opt, "train_mode")
    if schedule_free:
        opt.eval()  # the averaged iterate x: what sparsify's checkpoints hold
    m = heldout_metrics(reconstruct, data.heldout, args.d_sae)
    base_opt = getattr(opt, "base", opt)
    opt_name = type(base_opt).__name__
    if schedule_free:
        opt_name = f"ScheduleFreeWrapper({opt_name}, momentum={opt.momentum})"
    dec_norms = sae.W_dec.detach().norm(dim=1)
    return {
        "steps": trainer.global_step, "tokens": trainer.global_step * args.batch_size,
        "loop_s": loop_s, "setup_s": setup_s,
        "baseline_rss_mib": base[0], "baseline_peak_rss_mib": base[1], "peak_rss_mib": peak,
        **m,
        "optimizer": (f"{opt_name} (--optimizer {cfg.optimizer}), lr "
                      f"{opt.param_groups[0]['lr']:.3g} constant"),
        "settings": {"optimizer": cfg.optimizer, "auxk_alpha": cfg.auxk_alpha,
                     "dead_feature_threshold_tokens": cfg.dead_feature_threshold,
                     "normalize_decoder": cfg.sae.normalize_decoder,
                     "b_dec_init": "first-batch mean", "input_normalisation": "none",
                     "loss_fn": cfg.loss_fn, "sequence_length": ctx,
                     "batch_size_sequences": cfg.batch_size},
        "extra": {"fvu_train_mode_weights": m_train_weights["fvu"],
                  "dead_fraction_train_mode_weights": m_train_weights["dead_fraction"],
                  "decoder_norm_min_max_eval_weights": [float(dec_norms.min()),
                                                        float(dec_norms.max())]},
    }


def child_main(args) -> None:
    torch.set_num_threads(args.threads)
    name = args.child
    if name == "saelens":  # import the library before the baseline memory is taken
        import sae_lens  # noqa: F401
    elif name == "sparsify":
        import sparsify  # noqa: F401
    import sae.train  # noqa: F401

    load_s, data = timed(lambda: load_activations(Path(args.activations), args.holdout,
                                                  args.massive_factor or None))
    if name.startswith("ours-"):
        out = run_ours(args, data, "float32" if name == "ours-fp32" else "bfloat16")
    elif name == "saelens":
        out = run_saelens(args, data)
    elif name == "sparsify":
        out = run_sparsify(args, data)
    else:
        raise ValueError(f"unknown contender {name!r}")
    out.update(contender=name, library=LIBRARY[name], load_s=load_s, data=data.info,
               torch_threads=torch.get_num_threads())
    Path(args.child_out).write_text(json.dumps(out, indent=1, default=str))


# --------------------------------------------------------------------------------------------
# Parent: run the contenders, compare, write results
# --------------------------------------------------------------------------------------------


@dataclass
class Row:
    contender: str
    library: str
    runs: list = field(default_factory=list)  # one dict per child run
    error: str | None = None

    def median(self, key: str):
        vals = [r[key] for r in self.runs if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    @property
    def tokens_per_s(self):
        return self.median("tokens_per_s")

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.runs)


def run_child(name: str, args, activations: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-sae-train-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name,
               "--child-out", str(out), "--activations", str(activations),
               "--tokens", str(args.tokens), "--d-sae", str(args.d_sae), "--k", str(args.k),
               "--batch-size", str(args.batch_size), "--holdout", str(args.holdout),
               "--massive-factor", str(args.massive_factor), "--seed", str(args.seed),
               "--threads", str(args.threads)]
        # SPARSIFY_DISABLE_TRITON: sparsify's own switch to its eager (embedding_bag) path; without
        # it, an installed triton makes sparsify try GPU kernels on a CPU machine and fail.
        env = dict(os.environ, TQDM_DISABLE="1", WANDB_MODE="disabled",
                   SPARSIFY_DISABLE_TRITON="1",
                   **{v: str(args.threads) for v in THREAD_ENV_VARS})
        proc = subprocess.run(cmd, env=env, capture_output=not args.verbose, text=True,
                              cwd=HERE.parent)
        if proc.returncode != 0 or not out.exists():
            tail = "\n".join(((proc.stdout or "") + (proc.stderr or "")).splitlines()[-25:])
            raise RuntimeError(f"child {name} exited with {proc.returncode}:\n{tail}")
        res = json.loads(out.read_text())
    res["tokens_per_s"] = res["tokens"] / res["loop_s"]
    res["train_mem_mib"] = res["peak_rss_mib"] - res["baseline_rss_mib"]
    return res


def fmt(v, spec: str, missing: str = "") -> str:
    return missing if v is None else format(v, spec)


HEADERS = ["contender", "library", "steps", "tokens", "loop [s]", "tokens/s", "x SAELens",
           "x sparsify", "FVU", "L0", "dead %", "peak RSS [MiB]", "baseline [MiB]",
           "train mem [MiB]"]


def table_rows(rows: list[Row]) -> list[list[str]]:
    by = {r.contender: r for r in rows if r.ok}
    out = []
    for r in rows:
        if not r.ok:
            out.append([r.contender, r.library, "FAILED", *[""] * (len(HEADERS) - 4),
                        (r.error or "")[:60]])
            continue
        ratios = []
        for peer in PEERS:
            p = by.get(peer)
            ratios.append("" if p is None else f"{r.tokens_per_s / p.tokens_per_s:.2f}x")
        out.append([
            r.contender, r.library, str(r.runs[0]["steps"]), str(r.runs[0]["tokens"]),
            fmt(r.median("loop_s"), ".1f"), fmt(r.tokens_per_s, ",.0f"), *ratios,
            fmt(r.median("fvu"), ".4f"), fmt(r.median("l0"), ".1f"),
            fmt(100 * r.median("dead_fraction"), ".1f"), fmt(r.median("peak_rss_mib"), ",.0f"),
            fmt(r.median("baseline_rss_mib"), ",.0f"), fmt(r.median("train_mem_mib"), ",.0f"),
        ])
    return out


LEGEND = (
    "tokens/s: tokens trained / wall time of the library's training call (median over runs).\n"
    "x SAELens / x sparsify: this row's tokens/s divided by that peer's (> 1: faster).\n"
    "FVU, L0, dead %: on the raw held-out rows, one shared function for all (FVU mean-centred;\n"
    "dead = never fires on the held-out rows). peak RSS: ru_maxrss of the contender's process\n"
    "right after training; baseline: RSS after imports and data loading; train mem = peak -\n"
    "baseline (SAE, optimizer state, activations and temporaries of the training)."
)


def check_targets(rows: list[Row]) -> list[dict]:
    peers = [r for r in rows if r.contender in PEERS and r.ok]
    checks = []
    for r in rows:
        if r.library != "sparsecode" or not r.ok:
            continue
        if not peers:
            checks.append({"contender": r.contender, "met": None, "text": "no peer measured"})
            continue
        fastest = max(peers, key=lambda p: p.tokens_per_s)
        best = min(peers, key=lambda p: p.median("fvu"))
        speedup = r.tokens_per_s / fastest.tokens_per_s
        fvu_rel = r.median("fvu") / best.median("fvu") - 1.0
        need = TARGETS["speedup_vs_faster_peer"]
        met = speedup >= need and fvu_rel <= TARGETS["fvu_rel_tolerance"]
        if len(peers) < len(PEERS):
            met = None  # cannot check against both peers
        checks.append({
            "contender": r.contender, "speedup_vs_faster_peer": speedup,
            "faster_peer": fastest.contender, "fvu_rel_vs_better_peer": fvu_rel,
            "better_fvu_peer": best.contender, "met": met,
            "text": (f"{speedup:.2f}x {fastest.contender} tokens/s (need >= {need:g}x), "
                     f"FVU {r.median('fvu'):.4f} vs {best.contender} {best.median('fvu'):.4f} "
                     f"({100 * fvu_rel:+.1f}%, need <= 0)"),
        })
    return checks


def target_lines(checks: list[dict]) -> list[str]:
    return [f"[{ {True: 'MET', False: 'NOT MET', None: 'n/a'}[c['met']]:^7}] "
            f"{c['contender']:<10} {c['text']}" for c in checks]


def make_notes(rows: list[Row], meta: dict) -> list[str]:
    notes = []
    d = meta["data"]
    if meta["synthetic"]:
        notes.append(f"Synthetic activations ({d['rows']} x {d['d_in']}; planted sparse features "
                     "on a mean offset of norm 100): a development run, not the real benchmark.")
    if d.get("massive_factor"):
        filt = (f"the massive-row filter at {d['massive_factor']:g}x the median norm "
                f"{d['median_norm']:.4g} dropped {d['dropped_train_rows']} training and "
                f"{d['dropped_heldout_rows']} held-out rows")
    else:
        filt = f"no massive-row filter; median norm {d['median_norm']:.4g}"
    notes.append(
        f"Data: {d['train_rows']} training rows and {d['heldout_rows_kept']} held-out rows "
        f"({filt}); mean row norm {d['train_mean_norm']:.4g}, norm of the mean "
        f"{d['train_norm_of_mean']:.4g}. Epochs over the training rows: "
        f"{meta['config']['tokens'] / max(d['train_rows'], 1):.2f}.")
    by = {r.contender: r for r in rows if r.ok}
    for name, r in by.items():
        notes.append(f"{name}: optimizer {r.runs[0]['optimizer']}; settings "
                     + ", ".join(f"{k}={v}" for k, v in r.runs[0]["settings"].items()) + ".")
    sl = by.get("saelens")
    if sl is not None:
        ex = sl.runs[0]["extra"]
        if not ex["auxk_could_run"]:
            notes.append(
                f"SAELens counts a latent dead only after dead_feature_window="
                f"{sl.runs[0]['settings']['dead_feature_window_steps']} steps without firing; "
                f"this run had {sl.runs[0]['steps']} steps, so its AuxK loss never ran.")
        notes.append(f"SAELens starts b_dec at zero and does not normalise inputs by default; "
                     f"its final b_dec has norm {ex['b_dec_norm']:.4g} against the data mean's "
                     f"{d['train_norm_of_mean']:.4g}.")
    sp = by.get("sparsify")
    if sp is not None:
        ex = sp.runs[0]["extra"]
        notes.append(
            f"sparsify: AuxK is off by default (auxk_alpha=0); its schedule-free optimizer "
            f"keeps two weight sets: held-out FVU with the averaged (eval) weights its "
            f"checkpoints hold is {sp.median('fvu'):.4f}, with the weights left in the model "
            f"after training {ex['fvu_train_mode_weights']:.4f}; decoder row norms of the "
            f"averaged weights lie in [{ex['decoder_norm_min_max_eval_weights'][0]:.3f}, "
            f"{ex['decoder_norm_min_max_eval_weights'][1]:.3f}]. Its fit() calls "
            "torch.set_float32_matmul_precision('high'), which changes nothing on CPU.")
    for name in ("ours-fp32", "ours-bf16"):
        r = by.get(name)
        if r is not None:
            own = r.runs[0]["extra"]["trainer_evaluate_fvu"]
            if own is not None and abs(own - r.median("fvu")) > 1e-3 * max(own, 1e-12):
                notes.append(f"{name}: Trainer.evaluate() FVU {own:.5f} differs from the shared "
                             f"function's {r.median('fvu'):.5f}.")
    load = meta["loadavg_1_5_15min"]
    if max(load["start"][0], load["end"][0] - meta["threads"]) > 1.0:
        notes.append(f"The machine was busy (1-min load average {load['start'][0]:.2f} at start, "
                     f"{load['end'][0]:.2f} at end, {meta['n_cpus']} cores): timings are noisy.")
    return notes


def write_markdown(path: Path, meta: dict, rows: list[Row], checks: list[dict],
                   notes: list[str]) -> None:
    v, c = meta["versions"], meta["config"]
    text = [
        f"# SAE training benchmark: {meta['device']}",
        "",
        f"- date: {meta['date']}; CPU: {meta['cpu']} ({meta['n_cpus']} cores); threads: "
        f"{meta['threads']}; load average (1 min) at start/end: "
        f"{meta['loadavg_1_5_15min']['start'][0]:.2f}/{meta['loadavg_1_5_15min']['end'][0]:.2f}",
        f"- versions: python {v['python']}, torch {v['torch']}, sae-lens {v['sae-lens']}, "
        f"eai-sparsify {v['eai-sparsify']}, sparsecode {v['sparsecode']} (git {meta['git']}, "
        f"source sha256 {meta['source_sha256']})",
        f"- data: `{meta['data']['path']}` ({meta['data']['rows']} x {meta['data']['d_in']}), "
        f"last {c['holdout']} rows held out; TopK SAE, d_sae={c['d_sae']}, k={c['k']}, "
        f"batch {c['batch_size']}, {c['tokens']} tokens asked (whole batches: "
        f"{math.ceil(c['tokens'] / c['batch_size'])} steps)",
        f"- runs per contender: {c['repeats']} (medians), each in its own process",
        f"- command: `{meta['command']}`",
        "",
        format_table(HEADERS, table_rows(rows), markdown=True),
        "",
        "\n".join("> " + line for line in LEGEND.splitlines()),
        "",
        "## Targets",
        "",
        "Ours >= 1.5x the faster peer's tokens/s with a held-out FVU no worse than the better "
        "peer's.",
        "",
        *(f"- `{line}`" for line in target_lines(checks)),
        "",
        "## Notes",
        "",
        *(f"- {n}" for n in notes),
        "",
    ]
    path.write_text("\n".join(text))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--activations", type=Path, default=None,
                   help="(N, d_in) float .npy array of activations (default: synthetic data)")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke test: {QUICK['tokens']:,} tokens, {QUICK['d_sae']} latents, "
                        f"{QUICK['holdout']} held-out rows (unless given explicitly)")
    p.add_argument("--tokens", type=int, default=None, help=f"training tokens ({TOKENS:,})")
    p.add_argument("--d-sae", type=int, default=None, help=f"latents ({D_SAE})")
    p.add_argument("--k", type=int, default=K, help=f"active latents per token ({K})")
    p.add_argument("--batch-size", type=int, default=BATCH, help=f"tokens per step ({BATCH})")
    p.add_argument("--holdout", type=int, default=None,
                   help=f"last rows held out, never trained on ({HOLDOUT})")
    p.add_argument("--massive-factor", type=float, default=MASSIVE_FACTOR,
                   help="drop rows above this x the median training-row norm (0: keep all)")
    p.add_argument("--synthetic-rows", type=int, default=None,
                   help=f"rows of the synthetic array when no --activations "
                        f"({SYNTHETIC_ROWS:,}; quick {QUICK['synthetic_rows']:,})")
    p.add_argument("--threads", type=int, default=2, help="torch/BLAS threads per contender (2)")
    p.add_argument("--repeats", type=int, default=1, help="runs per contender (1)")
    p.add_argument("--only", default=",".join(CONTENDERS),
                   help=f"comma-separated contenders out of {', '.join(CONTENDERS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", action="store_true", help="show the contenders' own output")
    p.add_argument("--out", type=Path, default=HERE / "results",
                   help="folder for the JSON and Markdown results (benchmarks/results)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.tokens = args.tokens or (QUICK["tokens"] if args.quick else TOKENS)
    args.d_sae = args.d_sae or (QUICK["d_sae"] if args.quick else D_SAE)
    args.holdout = args.holdout or (QUICK["holdout"] if args.quick else HOLDOUT)
    args.synthetic_rows = args.synthetic_rows or (
        QUICK["synthetic_rows"] if args.quick else SYNTHETIC_ROWS)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        child_main(args)
        return
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(names) - set(CONTENDERS))
    if unknown:
        raise SystemExit(f"unknown contenders {unknown}; choose from {CONTENDERS}")

    load_start = os.getloadavg()
    tmpdir = tempfile.TemporaryDirectory(prefix="bench-sae-train-data-")
    synthetic = args.activations is None
    if synthetic:
        activations = Path(tmpdir.name) / "synthetic.npy"
        np.save(activations, synthetic_activations(args.synthetic_rows, SYNTHETIC_D_IN,
                                                   args.seed))
        print(f"no --activations: using a synthetic {args.synthetic_rows} x {SYNTHETIC_D_IN} "
              "array (development only)")
    else:
        activations = args.activations.resolve()
        if not activations.exists():
            raise SystemExit(f"activation file not found: {activations}")

    print(f"SAE training benchmark: {activations.name}, "
          f"TopK d_sae={args.d_sae} k={args.k}, batch {args.batch_size}, {args.tokens:,} "
          f"tokens, {args.threads} threads, {device_tag(args.threads)}, load average "
          f"{load_start[0]:.2f}", flush=True)
    rows = {n: Row(n, LIBRARY[n]) for n in names}
    for rep in range(args.repeats):  # interleaved, so slow drifts hit everyone alike
        for name in names:
            row = rows[name]
            if row.error:
                continue
            try:
                res = run_child(name, args, activations)
            except Exception as exc:  # one broken contender must not lose the others
                row.error = f"{type(exc).__name__}: {exc}"
                print(f"  !! {name} failed: {row.error}", flush=True)
                continue
            row.runs.append(res)
            print(f"  {name:<10} run {rep + 1}: {res['tokens']:,} tokens in "
                  f"{res['loop_s']:.1f} s = {res['tokens_per_s']:,.0f} tokens/s, held-out FVU "
                  f"{res['fvu']:.4f}, L0 {res['l0']:.1f}, dead {100 * res['dead_fraction']:.1f}%,"
                  f" peak RSS {res['peak_rss_mib']:,.0f} MiB (baseline "
                  f"{res['baseline_rss_mib']:,.0f})", flush=True)
    tmpdir.cleanup()
    rows_list = list(rows.values())
    load_end = os.getloadavg()
    done = [r for r in rows_list if r.ok]
    data_info = done[0].runs[0]["data"] if done else {"path": str(activations)}

    versions = package_versions("torch", "numpy", "sae-lens", "eai-sparsify", "schedulefree",
                                "transformers", "sparsecode")
    device = (device_tag(args.threads) + ("-quick" if args.quick else "")
              + ("-synthetic" if synthetic else ""))
    meta = {
        "date": now_iso(), "device": device, "cpu": cpu_name(), "threads": args.threads,
        "n_cpus": os.cpu_count(), "loadavg_1_5_15min": {"start": load_start, "end": load_end},
        "versions": versions, "git": git_commit(HERE.parent),
        "source_sha256": "/".join(tree_digest(HERE.parent / pkg) for pkg in ("sparsecode", "sae")),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "synthetic": synthetic, "data": data_info,
        "config": {"tokens": args.tokens, "d_sae": args.d_sae, "k": args.k,
                   "batch_size": args.batch_size, "holdout": args.holdout,
                   "massive_factor": args.massive_factor, "seed": args.seed,
                   "repeats": args.repeats, "contenders": names, "targets": TARGETS},
    }
    checks = check_targets(rows_list)
    notes = make_notes(rows_list, meta)

    print()
    print(format_table(HEADERS, table_rows(rows_list)))
    print()
    print(LEGEND)
    print()
    print("Targets (ours >= 1.5x the faster peer's tokens/s, held-out FVU <= the better peer's)")
    for line in target_lines(checks) or ["(nothing to check: ours not measured)"]:
        print("  " + line)
    if notes:
        print("\nNotes:")
        for note in notes:
            print("  - " + note)

    results = [{"contender": r.contender, "library": r.library, "error": r.error,
                "median": {k: r.median(k) for k in ("tokens_per_s", "loop_s", "fvu", "l0",
                                                   "dead_fraction", "peak_rss_mib",
                                                   "baseline_rss_mib", "train_mem_mib")},
                "runs": r.runs} for r in rows_list]
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / f"sae-train-{device}.json"
    md_path = args.out / f"sae-train-{device}.md"
    write_json(json_path, {**meta, "results": results, "targets": checks, "notes": notes})
    write_markdown(md_path, meta, rows_list, checks, notes)
    print(f"\nwrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
