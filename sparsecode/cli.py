"""The ``sparsecode`` command: sparse coding attached to a model's weights and activations.

``sparsecode prune`` prunes the Linear layers of a causal language model's decoder blocks
(:mod:`sparsecode.prune`); ``sparsecode sparsify`` calibrates activation sparsity at inference
for them (:mod:`sparsecode.activations`). ``sae prune`` and ``sae sparsify`` are the same
commands. Flags are generated from :class:`sparsecode.lm.ModelConfig`, :class:`PruneOptions`
and :class:`SparsifyOptions` (:mod:`sparsecode.flags`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .flags import add_flags, meta, values
from .lm import ModelConfig, torch_device

__all__ = ["PruneOptions", "SparsifyOptions", "UsageError", "add_prune_parser",
           "add_sparsify_parser", "check_writable", "fail", "main", "split_list"]


class UsageError(SystemExit):
    """A user error: exits with status 2 (printed by the commands' ``main`` as one
    ``error: ...`` line); ``str()`` is the message."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message if message.startswith("error: ") else f"error: {message}"

    def __str__(self) -> str:
        return self.message


def fail(message: Any) -> SystemExit:
    """The error a command exits with (``error: ...``; :func:`main` makes it status 2)."""
    return SystemExit(f"error: {message}")


