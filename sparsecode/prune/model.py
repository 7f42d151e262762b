"""Pruning a whole model: calibration through hooks, block by block, layer allocation, perplexity.

:func:`prune` walks the decoder blocks in order. For each block it streams the calibration
batches through the block (its inputs are the outputs of the blocks already pruned), a forward
pre-hook on every target ``nn.Linear`` accumulates the input Gram ``X X^T`` (no activations are
stored beyond the current batch), then every target of the block is pruned in place with
:func:`~sparsecode.prune.layer.prune_layer`, and the batches are run through the pruned block to
give the next block its inputs.

Per-layer sparsities come from ``allocation``: ``"uniform"`` (every layer at the target) or
``"owl"`` (outlier-weighted layer-wise sparsity, Yin et al. 2024): a dense pass measures, per
block, the fraction of Wanda scores ``|W_ij| ||x_j||`` above ``owl_m`` times the block mean;
these ratios are mapped linearly onto ``[-owl_lambda, owl_lambda]``, centred, and blocks with
more outliers get proportionally lower sparsity (the mean over blocks stays the target).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..hooks import _StopForward, resolve
from ..lm import decoder_layers, device_of
from .layer import _LastGram, check_sparsity, parse_pattern, prune_layer, relative_error

__all__ = [
    "LayerReport",
    "PruneReport",
    "block_inputs",
    "evaluate_perplexity",
    "owl_sparsities",
    "prune",
    "run_block",
    "save_pruned",
    "semi_structured_available",
    "to_semi_structured",
    "token_batches",
    "with_hidden",
]


@dataclass
class LayerReport:
    """One pruned linear layer: achieved sparsity, relative output error, seconds spent."""

    name: str
    shape: tuple[int, int]
    target: float
    sparsity: float
    error: float  # ||X^T (W - W')^T||^2 / ||X^T W^T||^2 on the calibration inputs it saw
    seconds: float


@dataclass
class PruneReport:
    """What :func:`prune` did. ``masks`` (name -> bool keep-mask) only when asked for."""

    method: str
    pattern: str
    allocation: str
    target: float
    layers: list[LayerReport] = field(default_factory=list)
    seconds: float = 0.0
    calibration_tokens: int = 0
    masks: dict[str, Tensor] | None = None

    @property
    def sparsity(self) -> float:
        """Achieved sparsity over all pruned weights."""
        total = sum(r.shape[0] * r.shape[1] for r in self.layers)
        zeros = sum(r.sparsity * r.shape[0] * r.shape[1] for r in self.layers)
        return zeros / total if total else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("masks")
        d["achieved_sparsity"] = self.sparsity
        return d

    def __repr__(self) -> str:
        return (
            f"PruneReport(method={self.method!r}, pattern={self.pattern!r}, "
            f"allocation={self.allocation!r}, layers={len(self.layers)}, "
            f"sparsity={self.sparsity:.4f}, seconds={self.seconds:.1f})"
        )


def token_batches(calibration: Tensor | Iterable[Tensor], batch_size: int) -> list[Tensor]:
    """Calibration token ids ``(n, seq_len)`` (or an iterable of such batches) as a list of
    non-empty 2-D batches; ``ValueError`` when there are none."""
    if isinstance(calibration, Tensor):
        if calibration.dim() == 1:
            calibration = calibration[None]
        out = list(calibration.split(batch_size)) if calibration.numel() else []
    else:
        out = [t if t.dim() == 2 else t[None] for t in calibration]
        out = [t for t in out if t.numel()]
    if not out:
        raise ValueError("the calibration set is empty: pass token ids of shape (n, seq_len)")
    return out


def _forward_until_stop(model: nn.Module, batches: list[Tensor]) -> None:
    """Run every calibration batch through ``model``; a hook raising ``_StopForward`` ends a forward
    early (nothing after the point the hooks need is computed)."""
    dev = device_of(model)
    for ids in batches:
        try:
            model(input_ids=ids.to(dev), use_cache=False)
        except _StopForward:
            pass


def block_inputs(model: nn.Module, first: nn.Module, batches: list[Tensor]) -> list[tuple]:
    """``(args, kwargs)`` of the first decoder block for every calibration batch."""
    store: list[tuple] = []

    def grab(module: nn.Module, args: tuple, kwargs: dict) -> None:
        store.append((args, kwargs))
        raise _StopForward

    handle = first.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        _forward_until_stop(model, batches)
    finally:
        handle.remove()
    return store


def run_block(block: nn.Module, inp: tuple) -> Tensor:
    """The hidden states a decoder block returns for its recorded ``(args, kwargs)``."""
    args, kwargs = inp
    out = block(*args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def with_hidden(inp: tuple, hidden: Tensor) -> tuple:
    """A block's recorded ``(args, kwargs)`` with ``hidden`` as its hidden states: the next
    block's input."""
    args, kwargs = inp
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


