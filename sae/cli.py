"""The ``sae`` command: ``sae train | eval | cache | browse | plot`` (and ``sae prune``, an alias
of ``sparsecode prune``).

``sae train`` with no arguments trains a TopK SAE on a middle residual-stream layer of the
built-in SmolLM2-135M over the built-in text. ``--activations FILE.npy`` or ``--cache DIR``
train from stored activations instead. Every flag is generated from a configuration dataclass
(:mod:`sae.config`, :class:`sparsecode.lm.ModelConfig`): run ``sae train --help`` for all of them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from sparsecode.cli import (
    add_prune_parser,
    check_writable,
    command_parser,
    fail,
    run,
    split_list,
)
from sparsecode.flags import add_flags, values
from sparsecode.lm import ModelConfig, torch_device

from . import wiring
from .config import PlacesConfig, RunConfig, SAEConfig, TrainConfig
from .massive import MASSIVE_FACTOR
from .models import SAE

__all__ = ["build_parser", "main"]


# ---------------------------------------------------------------------------------------------
# sae train
# ---------------------------------------------------------------------------------------------


def _sae_configs(args: argparse.Namespace, shape: dict[str, Any]) -> dict[str, SAEConfig]:
    """One SAEConfig per (architecture, k) of the ``--arch`` / ``--k`` lists, of the shape
    (:func:`sae.wiring.shape_fields`: an SAE, a transcoder or a crosscoder)."""
    archs, ks = split_list(args.architecture), split_list(args.k, int)
    d_sae = args.d_sae or args.expansion_factor * shape["d_in"]
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

    run, model = RunConfig(**values(RunConfig, args)), ModelConfig(**values(ModelConfig, args))
    check_writable(Path(run.out))
    device = torch_device(model.device)
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


def _train(args, run: RunConfig, model: ModelConfig, device: torch.device, d) -> int:
    out = Path(run.out)
    main = d is None or d.is_main
    trainer = _trainer(args, run, model, device, d)
    if run.resume:
        ckpt = out / "checkpoint"
        if not (ckpt / "trainer.json").exists():
            raise fail(f"--resume given but there is no checkpoint in {ckpt}")
        trainer.resume(ckpt)
        if main:
            print(f"resumed from {ckpt} at step {trainer.step} ({trainer.tokens} tokens)")
    t0 = time.perf_counter()
    try:
        trainer.fit()
    except KeyboardInterrupt:
        if main:
            print(f"\ninterrupted at step {trainer.step}; checkpoint written to "
                  f"{out / 'checkpoint'}; continue with the same command and --resume",
                  file=sys.stderr)
        return 130
    finally:
        trainer.close()
    elapsed = time.perf_counter() - t0
    paths = trainer.save(out)
    results = trainer.evaluate()
    if main:
        _write_metrics(trainer, run, paths, results, elapsed)
    return 0


def _write_metrics(trainer, run: RunConfig, paths: dict, results: dict, elapsed: float) -> None:
    """``metrics.json`` per SAE and for the run; the checkpoint removed unless kept."""
    out = Path(run.out)
    summary: dict[str, Any] = {}
    for name in trainer.saes:
        m = {k.split("/heldout/")[1]: v for k, v in results.items() if k.startswith(f"{name}/")}
        m["tokens_per_s"] = trainer.tokens / max(elapsed, 1e-9) if not run.resume else None
        m["train_tokens"] = trainer.tokens
        m["train_seconds"] = elapsed
        m["path"] = str(paths[name])
        summary[name] = m
        (paths[name] / "metrics.json").write_text(json.dumps(m, indent=1))
    (out / "metrics.json").write_text(json.dumps(summary, indent=1))
    ckpt = out / "checkpoint"
    if ckpt.exists() and not run.keep_checkpoint:
        import shutil

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


def build_parser() -> argparse.ArgumentParser:
    from . import commands

    return command_parser("sae", __doc__, _add_train, commands.add_parsers, _add_prune)


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