def check_writable(path: Path) -> None:
    """Create ``path`` if needed and check that a file can be written in it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise fail(f"cannot write to output directory {path}: {e.strerror}") from e


def split_list(text: str | None, kind=str) -> list:
    """``"a,b"`` -> ``["a", "b"]`` (converted by ``kind``); None -> ``[]``."""
    return [kind(v) for v in str(text or "").split(",") if v.strip() != ""]


@dataclass
class PruneOptions:
    """``sparsecode prune``'s own settings (the model and text are :class:`ModelConfig`'s)."""

    method: str = field(default="admm", metadata=meta(
        "layer solver", choices=("magnitude", "wanda", "sparsegpt", "iht", "omp", "admm", "alps")))
    sparsity: float | None = field(default=None, metadata=meta(
        "fraction of weights set to zero (default 0.5; N:M fixes it)"))
    pattern: str = field(default="unstructured", metadata=meta(
        "'unstructured' or N:M, e.g. 2:4"))
    allocation: str = field(default="uniform", metadata=meta(
        "sparsity per layer", choices=("uniform", "owl")))
    n_calib: int = field(default=32, metadata=meta("calibration contexts"))
    n_eval: int = field(default=32, metadata=meta("held-out contexts (0: no perplexity)"))
    out: str | None = field(default=None, metadata=meta(
        "folder for model.safetensors and report.json"))
    save_masks: bool = field(default=False, metadata=meta(
        "also write model.masks.safetensors"))
    json: bool = field(default=False, metadata=meta("print one JSON object"))


#: Calibration contexts are longer than the SAE's: 32 x 256 tokens (docs/pruning.md).
PRUNE_CONTEXT_SIZE = 256


def cmd_prune(args: argparse.Namespace) -> int:
    """Prune the Linear layers of a causal LM's decoder blocks (``sparsecode.prune``).

    Defaults: the built-in SmolLM2-135M, calibration on 32 x 256 tokens of the built-in text's
    training split, ADMM on the layer problem (``--method admm``) at 50% unstructured;
    perplexity before and after on the held-out split. ``--out DIR`` writes
    ``model.safetensors`` (and ``model.masks.safetensors`` with ``--save-masks``) and
    ``report.json``.
    """
    from . import lm
    from .prune import evaluate_perplexity, prune, save_pruned

    cfg, opts = ModelConfig(**values(ModelConfig, args)), PruneOptions(**values(PruneOptions, args))
    model, tokenizer = lm.load_model(cfg.model, device=torch_device(cfg.device))
    calib, held = _calibration_tokens(cfg, tokenizer, opts.n_calib, opts.n_eval)
    result: dict[str, Any] = {}
    if len(held):
        result["perplexity_dense"] = evaluate_perplexity(model, held)
    try:
        report = prune(model, calib, opts.sparsity, opts.method, opts.pattern, opts.allocation,
                       return_masks=opts.save_masks, progress=cfg.progress)
    except ValueError as err:
        raise fail(err) from None
    if len(held):
        result["perplexity"] = evaluate_perplexity(model, held)
    result.update(report.to_dict())
    if opts.out:
        out = Path(opts.out)
        check_writable(out)
        save_pruned(model, out / "model.safetensors", report.masks)
        (out / "report.json").write_text(json.dumps(result, indent=2) + "\n")
    if opts.json:
        print(json.dumps({k: v for k, v in result.items() if k != "layers"}))
    else:
        ppl = (f"; perplexity {result['perplexity_dense']:.2f} -> {result['perplexity']:.2f}"
               if len(held) else "")
        print(f"{report.method} {report.pattern} ({report.allocation}): {len(report.layers)} "
              f"layers at sparsity {report.sparsity:.4f} in {report.seconds:.1f} s{ppl}")
    return 0


@dataclass
class SparsifyOptions:
    """``sparsecode sparsify``'s own settings (the model and text are :class:`ModelConfig`'s)."""

    method: str = field(default="magnitude", metadata=meta(
        "how inputs are scored", choices=("magnitude", "wina", "cats", "topk")))
    sparsity: float = field(default=0.4, metadata=meta(
        "fraction of each Linear input set to zero, in [0, 1)"))
    allocation: str = field(default="greedy", metadata=meta(
        "sparsity per activation", choices=("uniform", "greedy", "global")))
    layers: str | None = field(default=None, metadata=meta(
        "Linear paths or globs, comma-separated (default: every Linear in the decoder blocks)"))
    rotate: bool = field(default=False, metadata=meta(
        "sparsify each gated MLP's input in its principal basis (LaRoSA)"))
    n_calib: int = field(default=32, metadata=meta("calibration contexts"))
    n_eval: int = field(default=32, metadata=meta("held-out contexts (0: no perplexity)"))
    out: str | None = field(default=None, metadata=meta("folder for rules.json"))
    json: bool = field(default=False, metadata=meta("print one JSON object"))


def _calibration_tokens(cfg: ModelConfig, tokenizer, n_calib: int, n_eval: int):
    """``(calibration, held-out)`` contexts of the configured text, or a clean error when the
    text gives fewer calibration contexts than asked for."""
    import torch

    from . import text

    train_texts, held_texts = text.split_texts(text.load_texts(cfg.source))
    calib = text.pack_tokens(tokenizer, train_texts, context_size=cfg.context_size)
    if len(calib) < n_calib:
        raise fail(f"the calibration text gives {len(calib)} contexts of {cfg.context_size} "
                   f"tokens, fewer than --n-calib {n_calib}; pass more text, a smaller "
                   "--n-calib or a smaller --context-size")
    gen = torch.Generator().manual_seed(cfg.seed)
    calib = calib[torch.randperm(len(calib), generator=gen)[:n_calib]]
    held = text.pack_tokens(tokenizer, held_texts, context_size=cfg.context_size)[:n_eval]
    return calib, held


def cmd_sparsify(args: argparse.Namespace) -> int:
    """Calibrate activation sparsity for the Linear layers of a causal LM's decoder blocks
    (``sparsecode.activations``).

    Defaults: the built-in SmolLM2-135M, calibration on 32 x 256 tokens of the built-in text's
    training split, magnitude scores with TEAL's greedy allocation at 40%; achieved sparsity and
    perplexity (dense and sparse) on the held-out split. ``--out DIR`` writes ``rules.json``,
    which ``sparsecode.activations.load(path, model)`` re-attaches.
    """
    from . import lm
    from .activations import evaluate_perplexity, sparsify_activations

    cfg = ModelConfig(**values(ModelConfig, args))
    opts = SparsifyOptions(**values(SparsifyOptions, args))
    if not 0.0 <= opts.sparsity < 1.0:
        raise fail(f"--sparsity must be in [0, 1), got {opts.sparsity}")
    if opts.n_calib < 1 or opts.n_eval < 0:
        raise fail("--n-calib must be >= 1 and --n-eval >= 0")
    if opts.out:
        check_writable(Path(opts.out))
    model, tokenizer = lm.load_model(cfg.model, device=torch_device(cfg.device))
    calib, held = _calibration_tokens(cfg, tokenizer, opts.n_calib, opts.n_eval)
    result: dict[str, Any] = {}
    if len(held):
        result["perplexity_dense"] = evaluate_perplexity(model, held)
    layers = split_list(opts.layers) or None
    try:
        rules = sparsify_activations(model, calib, opts.sparsity, opts.method, opts.allocation,
                                     layers, heldout=held if len(held) else None,
                                     rotate=opts.rotate)
    except (ValueError, KeyError) as err:
        raise fail(err) from None
    if len(held):
        result["perplexity"] = evaluate_perplexity(model, held)
    summary = {k: v for k, v in rules.to_dict().items() if k != "groups"}
    result.update(summary)
    if opts.out:
        rules.info.update({k: v for k, v in result.items() if k.startswith("perplexity")})
        rules.save(Path(opts.out) / "rules.json")
    if opts.json:
        print(json.dumps(result))
    else:
        got = rules.achieved_sparsity
        ppl = (f"; perplexity {result['perplexity_dense']:.2f} -> {result['perplexity']:.2f}"
               if len(held) else "")
        print(f"{rules.method} ({rules.allocation}): {len(rules.groups)} activations at "
              f"sparsity {rules.sparsity:.3f}"
              + (f" (held-out {got:.3f})" if got is not None else "") + ppl)
    return 0


def add_sparsify_parser(sub, help: str = "activation sparsity at inference for a language "
                                         "model's Linear layers") -> None:
    """``sparsify`` on a subparsers object (``sparsecode sparsify``, ``sae sparsify``)."""
    p = sub.add_parser("sparsify", help=help, description=cmd_sparsify.__doc__)
    add_flags(p, ModelConfig, skip=("hookpoint",),
              defaults={"context_size": PRUNE_CONTEXT_SIZE})
    add_flags(p, SparsifyOptions)
    p.set_defaults(func=cmd_sparsify)


def add_prune_parser(sub, help: str = "prune a language model's Linear layers") -> None:
    """``prune`` on a subparsers object (``sparsecode prune``, ``sae prune``)."""
    p = sub.add_parser("prune", help=help, description=cmd_prune.__doc__)
    add_flags(p, ModelConfig, skip=("hookpoint",),
              defaults={"context_size": PRUNE_CONTEXT_SIZE})
    add_flags(p, PruneOptions)
    p.set_defaults(func=cmd_prune)


def command_parser(prog: str, doc: str, *adders) -> argparse.ArgumentParser:
    """A parser whose subcommands are added by ``adders`` (each called with the subparsers)."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in adders:
        add(sub)
    return parser


def run(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """Parse ``argv`` and run the chosen subcommand offline (nothing is downloaded). A user
    error (:func:`fail`, :class:`UsageError`) prints one ``error: ...`` line and exits with
    status 2: the rule of every ``sparsecode`` and ``sae`` command."""
    try:
        args = parser.parse_args(argv)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        return int(args.func(args) or 0)
    except UsageError as e:
        print(e, file=sys.stderr)
        raise
    except SystemExit as e:
        if isinstance(e.code, str) and e.code.startswith("error: "):
            print(e.code, file=sys.stderr)
            raise UsageError(e.code) from e
        raise


def build_parser() -> argparse.ArgumentParser:
    return command_parser("sparsecode", __doc__, add_prune_parser, add_sparsify_parser)


def main(argv: list[str] | None = None) -> int:
    """Run ``sparsecode`` with ``argv``; a user error exits with status 2 (:func:`run`)."""
    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