class _GramHooks:
    """Forward pre-hooks accumulating ``sum x x^T`` (and the token count) of each module's input.

    Modules fed the very same tensor (q/k/v, gate/up) share one accumulator.
    """

    def __init__(self, modules: dict[str, nn.Module], diag_only: bool = False):
        self.grams: dict[str, Tensor] = {}
        self.owner: dict[str, bool] = {}
        self.tokens = 0
        self.diag_only = diag_only
        self._last: tuple[str, Tensor] | None = None
        self.handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in modules.items()]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            last = self._last
            if name not in self.grams and last is not None and last[1] is x:
                self.grams[name] = self.grams[last[0]]
                self.owner[name] = False
            if self.owner.get(name, True):
                x2 = x.detach().reshape(-1, x.shape[-1]).float()
                g = (x2 * x2).sum(0) if self.diag_only else x2.T @ x2
                if name in self.grams:
                    self.grams[name] += g
                else:
                    self.grams[name] = g
                    self.owner[name] = True
            self._last = (name, x)

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self._last = None


def _targets(block: nn.Module, targets: str | Sequence[str] | None) -> dict[str, nn.Module]:
    mods = dict(block.named_modules())
    names = resolve(block, targets) if targets is not None else list(mods)
    return {n: mods[n] for n in names if isinstance(mods[n], nn.Linear)}


def owl_sparsities(
    scores: Sequence[Sequence[Tensor]], target: float, m: float = 5.0, lam: float = 0.08
) -> list[float]:
    """OWL sparsity per block from each block's Wanda score matrices.

    ``D_b`` = fraction of block ``b``'s scores above ``m`` times their mean; sparsity
    ``s_b = target - (lam * 2 (D_b - min D) / (max D - min D) - mean(...))``.

    >>> import torch
    >>> s = owl_sparsities([[torch.ones(4, 4)], [torch.tensor([[100.0] + [1.0] * 15])]], 0.5)
    >>> [round(v, 2) for v in s]
    [0.58, 0.42]
    """
    ratios = []
    for mats in scores:
        flat = torch.cat([t.reshape(-1).float() for t in mats])
        ratios.append(float((flat > m * flat.mean()).float().mean()))
    lo, hi = min(ratios), max(ratios)
    if hi - lo <= 0:
        return [target] * len(ratios)
    scaled = [(r - lo) / (hi - lo) * 2 * lam for r in ratios]
    mean = sum(scaled) / len(scaled)
    out = [target - (v - mean) for v in scaled]
    return [min(max(v, 0.0), 0.99) for v in out]


