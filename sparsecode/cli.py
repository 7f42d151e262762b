"""The ``sparsecode`` command: sparse coding attached to a model's weights.

``sparsecode prune`` prunes the Linear layers of a causal language model's decoder blocks
(:mod:`sparsecode.prune`); ``sae prune`` is the same command. Flags are generated from
:class:`sparsecode.lm.ModelConfig` and :class:`PruneOptions` (:mod:`sparsecode.flags`).
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

__all__ = ["PruneOptions", "add_prune_parser", "check_writable", "fail", "main", "split_list"]


def fail(message: Any) -> SystemExit:
    """The error a command exits with (``error: ...`` on stderr, status 1)."""
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

    method: str = field(default="iht", metadata=meta(
        "layer solver", choices=("magnitude", "wanda", "sparsegpt", "iht", "omp")))
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
    training split, Wanda-initialised least squares + IHT (``--method iht``) at 50% unstructured;
    perplexity before and after on the held-out split. ``--out DIR`` writes
    ``model.safetensors`` (and ``model.masks.safetensors`` with ``--save-masks``) and
    ``report.json``.
    """
    import torch

    from . import lm, text
    from .prune import evaluate_perplexity, prune, save_pruned

    cfg, opts = ModelConfig(**values(ModelConfig, args)), PruneOptions(**values(PruneOptions, args))
    model, tokenizer = lm.load_model(cfg.model, device=torch_device(cfg.device))
    train_texts, held_texts = text.split_texts(text.load_texts(cfg.source))
    calib = text.pack_tokens(tokenizer, train_texts, context_size=cfg.context_size)
    gen = torch.Generator().manual_seed(cfg.seed)
    calib = calib[torch.randperm(len(calib), generator=gen)[: opts.n_calib]]
    held = text.pack_tokens(tokenizer, held_texts, context_size=cfg.context_size)[: opts.n_eval]
    if not len(calib):
        raise fail("the calibration text gives no context; pass more text or a smaller "
                   "--context-size")
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
    """Parse ``argv`` and run the chosen subcommand offline (nothing is downloaded)."""
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return int(args.func(args) or 0)


def build_parser() -> argparse.ArgumentParser:
    return command_parser("sparsecode", __doc__, add_prune_parser)


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
