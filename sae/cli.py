"""The ``sae`` command: ``sae train``, ``sae eval``, ``sae cache``, ``sae prune``.

``sae train`` with no arguments trains a TopK SAE on a middle residual-stream layer of the
built-in SmolLM2-135M over the built-in text. ``--activations FILE.npy`` or ``--cache DIR``
train from stored activations instead. Run ``sae train --help`` for every flag.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .data import MASSIVE_FACTOR
from .models import ARCHITECTURES, SAE, SAEConfig

RUN_DIR = "runs/sae"


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _check_writable(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise SystemExit(f"error: cannot write to output directory {path}: {e.strerror}") from e


def _split_list(text: str, kind=str) -> list:
    return [kind(v) for v in str(text).split(",") if v != ""]


def _sae_configs(args: argparse.Namespace, d_in: int, hook: str) -> dict[str, SAEConfig]:
    archs = _split_list(args.arch)
    ks = _split_list(args.k, int)
    for a in archs:
        if a not in ARCHITECTURES:
            raise SystemExit(
                f"error: unknown architecture {a!r}; known architectures: "
                f"{', '.join(ARCHITECTURES)}"
            )
    d_sae = args.d_sae or args.expansion_factor * d_in
    configs = {}
    for a in archs:
        for k in ks:
            name = a if len(ks) == 1 else f"{a}-k{k}"
            extra: dict[str, Any] = {}
            if a == "relu":
                extra["l1_coefficient"] = args.l1_coefficient
            try:
                configs[name] = SAEConfig(
                    d_in=d_in,
                    d_sae=d_sae,
                    architecture=a,
                    k=k,
                    aux_coefficient=args.aux_coefficient,
                    metadata={"hook_name": hook},
                    **extra,
                )
            except ValueError as e:
                raise SystemExit(f"error: {e}") from e
    return configs


# ---------------------------------------------------------------------------------------------
# sources
# ---------------------------------------------------------------------------------------------


def _array_source(args, seed: int):
    from .data import ArrayActivations

    path = Path(args.activations)
    if not path.exists():
        raise SystemExit(f"error: activations file not found: {path}")
    n = ArrayActivations(path, batch_size=1).n_rows
    holdout = min(args.holdout, max(n // 10, 1))
    src = ArrayActivations(
        path, batch_size=args.batch_size, holdout=holdout, seed=seed, epochs=None
    )
    return src, {src.hookpoints[0]: src.heldout()}, {"source": str(path)}


def _cache_source(args, seed: int):
    from .cache import CachedActivations

    src = CachedActivations(
        args.cache, batch_size=args.batch_size, seed=seed, epochs=None, holdout=args.holdout
    )
    return src, src.heldout(), {"source": str(args.cache), **src.metadata}


def _live_source(args, seed: int, device: torch.device, d=None):
    """Activations of ``--model`` at ``--hookpoint`` over the training text: computed once and
    kept in memory when they fit, streamed otherwise (:func:`sae.live.model_source`)."""
    from sparsecode import lm, text

    from .live import LiveActivations, model_source

    t0 = time.perf_counter()
    model, tokenizer = lm.load_model(args.model, device=device)
    hook = args.hookpoint or lm.default_hookpoint(model)
    train_texts, held_texts = text.split_texts(text.load_texts(args.dataset or args.text))
    tokens = text.pack_tokens(tokenizer, train_texts, context_size=args.context_size)
    held_tokens = text.pack_tokens(tokenizer, held_texts, context_size=args.context_size)
    print(
        f"model {args.model} loaded in {time.perf_counter() - t0:.0f} s; hook point {hook} "
        f"(d_in={lm.hidden_size(model, hook)}); {tokens.numel()} training and "
        f"{held_tokens.numel()} held-out tokens",
        file=sys.stderr,
    )
    held = LiveActivations(model, held_tokens, [hook], batch_size=args.batch_size, epochs=1,
                           drop_last=False, seed=seed, device=device)
    heldout = {hook: torch.cat([b[hook] for b in held])[: args.holdout]}
    src = model_source(model, tokens, hook, batch_size=args.batch_size, total_tokens=args.tokens,
                       seed=seed, device=device, progress=not args.no_progress, dist=d)
    info = {
        "model_name": args.model,
        "hook_name": hook,
        "context_size": args.context_size,
        "dataset": args.dataset or args.text,
        "prepend_bos": True,
        "drop_bos": True,
        "massive_factor": MASSIVE_FACTOR,
    }
    return src, heldout, info


# ---------------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
    """Train SAEs on one process, or on several under torchrun (data parallel, latent shards)."""
    from . import distributed

    out = Path(args.out)
    _check_writable(out)
    device = _device(args.device)
    torch.manual_seed(args.seed)
    d = None
    if distributed.launched():
        d = distributed.init(args.latent_shards, timeout_s=args.dist_timeout, device=device)
        device = d.device
        if d.data_size > 1 and args.batch_size % d.data_size:
            raise SystemExit(f"error: --batch-size {args.batch_size} is not divisible by the "
                             f"{d.data_size} data-parallel processes")
    elif args.latent_shards > 1:
        raise SystemExit("error: --latent-shards needs several processes: launch with "
                         "torchrun --nproc-per-node N -m sae train ...")
    try:
        rc = _train(args, out, device, d)
    except BaseException:
        distributed.shutdown(synchronize=False)
        raise
    distributed.shutdown()
    return rc


def _train(args: argparse.Namespace, out: Path, device: torch.device, d) -> int:
    from .distributed import RankSlice
    from .train import TrainConfig, Trainer

    main = d is None or d.is_main
    if args.activations:
        src, heldout, info = _array_source(args, args.seed)
    elif args.cache:
        src, heldout, info = _cache_source(args, args.seed)
    else:
        src, heldout, info = _live_source(args, args.seed, device, d)
    if d is not None and d.data_size > 1 and src.batch_size == args.batch_size:
        src = RankSlice(src, d.data_rank, d.data_size)
    hook = src.hookpoints[0]
    d_in = int(heldout[hook].shape[1])
    configs = _sae_configs(args, d_in, hook)
    gen = torch.Generator().manual_seed(args.seed)
    saes = {}
    for name, c in configs.items():
        c.metadata.update(info)
        saes[name] = SAE(c, generator=gen).to(device)
    cfg = TrainConfig(
        total_tokens=args.tokens,
        lr=args.lr,
        matmul_dtype=args.matmul_dtype,
        checkpoint_every=args.checkpoint_every,
        eval_every=args.eval_every,
        seed=args.seed,
        progress=not args.no_progress,
        wandb=args.wandb,
        wandb_project=args.wandb_project,
    )
    try:
        trainer = Trainer(saes, src, cfg, out_dir=out, heldout=heldout, dist=d)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from e
    if args.resume:
        ckpt = out / "checkpoint"
        if not (ckpt / "trainer.json").exists():
            raise SystemExit(f"error: --resume given but there is no checkpoint in {ckpt}")
        trainer.resume(ckpt)
        if main:
            print(f"resumed from {ckpt} at step {trainer.step} ({trainer.tokens} tokens)")

    t0 = time.perf_counter()
    try:
        trainer.fit()
    except KeyboardInterrupt:
        if main:
            print(
                f"\ninterrupted at step {trainer.step}; checkpoint written to "
                f"{out / 'checkpoint'}; continue with the same command and --resume",
                file=sys.stderr,
            )
        return 130
    finally:
        trainer.close()
    elapsed = time.perf_counter() - t0
    paths = trainer.save(out)
    results = trainer.evaluate()
    if not main:
        return 0
    summary: dict[str, Any] = {}
    for name in saes:
        m = {k.split("/heldout/")[1]: v for k, v in results.items() if k.startswith(f"{name}/")}
        m["tokens_per_s"] = trainer.tokens / max(elapsed, 1e-9) if not args.resume else None
        m["train_tokens"] = trainer.tokens
        m["train_seconds"] = elapsed
        m["path"] = str(paths[name])
        summary[name] = m
        (paths[name] / "metrics.json").write_text(json.dumps(m, indent=1))
    (out / "metrics.json").write_text(json.dumps(summary, indent=1))
    ckpt = out / "checkpoint"
    if ckpt.exists() and not args.keep_checkpoint:
        import shutil

        shutil.rmtree(ckpt)
    for name, m in summary.items():
        print(
            f"{name}: fvu={m['fvu']:.4f} l0={m['l0']:.1f} dead={100 * m['dead_fraction']:.2f}% "
            f"-> {m['path']}"
        )
    print(f"metrics: {out / 'metrics.json'}")
    return 0


def _sae_folders(path: Path) -> dict[str, Path]:
    if (path / "cfg.json").exists():
        return {path.name: path}
    found = {p.parent.name: p.parent for p in sorted(path.glob("*/cfg.json"))}
    if not found:
        raise SystemExit(f"error: no SAE folder (cfg.json) in {path}")
    return found


def cmd_eval(args: argparse.Namespace) -> int:
    """Metrics of saved SAEs: on stored activations (``--activations``), or spliced into the
    language model over held-out text (CE-loss recovered, delta LM loss, KL)."""
    from . import metrics
    from .io import load

    path = Path(args.run)
    if not path.exists():
        raise SystemExit(f"error: no such run folder: {path}")
    folders = _sae_folders(path)
    device = _device(args.device)
    saes = {name: load(folder).to(device) for name, folder in folders.items()}
    results: dict[str, Any] = {}
    if args.activations:
        import numpy as np

        from .data import check_finite

        apath = Path(args.activations)
        if not apath.exists():
            raise SystemExit(f"error: activations file not found: {apath}")
        arr = np.load(apath, mmap_mode="r")
        if arr.ndim != 2 or arr.shape[0] == 0:
            raise SystemExit(f"error: {apath} must hold a non-empty (N, d_in) array, "
                             f"got shape {arr.shape}")
        x = torch.from_numpy(np.array(arr[: args.max_tokens or None], dtype=np.float32))
        check_finite(x, what=str(apath))
        x = x.to(device)
        for name, sae in saes.items():
            if x.shape[1] != sae.cfg.d_in:
                raise SystemExit(
                    f"error: activations have d_in={x.shape[1]} but SAE {folders[name]} "
                    f"expects d_in={sae.cfg.d_in}"
                )
            results[name] = metrics.evaluate(sae, x)
    else:
        from sparsecode import lm, text

        models: dict[str, Any] = {}
        for name, sae in saes.items():
            meta = sae.cfg.metadata
            model_name = args.model or meta.get("model_name") or "smollm2"
            hook = args.hookpoint or meta.get("hook_name")
            if hook is None:
                raise SystemExit(f"error: {folders[name]} records no hook_name; pass --hookpoint")
            if model_name not in models:
                models[model_name] = lm.load_model(model_name, device=device)
            model, tokenizer = models[model_name]
            source = args.dataset or args.text or meta.get("dataset") or "builtin"
            held = text.split_texts(text.load_texts(source))[1]
            ctx = int(meta.get("context_size") or args.context_size)
            tokens = text.pack_tokens(tokenizer, held, context_size=ctx)
            if args.max_tokens:
                tokens = tokens[: max(1, args.max_tokens // ctx)]
            results[name] = metrics.model_metrics(
                model, sae, hook, tokens, progress=not args.no_progress
            )
            results[name].update({"model_name": model_name, "hook_name": hook})
    if args.json:
        print(json.dumps(results))
    else:
        for name, m in results.items():
            print(name, " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                 for k, v in m.items()))
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from sparsecode import lm, text

    from .cache import write_cache
    from .live import LiveActivations

    device = _device(args.device)
    model, tokenizer = lm.load_model(args.model, device=device)
    hooks = _split_list(args.hookpoint) if args.hookpoint else [lm.default_hookpoint(model)]
    texts = text.load_texts(args.dataset or args.text)
    tokens = text.pack_tokens(tokenizer, texts, context_size=args.context_size)
    src = LiveActivations(model, tokens, hooks, batch_size=args.shard_tokens, seed=args.seed,
                             device=device)
    meta = {"model_name": args.model, "context_size": args.context_size,
            "dataset": args.dataset or args.text}
    out = write_cache(src, args.out, shard_tokens=args.shard_tokens, metadata=meta,
                      total_tokens=args.tokens, progress=not args.no_progress)
    print(f"cache written to {out}")
    return 0


def cmd_browse(args: argparse.Namespace) -> int:
    """Write a static HTML feature browser per SAE over held-out text: each latent's top
    activating contexts, activation histogram, logit effects and density."""
    from sparsecode import lm, text

    from .browser import feature_browser, find_sae_folders
    from .io import load

    try:
        folders = find_sae_folders(args.run)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from e
    latents = _split_list(args.latents, int) if args.latents else None
    device = _device(args.device)
    models: dict[str, Any] = {}
    held: dict[str, list[str]] = {}
    for name, folder in folders.items():
        sae = load(folder, device=device)
        meta = sae.cfg.metadata
        model_name = args.model or meta.get("model_name") or "smollm2"
        if model_name not in models:
            models[model_name] = lm.load_model(model_name, device=device)
        model, tokenizer = models[model_name]
        hook = args.hookpoint or meta.get("hook_name") or lm.default_hookpoint(model)
        source = args.text or meta.get("dataset") or "builtin"
        if source not in held:
            docs = text.load_texts(source)
            held[source] = text.split_texts(docs)[1]
        ctx = args.context_size or int(meta.get("context_size") or 128)
        tokens = text.pack_tokens(tokenizer, held[source], context_size=ctx)
        tokens = tokens[: max(1, -(-args.tokens // ctx))]
        if tokens.shape[0] == 0:
            raise SystemExit(
                f"error: the held-out split of {source!r} is shorter than one context of {ctx} "
                "tokens; pass more text with --text"
            )
        out = Path(args.out) if args.out else folder / "feature_browser.html"
        if args.out and len(folders) > 1:
            out = out.with_name(f"{out.stem}-{name}{out.suffix or '.html'}")
        info = {
            "model": model_name,
            "SAE folder": str(folder),
            "text": f"{source} (held-out split: 10% of documents, seed 0; not trained on)",
        }
        try:
            feature_browser(
                model, tokenizer, sae, hook, tokens, latents=latents, n_latents=args.n_latents,
                top_contexts=args.top_contexts, out=out, info=info,
                progress=not args.no_progress,
            )
        except ValueError as e:
            raise SystemExit(f"error: {folder}: {e}") from e
        print(
            f"{name}: {out} ({out.stat().st_size / 1e3:.0f} kB; {tokens.numel()} held-out "
            f"tokens at {hook})"
        )
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    """Scatter L0 (log scale) against FVU for every SAE folder with a metrics.json in the
    given run folders (or SAE folders); write a PNG."""
    from .browser import l0_fvu_plot, l0_fvu_points

    try:
        n = len(l0_fvu_points(args.runs))
        out = l0_fvu_plot(args.runs, args.out)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from e
    print(f"{n} SAEs -> {out}")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    """Prune the Linear layers of a causal LM's decoder blocks (``sparsecode.prune``).

    Defaults: the built-in SmolLM2-135M, calibration on 32 x 256 tokens of the built-in text's
    training split, Wanda-initialised least squares + IHT (``--method iht``) at 50% unstructured;
    perplexity before and after on the held-out split. ``--out DIR`` writes
    ``model.safetensors`` (and ``model.masks.safetensors`` with ``--save-masks``) and
    ``report.json``.
    """
    from sparsecode import lm, text
    from sparsecode.prune import evaluate_perplexity, prune, save_pruned

    device = _device(args.device)
    model, tokenizer = lm.load_model(args.model, device=device)
    texts = text.load_texts(args.dataset or args.text)
    train_texts, held_texts = text.split_texts(texts)
    calib = text.pack_tokens(tokenizer, train_texts, context_size=args.context_size)
    gen = torch.Generator().manual_seed(args.seed)
    calib = calib[torch.randperm(len(calib), generator=gen)[: args.n_calib]]
    held = text.pack_tokens(tokenizer, held_texts, context_size=args.context_size)[: args.n_eval]
    if not len(calib):
        raise SystemExit("error: the calibration text gives no context; pass more text or a "
                         "smaller --context-size")
    result: dict[str, Any] = {}
    if len(held):
        result["perplexity_dense"] = evaluate_perplexity(model, held)
    try:
        report = prune(model, calib, args.sparsity, args.method, args.pattern, args.allocation,
                       return_masks=args.save_masks, progress=not args.no_progress)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    if len(held):
        result["perplexity"] = evaluate_perplexity(model, held)
    result.update(report.to_dict())
    if args.out:
        out = Path(args.out)
        _check_writable(out)
        save_pruned(model, out / "model.safetensors", report.masks)
        (out / "report.json").write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "layers"}))
    else:
        ppl = (f"; perplexity {result['perplexity_dense']:.2f} -> {result['perplexity']:.2f}"
               if len(held) else "")
        print(f"{report.method} {report.pattern} ({report.allocation}): {len(report.layers)} "
              f"layers at sparsity {report.sparsity:.4f} in {report.seconds:.1f} s{ppl}")
    return 0


# ---------------------------------------------------------------------------------------------
# parser
# ---------------------------------------------------------------------------------------------


def _add_source(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--model", default="smollm2",
                   help="'smollm2' (built-in SmolLM2-135M), a local folder or a Hugging Face id")
    g.add_argument("--hookpoint", default=None,
                   help="module path, e.g. model.layers.15 (default: the middle layer)")
    g.add_argument("--text", default="builtin",
                   help="'builtin' (Python's own docs), a .txt file or a folder of them")
    g.add_argument("--dataset", default=None, help="a Hugging Face dataset name (if installed)")
    g.add_argument("--context-size", type=int, default=128)
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--no-progress", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sae", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train SAEs", description=cmd_train.__doc__)
    _add_source(t)
    t.add_argument("--activations", default=None, help="train from an (N, d_in) .npy array")
    t.add_argument("--cache", default=None, help="train from a cache written by `sae cache`")
    t.add_argument("--arch", default="topk",
                   help=f"architecture(s), comma-separated: {', '.join(ARCHITECTURES)}")
    t.add_argument("--k", default="32", help="active latents per token (comma list allowed)")
    t.add_argument("--d-sae", type=int, default=None, help="number of latents")
    t.add_argument("--expansion-factor", type=int, default=16,
                   help="d_sae = expansion_factor * d_in when --d-sae is not given")
    t.add_argument("--l1-coefficient", type=float, default=5.0, help="relu only")
    t.add_argument("--aux-coefficient", type=float, default=1 / 32)
    t.add_argument("--batch-size", type=int, default=4096,
                   help="tokens per optimizer step (over all processes)")
    t.add_argument("--tokens", type=int, default=2_000_000, help="training tokens")
    t.add_argument("--lr", type=float, default=None, help="default: 1.5e-3 / sqrt(d_sae / 2^14)")
    t.add_argument("--matmul-dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    t.add_argument("--holdout", type=int, default=16384, help="held-out tokens for metrics")
    t.add_argument("--eval-every", type=int, default=0)
    t.add_argument("--checkpoint-every", type=int, default=100, help="steps (0: only on ^C)")
    t.add_argument("--keep-checkpoint", action="store_true")
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    t.add_argument("--wandb", action="store_true", help="log to Weights & Biases")
    t.add_argument("--wandb-project", default="sae")
    t.add_argument("--out", default=RUN_DIR, help=f"run folder (default {RUN_DIR})")
    g = t.add_argument_group("several processes (launch with torchrun --nproc-per-node N)")
    g.add_argument("--latent-shards", type=int, default=1,
                   help="split each TopK SAE's latents over this many processes "
                        "(the rest of the processes are data parallel)")
    g.add_argument("--dist-timeout", type=float, default=300,
                   help="seconds a process waits for the others before failing")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="metrics of saved SAEs (spliced into the model, or on .npy)")
    e.add_argument("run", help="a run folder or one SAE folder")
    e.add_argument("--activations", default=None,
                   help="(N, d_in) .npy array; without it the SAE is spliced into --model")
    e.add_argument("--model", default=None, help="default: the model recorded in the SAE")
    e.add_argument("--hookpoint", default=None, help="default: the hook recorded in the SAE")
    e.add_argument("--text", default=None, help="default: the training text's held-out split")
    e.add_argument("--dataset", default=None)
    e.add_argument("--context-size", type=int, default=128)
    e.add_argument("--batch-size", type=int, default=8192)
    e.add_argument("--max-tokens", type=int, default=0, help="0: all held-out tokens")
    e.add_argument("--no-progress", action="store_true")
    e.add_argument("--device", default="auto")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(func=cmd_eval)

    c = sub.add_parser("cache", help="write model activations to a sharded on-disk cache")
    _add_source(c)
    c.add_argument("--tokens", type=int, default=1_000_000)
    c.add_argument("--shard-tokens", type=int, default=65536)
    c.add_argument("--out", required=True)
    c.set_defaults(func=cmd_cache)

    b = sub.add_parser("browse", help="HTML feature browser of saved SAEs",
                       description=cmd_browse.__doc__)
    b.add_argument("run", help="a run folder or one SAE folder")
    b.add_argument("--model", default=None, help="default: the model recorded in the SAE")
    b.add_argument("--hookpoint", default=None, help="default: the hook recorded in the SAE")
    b.add_argument("--text", default=None,
                   help="text whose held-out split is shown (default: the SAE's, else builtin)")
    b.add_argument("--tokens", type=int, default=50_000, help="held-out tokens to scan")
    b.add_argument("--context-size", type=int, default=None,
                   help="default: the SAE's context_size, else 128")
    b.add_argument("--latents", default=None,
                   help="comma-separated latent ids (default: 64 chosen by density)")
    b.add_argument("--n-latents", type=int, default=64)
    b.add_argument("--top-contexts", type=int, default=10)
    b.add_argument("--out", default=None,
                   help="HTML file (default SAE_FOLDER/feature_browser.html; with several SAEs "
                        "the SAE name is added to it)")
    b.add_argument("--device", default="auto")
    b.add_argument("--no-progress", action="store_true")
    b.set_defaults(func=cmd_browse)

    pl = sub.add_parser("plot", help="L0 vs FVU scatter of trained SAEs",
                        description=cmd_plot.__doc__)
    pl.add_argument("runs", nargs="+", help="run folders or SAE folders")
    pl.add_argument("--out", default="l0_fvu.png", help="PNG file (default l0_fvu.png)")
    pl.set_defaults(func=cmd_plot)

    pr = sub.add_parser("prune", help="prune a language model's Linear layers",
                        description=cmd_prune.__doc__)
    pr.add_argument("--model", default="smollm2",
                    help="'smollm2' (built-in SmolLM2-135M), a local folder or a Hugging Face id")
    pr.add_argument("--text", default="builtin",
                    help="'builtin' (Python's own docs), a .txt file or a folder of them")
    pr.add_argument("--dataset", default=None, help="a Hugging Face dataset name (if installed)")
    pr.add_argument("--method", default="iht",
                    choices=["magnitude", "wanda", "sparsegpt", "iht", "omp"])
    pr.add_argument("--sparsity", type=float, default=None,
                    help="fraction of weights set to zero (default 0.5; N:M fixes it)")
    pr.add_argument("--pattern", default="unstructured", help="'unstructured' or N:M, e.g. 2:4")
    pr.add_argument("--allocation", default="uniform", choices=["uniform", "owl"])
    pr.add_argument("--n-calib", type=int, default=32, help="calibration contexts")
    pr.add_argument("--n-eval", type=int, default=32, help="held-out contexts (0: no perplexity)")
    pr.add_argument("--context-size", type=int, default=256)
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--device", default="auto")
    pr.add_argument("--out", default=None, help="folder for model.safetensors and report.json")
    pr.add_argument("--save-masks", action="store_true")
    pr.add_argument("--json", action="store_true", help="print one JSON object")
    pr.add_argument("--no-progress", action="store_true")
    pr.set_defaults(func=cmd_prune)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
