"""The ``sae`` command: ``sae train | eval | cache | browse | plot`` (and ``sae prune`` /
``sae sparsify``, aliases of ``sparsecode prune`` / ``sparsecode sparsify``).

``sae train`` with no arguments trains a TopK SAE on a middle residual-stream layer of the
built-in SmolLM2-135M over the built-in text. ``--activations FILE.npy`` or ``--cache DIR``
train from stored activations instead. Every flag is generated from a configuration dataclass
(:mod:`sae.config`, :class:`sparsecode.lm.ModelConfig`): run ``sae train --help`` for all of them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from sparsecode._files import atomic_write, is_temporary
from sparsecode.cli import (
    UsageError,
    add_prune_parser,
    add_sparsify_parser,
    check_writable,
    command_parser,
    fail,
    run,
    split_list,
)
from sparsecode.flags import add_flags, values
from sparsecode.lm import ModelConfig, torch_device

from . import checkpoint, wiring
from .config import PlacesConfig, RunConfig, SAEConfig, TrainConfig
from .massive import MASSIVE_FACTOR
from .models import SAE

__all__ = ["UsageError", "build_parser", "checked_device", "main"]

#: The lock file of a run folder (held by the ``sae train`` writing it).
LOCK_FILE = ".lock"


def checked_device(name: str) -> torch.device:
    """The ``--device``, refused (a :func:`fail`) when torch does not know it or it holds no
    data (``meta``)."""
    try:
        device = torch_device(name)
    except (RuntimeError, ValueError) as e:
        raise fail(f"unknown --device {name!r}: {e}") from e
    if device.type == "meta":
        raise fail("--device meta holds no data; use cpu, cuda or auto")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise fail(f"--device {name}: no CUDA GPU is available; use cpu or auto")
    return device


# ---------------------------------------------------------------------------------------------
# sae train
# ---------------------------------------------------------------------------------------------


def _sae_configs(args: argparse.Namespace, shape: dict[str, Any]) -> dict[str, SAEConfig]:
    """One SAEConfig per (architecture, k) of the ``--arch`` / ``--k`` lists, of the shape
    (:func:`sae.wiring.shape_fields`: an SAE, a transcoder or a crosscoder)."""
    archs, ks = _sweep(args)
    d_sae = args.d_sae if args.d_sae is not None else args.expansion_factor * shape["d_in"]
    configs = {}
    for a in archs:
        for k in ks:
            name = a if len(ks) == 1 else f"{a}-k{k}"
            fields = values(SAEConfig, args, d_sae=d_sae, architecture=a, k=k,
                            **{**shape, "metadata": dict(shape["metadata"])})
            try:
                configs[name] = SAEConfig(**fields)
            except ValueError as e:
                raise fail(e) from e
    return configs


def _sweep(args: argparse.Namespace) -> tuple[list[str], list[int]]:
    """The ``--arch`` and ``--k`` lists, each value once."""
    archs = split_list(args.architecture)
    try:
        ks = split_list(args.k, int)
    except ValueError as e:
        raise fail(f"--k takes comma-separated integers, got {args.k!r}") from e
    for flag, items in (("--arch", archs), ("--k", ks)):
        if not items:
            raise fail(f"{flag} is empty")
        twice = sorted({str(v) for v in items if items.count(v) > 1})
        if twice:
            raise fail(f"{flag} lists {', '.join(twice)} more than once")
    return archs, ks


def _check_sae_settings(args: argparse.Namespace) -> None:
    """Every SAE setting checked before any data is read or model loaded (the widths are
    not known yet: a stand-in shape, so only the settings themselves are judged)."""
    archs, ks = _sweep(args)
    d_sae = args.d_sae if args.d_sae is not None else 2**30
    for a in archs:
        for k in ks:
            fields = values(SAEConfig, args, d_in=2 * max(*ks, 1), d_sae=d_sae, architecture=a,
                            k=k,
                            metadata={})
            if args.d_sae is None:
                fields["group_sizes"] = None
            try:
                SAEConfig(**fields)
            except ValueError as e:
                raise fail(e) from e


def _array_source(args, run: RunConfig, model: ModelConfig, places: PlacesConfig, configure):
    from .data import ArrayActivations

    if places != PlacesConfig():
        raise fail("--activations holds one activation per row; to train a transcoder or a "
                   "crosscoder from stored activations, write them with `sae cache` (with "
                   "--transcode / --crosscode) and train with --cache")
    path = Path(run.activations)
    if not path.exists():
        raise fail(f"activations file not found: {path}")
    n = ArrayActivations(path, batch_size=1).n_rows
    holdout = min(run.holdout, max(n // 10, 1))
    src = ArrayActivations(path, batch_size=run.batch_size, holdout=holdout, seed=model.seed,
                           epochs=None)
    configs = configure([src.hookpoints[0]], [src.hookpoints[0]], src.places)
    return src, src.heldout_batch(), {"source": str(path)}, configs


def _cache_source(args, run: RunConfig, model: ModelConfig, places: PlacesConfig, configure):
    from sparsecode.hooks import match, split_point

    from .cache import CachedActivations

    src = CachedActivations(run.cache, batch_size=run.batch_size, seed=model.seed, epochs=None,
                            holdout=run.holdout)
    modules = list(dict.fromkeys(split_point(p)[0] for p in src.hookpoints))
    reads, writes = wiring.places(places, src.hookpoints[0],
                                  lambda points: match(modules, points, f"the cache {run.cache}"))
    heldout = src.heldout()
    configs = configure(reads, writes, {p: int(t.shape[1]) for p, t in heldout.items()})
    return src, heldout, {"source": str(run.cache), **src.metadata}, configs


def _live_source(args, run: RunConfig, model: ModelConfig, places: PlacesConfig, configure,
                 device: torch.device, d=None):
    """Activations of the model at the places the dictionaries read and write, over the
    training text: computed once and kept in memory when they fit, streamed otherwise
    (:func:`sae.live.model_source`; one stopped-early forward captures every place)."""
    from sparsecode import lm, text
    from sparsecode.hooks import resolve

    from .live import LiveActivations, model_source

    t0 = time.perf_counter()
    net, tokenizer = lm.load_model(model.model, device=device)
    default = model.hookpoint or lm.default_hookpoint(net)
    reads, writes = wiring.places(places, default, lambda points: resolve(net, points))
    needed = list(dict.fromkeys(reads + writes))
    widths = {p: lm.hidden_size(net, p) for p in needed}
    configs = configure(reads, writes, widths)  # bad settings fail before the model runs
    train_texts, held_texts = text.split_texts(text.load_texts(model.source))
    tokens = text.pack_tokens(tokenizer, train_texts, context_size=model.context_size)
    held_tokens = text.pack_tokens(tokenizer, held_texts, context_size=model.context_size)
    shown = ", ".join(f"{p} ({w})" for p, w in widths.items())
    print(f"model {model.model} loaded in {time.perf_counter() - t0:.0f} s; places {shown}; "
          f"{tokens.numel()} training and {held_tokens.numel()} held-out tokens",
          file=sys.stderr)
    held = LiveActivations(net, held_tokens, needed, batch_size=run.batch_size, epochs=1,
                           drop_last=False, seed=model.seed, device=device)
    batches = list(held)
    heldout = {p: torch.cat([b[p] for b in batches])[: run.holdout] for p in needed}
    src = model_source(net, tokens, needed, batch_size=run.batch_size,
                       total_tokens=args.total_tokens, seed=model.seed, device=device,
                       progress=model.progress, dist=d)
    info = {"model_name": model.model, "context_size": model.context_size,
            "dataset": model.source, "prepend_bos": True, "drop_bos": True,
            "massive_factor": MASSIVE_FACTOR}
    return src, heldout, info, configs


def cmd_train(args: argparse.Namespace) -> int:
    """Train SAEs on one process, or on several under torchrun (data parallel, latent shards)."""
    from . import distributed

    try:
        run, model = RunConfig(**values(RunConfig, args)), ModelConfig(**values(ModelConfig, args))
        TrainConfig(**values(TrainConfig, args, seed=model.seed, progress=model.progress))
        PlacesConfig(**values(PlacesConfig, args))
    except ValueError as e:
        raise fail(e) from e
    _check_sae_settings(args)
    device = checked_device(model.device)
    check_writable(Path(run.out))
    torch.manual_seed(model.seed)
    d = None
    if distributed.launched():
        d = distributed.init(run.latent_shards, timeout_s=run.dist_timeout, device=device)
        device = d.device
        if d.data_size > 1 and run.batch_size % d.data_size:
            raise fail(f"--batch-size {run.batch_size} is not divisible by the "
                       f"{d.data_size} data-parallel processes")
    elif run.latent_shards > 1:
        raise fail("--latent-shards needs several processes: launch with "
                   "torchrun --nproc-per-node N -m sae train ...")
    try:
        rc = _train(args, run, model, device, d)
    except BaseException:
        distributed.shutdown(synchronize=False)
        raise
    distributed.shutdown()
    return rc


def _trainer(args, run: RunConfig, model: ModelConfig, device: torch.device, d):
    """The sources, the SAEs and the Trainer of a ``sae train`` invocation."""
    from .distributed import RankSlice
    from .train import Trainer

    def configure(reads: list[str], writes: list[str], widths: dict[str, int]) -> dict:
        return _sae_configs(args, wiring.shape_fields(reads, writes, widths))

    try:
        places = PlacesConfig(**values(PlacesConfig, args))
        if run.activations:
            src, heldout, info, configs = _array_source(args, run, model, places, configure)
        elif run.cache:
            src, heldout, info, configs = _cache_source(args, run, model, places, configure)
        else:
            src, heldout, info, configs = _live_source(args, run, model, places, configure,
                                                       device, d)
    except (ValueError, TypeError, KeyError) as e:  # places that do not exist or do not run
        raise fail(e) from e
    if d is not None and d.data_size > 1 and src.batch_size == run.batch_size:
        src = RankSlice(src, d.data_rank, d.data_size)
    gen = torch.Generator().manual_seed(model.seed)
    saes = {}
    for name, c in configs.items():
        c.metadata.update(info)
        saes[name] = SAE(c, generator=gen).to(device)
    try:
        cfg = TrainConfig(**values(TrainConfig, args, seed=model.seed, progress=model.progress))
        return Trainer(saes, src, cfg, out_dir=run.out, heldout=heldout, dist=d)
    except ValueError as e:
        raise fail(e) from e


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    """Hold ``out/.lock`` (an advisory ``flock``, released when the process ends, even when
    killed) while training into ``out``: a second ``sae train`` into it is refused."""
    try:
        import fcntl
    except ImportError:  # no advisory locks (Windows)
        yield
        return
    with open(out / LOCK_FILE, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise fail(f"{out} is in use by another `sae train` ({holder}): wait for it to "
                       "finish, or choose another --out") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _prepare_out(out: Path, run: RunConfig) -> None:
    """The run folder's protocol (under its lock): a checkpoint is continued (``--resume``) or
    deliberately discarded (``--force``), never silently; leftovers of interrupted writes
    (hidden ``.*.tmp`` / ``.*.old``) that are not checkpoints are removed."""
    has = checkpoint.has_checkpoint(out)
    if run.resume and not has:
        raise fail(f"--resume given but there is no checkpoint in {out / checkpoint.CHECKPOINT}")
    if has and not run.resume:
        if not run.force:
            raise fail(f"{out} holds the checkpoint of an unfinished run: continue it with "
                       "--resume, or start over with --force (deletes it)")
        for p in [out / checkpoint.CHECKPOINT, *out.glob(f".{checkpoint.CHECKPOINT}.*")]:
            shutil.rmtree(p, ignore_errors=True)
    for p in out.iterdir():
        if not is_temporary(p) or p.name.startswith(f".{checkpoint.CHECKPOINT}."):
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def _train(args, run: RunConfig, model: ModelConfig, device: torch.device, d) -> int:
    out = Path(run.out)
    main = d is None or d.is_main
    with _locked(out) if main else contextlib.nullcontext():
        if main:
            _prepare_out(out, run)
        return _train_locked(args, run, model, device, d, main)


def _train_locked(args, run: RunConfig, model: ModelConfig, device: torch.device, d,
                  main: bool) -> int:
    from .train import TrainingDiverged

    out = Path(run.out)
    trainer = _trainer(args, run, model, device, d)
    if run.resume:
        try:
            trainer.resume()
        except (OSError, ValueError) as e:
            raise fail(e) from e
        if main:
            print(f"resumed from {out / checkpoint.CHECKPOINT} at step {trainer.step} "
                  f"({trainer.tokens} tokens)")
    t0 = time.perf_counter()
    try:
        trainer.fit()
    except KeyboardInterrupt:
        if main:
            print(f"\ninterrupted at step {trainer.step}; checkpoint written to "
                  f"{out / checkpoint.CHECKPOINT}; continue with the same command and --resume",
                  file=sys.stderr)
        return 130
    except (TrainingDiverged, ValueError) as e:
        raise fail(e) from e
    finally:
        trainer.close()
    elapsed = time.perf_counter() - t0
    try:
        paths = trainer.save(out)
        results = trainer.evaluate()
    except ValueError as e:
        raise fail(e) from e
    if main:
        _write_metrics(trainer, run, paths, results, elapsed)
    return 0


def _json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as None (``metrics.json`` stays valid JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _write_metrics(trainer, run: RunConfig, paths: dict, results: dict, elapsed: float) -> None:
    """``metrics.json`` per SAE and for the run; the checkpoint removed unless kept."""
    out = Path(run.out)
    summary: dict[str, Any] = {}
    for name in trainer.saes:
        m = {k.split("/heldout/")[1]: v for k, v in results.items() if k.startswith(f"{name}/")}
        broken = [k for k in ("fvu", "l0") if not math.isfinite(m.get(k, math.nan))]
        if broken:
            raise fail(f"SAE {name!r} gives a non-finite held-out {', '.join(broken)}; its "
                       f"folder {paths[name]} is not usable (the checkpoint is kept)")
        m["tokens_per_s"] = trainer.tokens / max(elapsed, 1e-9) if not run.resume else None
        m["train_tokens"] = trainer.tokens
        m["train_seconds"] = elapsed
        m["path"] = str(paths[name])
        summary[name] = _json_safe(m)
        atomic_write(paths[name] / "metrics.json",
                     json.dumps(summary[name], indent=1, allow_nan=False))
    atomic_write(out / "metrics.json", json.dumps(summary, indent=1, allow_nan=False))
    ckpt = out / checkpoint.CHECKPOINT
    if ckpt.exists() and not run.keep_checkpoint:
        shutil.rmtree(ckpt)
    for name, m in summary.items():
        print(f"{name}: fvu={m['fvu']:.4f} l0={m['l0']:.1f} "
              f"dead={100 * m['dead_fraction']:.2f}% -> {m['path']}")
    print(f"metrics: {out / 'metrics.json'}")


# ---------------------------------------------------------------------------------------------
# parser
# ---------------------------------------------------------------------------------------------


def _add_train(sub) -> None:
    t = sub.add_parser("train", help="train SAEs", description=cmd_train.__doc__)
    add_flags(t.add_argument_group("model and text (unless --activations / --cache)"),
              ModelConfig)
    add_flags(t.add_argument_group("data and run"), RunConfig)
    add_flags(t.add_argument_group("places: transcoders and crosscoders (default: an SAE at "
                                   "--hookpoint)"), PlacesConfig)
    add_flags(t.add_argument_group("SAE (sae.config.SAEConfig)"), SAEConfig)
    add_flags(t.add_argument_group("training (sae.config.TrainConfig)"), TrainConfig,
              skip=("seed", "progress"))
    t.set_defaults(func=cmd_train)


def _add_prune(sub) -> None:
    add_prune_parser(sub, help="prune a language model's Linear layers (= sparsecode prune)")
    add_sparsify_parser(sub, help="activation sparsity at inference for a language model's "
                                  "Linear layers (= sparsecode sparsify)")


def build_parser() -> argparse.ArgumentParser:
    from . import commands

    return command_parser("sae", __doc__, _add_train, commands.add_parsers, _add_prune)


def main(argv: list[str] | None = None) -> int:
    """Run ``sae`` with ``argv``. A user error (a bad flag or file, data a command cannot
    use, a diverged run) prints one ``error: ...`` line and exits with status 2
    (:class:`UsageError`); ``SAE_TRACEBACK=1`` shows the traceback of such a ``ValueError``
    instead."""
    try:
        return run(build_parser(), argv)  # fail() / UsageError: one line, status 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError) as e:
        if os.environ.get("SAE_TRACEBACK"):
            raise
        message = UsageError(str(e)).message
        print(message, file=sys.stderr)
        raise UsageError(message) from e


if __name__ == "__main__":
    sys.exit(main())