def prune(
    model: nn.Module,
    calibration: Tensor | Iterable[Tensor],
    sparsity: float | None = None,
    method: str = "admm",
    pattern: str | tuple[int, int] | None = "unstructured",
    allocation: str = "uniform",
    *,
    targets: str | Sequence[str] | None = None,
    batch_size: int = 8,
    return_masks: bool = False,
    owl_m: float = 5.0,
    owl_lambda: float = 0.08,
    progress: bool = False,
    **options: Any,
) -> PruneReport:
    """Prune the ``nn.Linear`` layers of every decoder block of ``model`` in place.

    ``calibration``: token ids ``(n, seq_len)`` (split into ``batch_size`` rows) or an iterable
    of such batches. ``method``: ``admm`` (the default: ADMM on each layer's problem),
    ``alps``, ``iht``, ``omp`` (greedy, unstructured only), ``magnitude``, ``wanda`` or
    ``sparsegpt``.
    ``pattern``: ``"unstructured"`` or ``"N:M"`` (then the sparsity is ``1 - N/M``).
    ``allocation``: ``"uniform"`` or ``"owl"`` (unstructured only). ``targets``: module paths or
    globs *inside a block* (default: all its Linears, e.g. ``"self_attn.*"`` for attention only).
    Extra ``options`` go to the method (``blocksize``, ``percdamp`` for SparseGPT; ``max_iter``,
    ``rho``, ``init``, ``fix_mask``, ``per_row``, ``cg_iter`` for ADMM / ALPS; ``max_iter``,
    ``cg_iter``, ``ridge`` for IHT).

    Returns a :class:`PruneReport` with per-layer achieved sparsity, relative reconstruction error
    and time; with ``return_masks=True`` it holds the keep-masks too.
    """
    t_start = time.perf_counter()
    nm, sparsity = _check_settings(sparsity, method, pattern, allocation)
    batches = token_batches(calibration, batch_size)
    prefix, blocks = decoder_layers(model)
    block_targets = [_targets(b, targets) for b in blocks]
    if nm is not None:
        _check_nm_widths(prefix, block_targets, nm)
    pattern_name = "unstructured" if nm is None else f"{nm[0]}:{nm[1]}"
    report = PruneReport(method, pattern_name, allocation, sparsity,
                         calibration_tokens=sum(b.numel() for b in batches),
                         masks={} if return_masks else None)
    with torch.no_grad():
        per_block = [sparsity] * len(blocks)
        if allocation == "owl":
            per_block = _owl(model, blocks, block_targets, batches, sparsity, owl_m, owl_lambda)
        needs_data = method != "magnitude"  # magnitude needs no calibration forwards
        inputs = block_inputs(model, blocks[0], batches) if needs_data else []
        from tqdm.auto import tqdm

        try:
            for i, block in enumerate(tqdm(blocks, unit="block", desc=f"prune {method}",
                                           disable=not progress)):
                hooks = _GramHooks(block_targets[i])
                try:
                    for inp in inputs:
                        run_block(block, inp)
                finally:
                    hooks.remove()
                for name, mod in block_targets[i].items():
                    full = f"{prefix}.{i}.{name}" if prefix else f"{i}.{name}"
                    H = hooks.grams[name] if needs_data else None
                    _prune_one(mod, H, per_block[i], method, nm, full, report, options)
                inputs = [with_hidden(inp, run_block(block, inp)) for inp in inputs]
        finally:
            _LastGram.clear()  # the last Gram and its inverses are not needed any more
    report.seconds = time.perf_counter() - t_start
    return report


def _check_settings(sparsity: float | None, method: str, pattern: Any, allocation: str
                    ) -> tuple[tuple[int, int] | None, float]:
    """The N:M pattern (or None) and the target sparsity, after checking the settings."""
    from .layer import METHODS

    nm = parse_pattern(pattern)
    if sparsity is None:
        sparsity = 0.5 if nm is None else 1.0 - nm[0] / nm[1]
    sparsity = check_sparsity(sparsity)
    if nm is not None and not math.isclose(sparsity, 1.0 - nm[0] / nm[1]):
        raise ValueError(
            f"pattern {nm[0]}:{nm[1]} fixes the sparsity at {1 - nm[0] / nm[1]:g}; got {sparsity}"
        )
    if allocation not in ("uniform", "owl"):
        raise ValueError(f"allocation must be 'uniform' or 'owl', got {allocation!r}")
    if allocation == "owl" and nm is not None:
        raise ValueError("allocation='owl' is for unstructured sparsity, not N:M patterns")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return nm, sparsity


def _check_nm_widths(prefix: str, block_targets: list[dict[str, nn.Module]],
                     nm: tuple[int, int]) -> None:
    for i, tg in enumerate(block_targets):
        for name, mod in tg.items():
            if mod.in_features % nm[1]:
                raise ValueError(
                    f"layer {prefix}.{i}.{name}: input width {mod.in_features} is not "
                    f"divisible by M={nm[1]} of the {nm[0]}:{nm[1]} pattern"
                )


