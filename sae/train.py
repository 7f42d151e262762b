"""Training one or several SAEs side by side from one stream of activation batches.

The recipe is what the field converged on (see docs/sae.md): Adam with a linear LR warm-up and
a linear decay to zero over the last part of the run, gradient-norm clipping, decoder rows kept
at unit norm with the parallel gradient component removed (decoder-norm-weighted L1 for ``relu``),
``b_dec`` initialised at the geometric median of the first batch, inputs scaled so that
``E||x|| = sqrt(d_in)`` (the scale is folded into the weights at save), dead-latent tracking in
tokens, periodic held-out evaluation and checkpoints with exact resume: a run interrupted and
resumed gives bit-for-bit the same weights as an uninterrupted one.

Example
-------
>>> import torch
>>> from sae.data import ArrayActivations
>>> from sae.models import SAE, SAEConfig
>>> from sae.train import TrainConfig, Trainer
>>> X = torch.randn(4096, 16)
>>> sae = SAE(SAEConfig(d_in=16, d_sae=64, k=4))
>>> trainer = Trainer({"topk": sae}, ArrayActivations(X, batch_size=512),
...                   TrainConfig(total_tokens=4096, progress=False))
>>> history = trainer.fit()
>>> trainer.step
8
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from . import checkpoint, metrics, wiring
from .config import TrainConfig
from .data import ActivationSource
from .initialise import geometric_median, initialise
from .learners import LEARNERS
from .models import SAE
from .optim import default_warmup, schedule

if TYPE_CHECKING:
    from .distributed import Dist

__all__ = ["TrainConfig", "Trainer", "TrainingDiverged", "geometric_median",
           "resolve_matmul_dtype"]


class TrainingDiverged(RuntimeError):
    """A training step gave a non-finite loss or weights, or an exploding FVU."""

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_matmul_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 where the hardware multiplies it natively (CUDA, AMX / AVX512-BF16
    CPUs), float32 elsewhere; any other name is that dtype."""
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cuda" or (device.type == "cpu" and _cpu_has_bf16()):
        return torch.bfloat16
    return torch.float32