def _prune_one(mod: nn.Module, H: Tensor | None, sparsity: float, method: str,
               nm: tuple[int, int] | None, name: str, report: PruneReport,
               options: dict[str, Any]) -> None:
    """Prune one Linear in place from its input Gram ``H``; record it in ``report``."""
    t0 = time.perf_counter()
    W = mod.weight.data
    W_new, keep = prune_layer(W.float(), H, sparsity, method, nm, name=name, **options)
    err = relative_error(W.float(), W_new.float(), H) if H is not None else math.nan
    mod.weight.data.copy_(W_new.to(W.dtype))
    report.layers.append(LayerReport(
        name, tuple(W.shape), sparsity, float((W_new == 0).float().mean()), err,
        time.perf_counter() - t0))
    if report.masks is not None:
        report.masks[name] = keep.cpu()


def _owl(model, blocks, block_targets, batches, target, m, lam) -> list[float]:
    """Dense pass: input column norms of every target, then :func:`owl_sparsities`."""
    mods = {f"{i}.{n}": mod for i, tg in enumerate(block_targets) for n, mod in tg.items()}
    hooks = _GramHooks(mods, diag_only=True)

    def stop(module: nn.Module, args: tuple, output: Any) -> None:
        raise _StopForward  # nothing after the last block is needed

    last = blocks[-1].register_forward_hook(stop)
    try:
        _forward_until_stop(model, batches)
    finally:
        hooks.remove()
        last.remove()
    scores = []
    for i, tg in enumerate(block_targets):
        scores.append([mod.weight.abs().float() * hooks.grams[f"{i}.{n}"].sqrt()
                       for n, mod in tg.items()])
    return owl_sparsities(scores, target, m, lam)


def evaluate_perplexity(model: nn.Module, tokens: Tensor, batch_size: int = 4) -> float:
    """Perplexity ``exp(mean next-token cross-entropy)`` over contexts ``tokens (n, seq_len)``.

    Every position but the first of each context is predicted from the ones before it.
    """
    if tokens.dim() != 2 or tokens.shape[0] == 0 or tokens.shape[1] < 2:
        raise ValueError(
            f"tokens must have shape (n >= 1, seq_len >= 2), got {tuple(tokens.shape)}"
        )
    dev = device_of(model)
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in tokens.split(batch_size):
            ids = ids.to(dev)
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
            total += float(nll)
            count += ids[:, 1:].numel()
    return math.exp(total / count)


def save_pruned(model: nn.Module, path: str | Path, masks: dict[str, Tensor] | None = None) -> Path:
    """Write the model's weights to ``path`` (safetensors; tied weights stored once) and, if
    given, the keep-masks to ``<path stem>.masks.safetensors`` beside it."""
    from safetensors.torch import save_file, save_model

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, str(path))
    if masks:
        save_file({k: v.to(torch.uint8).contiguous() for k, v in masks.items()},
                  str(path.with_suffix(".masks.safetensors")))
    return path


def semi_structured_available() -> tuple[bool, str]:
    """Whether 2:4 weights can be exported to PyTorch semi-structured sparse tensors here."""
    if not torch.cuda.is_available():
        return False, "2:4 semi-structured export is unavailable: it needs a CUDA GPU (none here)"
    major, _ = torch.cuda.get_device_capability()
    if major < 8:
        return False, "2:4 semi-structured export is unavailable: it needs an Ampere or newer GPU"
    return True, "available"


def to_semi_structured(model: nn.Module, names: Iterable[str]) -> list[str]:
    """Replace the weights of the named (2:4-pruned, CUDA, fp16/bf16) Linears by
    ``torch.sparse.to_sparse_semi_structured`` tensors. Raises ``RuntimeError`` where that is
    unavailable (no CUDA); returns the names converted."""
    ok, why = semi_structured_available()
    if not ok:
        raise RuntimeError(why)
    from torch.sparse import to_sparse_semi_structured

    mods = dict(model.named_modules())
    done = []
    for name in names:
        mod = mods[name]
        mod.weight = nn.Parameter(to_sparse_semi_structured(mod.weight.data), requires_grad=False)
        done.append(name)
    return done