@contextlib.contextmanager
def _stop_on_signals(handler) -> Iterator[None]:
    """SIGINT and SIGTERM call ``handler`` while training (main thread only), then the old
    handlers come back: the one place the toolkit installs signal handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


class Trainer:
    """Train ``saes`` (a dict name -> SAE) from ``source`` batches.

    Each SAE reads the batch entries of its places (:mod:`sae.wiring`: its
    ``cfg.metadata["hook_name"]``, default the source's first hook point; a transcoder writes
    ``hook_name_out``, a crosscoder reads and writes ``hook_names``), has its own Adam
    optimizer, per-place scales and statistics, and sees exactly the same batches as the
    others. ``out_dir`` receives checkpoints
    (``out_dir/checkpoint``) and, from :meth:`save`, one SAELens folder per SAE.

    With ``dist`` (from :func:`sae.distributed.init`, under ``torchrun``) the trainer runs on
    every process: ``source`` yields this data rank's share of each global batch (e.g. a
    :class:`sae.distributed.RankSlice`), gradients are averaged by DDP, TopK SAEs are
    latent-sharded when the mesh has latent shards, and rank 0 alone writes files and logs.
    :meth:`checkpoint`, :meth:`evaluate`, :meth:`save` and :meth:`full_saes` are collective:
    call them on every rank.
    """

    def __init__(
        self,
        saes: dict[str, SAE],
        source: ActivationSource,
        cfg: TrainConfig | None = None,
        *,
        out_dir: str | Path | None = None,
        heldout: dict[str, Tensor] | Tensor | None = None,
        dist: Dist | None = None,
    ):
        if not saes:
            raise ValueError("no SAEs to train")
        self.dist = dist
        self.cfg = cfg or TrainConfig()
        if dist is not None:
            from .distributed import check_consistent

            online = [n for n, sae in saes.items() if sae.arch.learner != "gradient"]
            if online:
                raise ValueError(f"{online}: online dictionary learning runs on one process")
            check_consistent("training configuration", {
                "train": asdict(self.cfg),
                "saes": {name: sae.cfg.to_dict() for name, sae in saes.items()},
                "mesh": [dist.data_size, dist.latent_size],
            })
        self.saes = dict(saes) if dist is None else self._distribute(saes, dist)
        self.source = source
        self.out_dir = Path(out_dir) if out_dir is not None else None
        default = source.hookpoints[0]
        self.reads = {name: wiring.reads(sae.cfg, default) for name, sae in self.saes.items()}
        self.writes = {name: wiring.writes(sae.cfg, default) for name, sae in self.saes.items()}
        for name in self.saes:
            for hp in dict.fromkeys(self.reads[name] + self.writes[name]):
                if hp not in source.hookpoints:
                    raise ValueError(f"SAE {name!r} wants hook point {hp!r}, the source has "
                                     f"{source.hookpoints}")
        if isinstance(heldout, Tensor):
            heldout = {source.hookpoints[0]: heldout}
        self.heldout = heldout or {}
        self.device = next(iter(self.saes.values())).W_dec.device
        self.batch_size = getattr(source, "batch_size", None)
        self.n_steps: int | None = None
        self.step = 0
        self.tokens = 0
        #: Per SAE, the factor of each place read and written (:data:`sae.wiring.Scales`).
        self.scales: dict[str, wiring.Scales] = {}
        self.generator = torch.Generator().manual_seed(self.cfg.seed)
        self.history: list[dict[str, Any]] = []
        self.matmul_dtype = resolve_matmul_dtype(self.cfg.matmul_dtype, self.device)
        self.learners = {name: LEARNERS[sae.arch.learner](sae, self.cfg.lr, self.cfg.betas)
                         for name, sae in self.saes.items()}
        #: The optimisers of the gradient-trained SAEs (what checkpoints hold besides weights).
        self.optimizers = {name: lr.optimizer for name, lr in self.learners.items()
                           if lr.optimizer is not None}
        self._data_size = dist.data_size if dist is not None else 1
        self._forward = {name: sae.training_forward for name, sae in self.saes.items()}
        if dist is not None and dist.data_size > 1:
            from .distributed import data_parallel

            for name, sae in self.saes.items():
                self._forward[name] = data_parallel(sae, dist)
        self._wandb = None
        self._source_state: dict | None = None  # source position after the last finished step
        self._stop_requested = False
        self._first_fvu: dict[str, float] = {}  # per SAE, the training FVU of the first step

    # ------------------------------------------------------------------ setup
    @property
    def is_main(self) -> bool:
        """True on the process that writes files and logs (rank 0, or the only process)."""
        return self.dist is None or self.dist.is_main

    @staticmethod
    def _distribute(saes: dict[str, SAE], d: Dist) -> dict[str, SAE]:
        """Same starting weights on every rank (rank 0's), then latent shards if asked."""
        import torch.distributed as torch_dist

        from .distributed import LatentShards

        out = {}
        for name, sae in saes.items():
            with torch.no_grad():
                for t in sae.state_dict().values():
                    torch_dist.broadcast(t, src=0)
            if d.latent_size > 1:
                sae = LatentShards(d.latent_group, sae.cfg.d_sae, d.device).shard(sae)
            out[name] = sae
        return out

    def _initialise(self, batch: dict[str, Tensor]) -> None:
        """Per-place scales, b_dec and the dead window from the first batch (not on
        resume)."""
        if self._data_size > 1:  # the whole first global batch, identical on every rank
            from .distributed import all_gather_rows

            batch = {hp: all_gather_rows(t.to(self.device, torch.float32), self.dist.data_group)
                     for hp, t in batch.items()}
        for hp, t in batch.items():
            if t.shape[0] > 1 and not bool((t.float() != t[:1].float()).any()):
                raise ValueError(f"the activations at {hp!r} do not vary (every row of the first "
                                 "batch is the same, e.g. all zero): there is nothing to learn")
        for name, sae in self.saes.items():
            self.scales[name] = wiring.fit_scales(batch, self.reads[name], self.writes[name],
                                                  self.cfg.normalize_input)
            places = self.reads[name] + self.writes[name]
            factors = self.scales[name]["in"] + self.scales[name]["out"]
            for hp, f in zip(places, factors, strict=True):
                if not (math.isfinite(f) and f > 0):
                    big = float(batch[hp].abs().max())
                    raise ValueError(f"the activations at {hp!r} are too large for float32 "
                                     f"arithmetic (values up to {big:.3g}: row norms overflow); "
                                     "rescale them")
            x, y = self.inputs(name, batch)
            initialise(sae, x if y is None else y, x, b_dec_init=self.cfg.b_dec_init,
                       total_tokens=self.cfg.total_tokens)

    def inputs(self, name: str, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        """SAE ``name``'s scaled input and target of a batch (target None: the input)."""
        scales = self.scales[name]
        x = wiring.stack(batch, self.reads[name], scales["in"], self.device)
        if self.writes[name] == self.reads[name] and scales["out"] == scales["in"]:
            return x, None
        return x, wiring.stack(batch, self.writes[name], scales["out"], self.device)

    # ------------------------------------------------------------------ loop
    def _batches(self) -> Iterator[dict[str, Tensor]]:
        while True:
            got = False
            for batch in self.source:
                got = True
                yield batch
            if not got:
                raise ValueError("the activation source yielded no batches")
            # sources with a fixed number of epochs end; keep going only if tokens remain
            if self.tokens >= self.cfg.total_tokens:
                return
            raise ValueError(
                f"the activation source ran out after {self.tokens} tokens; "
                f"total_tokens={self.cfg.total_tokens} (use more epochs or fewer tokens)"
            )

    def request_stop(self, *_: Any) -> None:
        """Stop at the next step boundary: the SIGINT / SIGTERM handler while :meth:`fit`
        runs. The loop finishes the current step, writes a checkpoint (if ``out_dir`` is set)
        and raises ``KeyboardInterrupt``; further requests change nothing, so a second signal
        never interrupts a step or a checkpoint write."""
        self._stop_requested = True

    def fit(self) -> list[dict[str, Any]]:
        """Train until ``total_tokens``. Ctrl-C (SIGINT) or SIGTERM finishes the current step,
        writes a checkpoint (if ``out_dir`` is set) and raises ``KeyboardInterrupt``. A step
        whose loss or weights are not finite, or whose training FVU explodes
        (``cfg.divergence_factor``), raises :class:`TrainingDiverged` and leaves the last
        checkpoint as it was. Returns the history."""
        from tqdm.auto import tqdm

        for sae in self.saes.values():
            sae.train()
        self._start_wandb()
        bar = tqdm(total=self.cfg.total_tokens, initial=self.tokens, unit="tok", unit_scale=True,
                   disable=not (self.cfg.progress and self.is_main), desc="sae train")
        if self._source_state is None:
            self._source_state = self.source.state_dict()
        try:
            with _stop_on_signals(self.request_stop):
                self._loop(bar)
        finally:
            bar.close()
            self._stop_requested = False
        return self.history

    def _loop(self, bar: Any) -> None:
        cfg = self.cfg
        t0, tok0 = time.perf_counter(), self.tokens
        for batch in self._batches():
            if self.tokens >= cfg.total_tokens:
                break
            if not self.scales:
                self._initialise(batch)
            n = next(iter(batch.values())).shape[0] * self._data_size
            if self.n_steps is None:
                self.n_steps = max(1, math.ceil(cfg.total_tokens / n))
            row = self._train_step(batch)
            self._check_diverged(row)
            self.step += 1
            self.tokens += n
            bar.update(n)
            row["tokens_per_s"] = (self.tokens - tok0) / max(time.perf_counter() - t0, 1e-9)
            if self.step % cfg.log_every == 0 or self.tokens >= cfg.total_tokens:
                self.history.append(row)
                self._log(row)
                bar.set_postfix(self._postfix(row))
            if cfg.eval_every and self.step % cfg.eval_every == 0:
                self._log(self.evaluate())
            self._source_state = self.source.state_dict()
            stop = self._stop_agreed()  # a step boundary: the state is whole
            if self.out_dir is not None and (stop or (
                    cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0)):
                self.checkpoint()
            if stop:
                raise KeyboardInterrupt

    def _check_diverged(self, row: dict[str, Any]) -> None:
        """Raise :class:`TrainingDiverged` when a step's loss or FVU is not finite, the FVU
        exceeds ``cfg.divergence_factor`` times max(1, the first step's) or a weight is no
        longer finite (the step is not counted and nothing is checkpointed)."""
        factor = self.cfg.divergence_factor
        for name, sae in self.saes.items():
            loss, fvu = row[f"{name}/loss"], row[f"{name}/fvu"]
            limit = factor * max(1.0, self._first_fvu.setdefault(name, fvu))
            bad = None
            if not (math.isfinite(loss) and math.isfinite(fvu)):
                bad = f"loss={loss:.4g}, fvu={fvu:.4g}"
            elif factor and fvu > limit:
                bad = (f"fvu={fvu:.4g}, more than {factor:g} x max(1, the first step's "
                       f"{self._first_fvu[name]:.4g}) (--divergence-factor)")
            else:
                params = [n for n, p in sae.named_parameters()
                          if not bool(torch.isfinite(p.detach().sum()))
                          and not bool(torch.isfinite(p.detach()).all())]
                if params:
                    bad = f"non-finite {', '.join(params)} after the update"
            if bad is not None:
                ckpt = (f"; the last checkpoint in {self.out_dir / 'checkpoint'} is kept"
                        if self.out_dir is not None else "")
                raise TrainingDiverged(
                    f"training diverged at step {self.step + 1} ({self.tokens} tokens): SAE "
                    f"{name!r} has {bad} (a learning rate too high for these activations? try "
                    f"a lower --lr){ckpt}")

    def _stop_agreed(self) -> bool:
        """A stop requested on any rank stops all of them after the same step."""
        if self.dist is None:
            return self._stop_requested
        import torch.distributed as torch_dist

        flag = torch.tensor([int(self._stop_requested)], device=self.dist.device)
        torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MAX)
        self._stop_requested = bool(flag.item())
        return self._stop_requested

    def _train_step(self, batch: dict[str, Tensor]) -> dict[str, Any]:
        cfg = self.cfg
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else default_warmup(self.n_steps)
        mult = schedule(self.step, self.n_steps, warmup, cfg.decay_fraction)
        row: dict[str, Any] = {
            "step": self.step + 1,
            "tokens": self.tokens + len(next(iter(batch.values()))) * self._data_size,
        }
        matmul_dtype = None if self.matmul_dtype == torch.float32 else self.matmul_dtype
        for name, sae in self.saes.items():
            x, y = self.inputs(name, batch)
            warm = sae.cfg.sparsity_warmup_tokens
            sparsity_scale = min(1.0, (self.tokens + 1) / warm) if warm else 1.0
            kwargs = {} if y is None else {"y": y}
            out = self.learners[name].step(
                self._forward[name], x, mult, cfg.grad_clip, sparsity_scale=sparsity_scale,
                matmul_dtype=matmul_dtype, generator=self.generator, **kwargs)
            with torch.no_grad():
                row[f"{name}/loss"] = float(out.loss.detach())
                row[f"{name}/fvu"] = metrics.fvu(x if y is None else y, out.x_hat.detach())
                row[f"{name}/l0"] = out.l0
                row[f"{name}/dead_fraction"] = float(sae.dead_mask().float().mean())
                for term, v in out.terms.items():
                    row[f"{name}/{term}"] = v
        row["lr_multiplier"] = mult
        return row

    def _postfix(self, row: dict[str, Any]) -> dict[str, str]:
        name = next(iter(self.saes))
        return {
            "tok/s": f"{row['tokens_per_s']:.0f}",
            "fvu": f"{row[f'{name}/fvu']:.3f}",
            "l0": f"{row[f'{name}/l0']:.1f}",
            "dead": f"{100 * row[f'{name}/dead_fraction']:.1f}%",
        }

    # ------------------------------------------------------------------ evaluation
    def full_saes(self) -> dict[str, SAE]:
        """The whole SAEs (latent shards gathered; collective)."""
        return {name: sae.collective.gather(sae) for name, sae in self.saes.items()}

    def evaluate(self) -> dict[str, Any]:
        """Held-out metrics for every SAE (inference behaviour), on scaled activations.
        Distributed: collective; the metrics are computed on rank 0 (empty dict elsewhere)."""
        out: dict[str, Any] = {"step": self.step, "tokens": self.tokens}
        saes = self.full_saes()
        if not self.is_main:
            return {}
        for name, sae in saes.items():
            places = dict.fromkeys(self.reads[name] + self.writes[name])
            if name not in self.scales or any(p not in self.heldout for p in places):
                continue
            x, y = self.inputs(name, self.heldout)
            for key, v in metrics.evaluate(sae, x, y=y).items():
                out[f"{name}/heldout/{key}"] = v
        return out

    # ------------------------------------------------------------------ logging
    def _start_wandb(self) -> None:
        if not self.cfg.wandb or self._wandb is not None or not self.is_main:
            return
        try:
            import wandb
        except ImportError as e:
            raise ImportError("--wandb needs the wandb package: pip install wandb") from e
        config = {"train": asdict(self.cfg)}
        config.update({name: sae.cfg.to_dict() for name, sae in self.saes.items()})
        self._wandb = wandb.init(project=self.cfg.wandb_project, config=config,
                                 dir=str(self.out_dir) if self.out_dir else None, reinit=True)

    def _log(self, row: dict[str, Any]) -> None:
        if self._wandb is not None:
            self._wandb.log(row, step=row.get("step", self.step))

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    # ------------------------------------------------------------------ checkpoints
    def source_state(self) -> dict:
        """The activation stream's position after the last finished step."""
        return self._source_state if self._source_state is not None else self.source.state_dict()

    def restore_source(self, state: dict) -> None:
        """Put the activation stream back at ``state`` (from :meth:`source_state`)."""
        self.source.load_state_dict(state)
        self._source_state = state

    def checkpoint(self, path: str | Path | None = None) -> Path:
        """Write the resumable state atomically to ``path`` (default ``out_dir/checkpoint``;
        :mod:`sae.checkpoint`). Distributed: collective, rank 0 writes."""
        path = Path(path) if path is not None else self._checkpoint_path("write the checkpoint")
        tensors, meta = checkpoint.capture(self)
        if self.is_main:
            checkpoint.write(path, tensors, meta)
        if self.dist is not None:
            self.dist.barrier()
        return path

    def resume(self, path: str | Path | None = None) -> None:
        """Load a checkpoint written by :meth:`checkpoint` (same SAEs, same source, same
        settings; checksum and finiteness verified). Without ``path``: ``out_dir/checkpoint``,
        recovered first from the leftovers of a write interrupted between its renames
        (:func:`sae.checkpoint.recover`)."""
        if path is None:
            root = self._checkpoint_path("resume from").parent
            if self.is_main:
                checkpoint.recover(root)
            if self.dist is not None:
                self.dist.barrier()
            path = root / checkpoint.CHECKPOINT
        checkpoint.restore(self, *checkpoint.read(Path(path)))

    def _checkpoint_path(self, what: str) -> Path:
        if self.out_dir is None:
            raise ValueError(f"no out_dir to {what}")
        return self.out_dir / "checkpoint"

    # ------------------------------------------------------------------ saving
    def save(self, out_dir: str | Path | None = None) -> dict[str, Path]:
        """Write each SAE as a SAELens folder (input scale folded in): ``out_dir/<name>``."""
        from .io import save_sae

        root = Path(out_dir) if out_dir is not None else self.out_dir
        if root is None:
            raise ValueError("no output directory given")
        paths = {}
        saes = self.full_saes()
        if not self.is_main:
            self.dist.barrier()
            return {name: root / name for name in saes}
        for name, sae in saes.items():
            meta = {"training_tokens": self.tokens}
            if not sae.cfg.metadata.get("hook_name") and sae.cfg.places is None:
                meta["hook_name"] = self.reads[name][0]
            scales = self.scales.get(name, {})
            paths[name] = save_sae(sae, root / name, input_scale=scales.get("in", 1.0),
                                   output_scale=scales.get("out"), metadata=meta)
        if self.dist is not None:
            self.dist.barrier()
        return paths
