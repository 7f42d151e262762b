"""Calibration: per-group score distributions, uniform and greedy allocation, held-out sparsity.

:func:`calibrate` runs calibration text through the dense model once. Hooks find which
Linears share an input (one forward of one context) and keep, per group, a random sample of
the scores its rule thresholds (``2**17`` values from up to 64 tokens of each batch), sorted, so
that the threshold for any sparsity ``s`` is the sample's ``s``-quantile (TEAL's calibration:
thresholds from the empirical distribution of the activations).

Allocation (:meth:`Calibration.plan`):

* ``"uniform"``: every group at the target sparsity.
* ``"greedy"`` (TEAL's block-wise greedy): inside each decoder block, starting from no
  sparsity, repeatedly raise one group's sparsity by 0.05, the group whose raise costs the least
  increase of the block's relative output error per weight column skipped, until the block's
  parameter-weighted sparsity reaches the target (the last raise is cut to land on it). Blocks
  are calibrated on their dense inputs. TEAL picks the least error increase; dividing by the
  weights skipped is the greedy step for a target counted in weights, which is what decoding
  reads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from ..hooks import resolve
from ..lm import decoder_layers, device_of
from ..prune.model import block_inputs, run_block, token_batches, with_hidden
from .allocation import global_levels, loss_curves
from .attach import ActivationSparsity
from .rules import METHODS, Group, column_norms, find_groups, mlp_inputs, principal_rotation

__all__ = ["Calibration", "calibrate", "measure_sparsity", "sparsify_activations"]

SAMPLE = 2**17  # scores kept per group
TOKENS_PER_BATCH = 64  # tokens per batch whose scores enter the sample
STEP = 0.05  # greedy sparsity increment
MAX_SPARSITY = 0.95  # no group goes beyond this in the greedy search
ALLOCATIONS = ("uniform", "greedy", "global")


@dataclass
class Calibration:
    """The dense model's score samples per group (see the module docstring)."""

    model: nn.Module
    method: str
    groups: list[Group]
    samples: dict[str, Tensor]  # group name -> sorted score sample
    batches: list[Tensor]
    greedy_tokens: int = 1024  # tokens each block's greedy search runs on
    block_tokens: int = 2048  # tokens the thresholds are refitted on
    _paths: dict[str, list[dict[str, float]]] = field(default_factory=dict, repr=False)
    _curves: dict[str, Tensor] | None = field(default=None, repr=False)

    def threshold(self, group: Group, sparsity: float) -> float:
        """The score below which a ``sparsity`` fraction of the group's entries falls."""
        s = self.samples[group.name]
        if sparsity <= 0 or not s.numel():
            return 0.0
        return float(s[min(int(sparsity * s.numel()), s.numel() - 1)])

    def rule(self, group: Group, sparsity: float) -> Group:
        """``group`` with the rule for ``sparsity``: a threshold, or ``k`` for top-k."""
        if self.method == "topk":
            return replace(group, k=max(1, round((1 - sparsity) * group.width)),
                           sparsity=sparsity)
        return replace(group, threshold=self.threshold(group, sparsity), sparsity=sparsity)

    def plan(self, sparsity: float, allocation: str = "uniform") -> ActivationSparsity:
        """Rules for a target ``sparsity`` (not attached)."""
        _check_sparsity(sparsity)
        if allocation == "uniform":
            levels = {g.name: sparsity for g in self.groups}
        elif allocation == "greedy":
            levels = self._greedy(sparsity)
        elif allocation == "global":
            if self._curves is None:
                self._curves = loss_curves(self.model, self.groups, self.batches,
                                           self.threshold)
            levels = global_levels(self._curves, self.groups, sparsity)
        else:
            raise ValueError(f"allocation must be one of {', '.join(ALLOCATIONS)}; got "
                             f"{allocation!r}")
        groups = [self.rule(g, levels[g.name]) for g in self.groups]
        if self.method != "topk":
            groups = self._refit(groups)
        return ActivationSparsity(self.method, allocation, sparsity, groups)

    def _refit(self, groups: list[Group]) -> list[Group]:
        """Thresholds re-measured in forward order with the rules before each group applied:
        sparsifying earlier activations shrinks later ones, so thresholds from the dense model
        would overshoot the target (by 9 points at 40% on a random 2-block LLaMA). Block by
        block on ``block_tokens`` tokens, as the pruner feeds each block the pruned blocks'
        outputs; each group's threshold is the quantile of all its scores there."""
        prefix, blocks = decoder_layers(self.model)
        ids = torch.cat(self.batches)
        inputs = block_inputs(self.model, blocks[0],
                              list(ids[:max(1, self.block_tokens // ids.shape[1])].split(4)))
        mods = dict(self.model.named_modules())
        done: list[Group] = [g for g in groups if not g.name.startswith(prefix + ".")]
        for i, block in enumerate(blocks):
            for g in _in_block(groups, prefix, i):
                parts: list[Tensor] = []
                handle = g.watch(mods, lambda x, g=g, parts=parts: parts.append(g.score(x).cpu()))
                try:
                    with ActivationSparsity(self.method, "", 0.0, done).attached(self.model), \
                            torch.no_grad():
                        for inp in inputs:
                            run_block(block, inp)
                finally:
                    handle.remove()
                done.append(replace(g, threshold=_quantile(torch.cat(parts), g.sparsity)))
            with ActivationSparsity(self.method, "", 0.0, done).attached(self.model), \
                    torch.no_grad():
                inputs = [with_hidden(inp, run_block(block, inp)) for inp in inputs]
        order = {g.name: j for j, g in enumerate(groups)}
        return sorted(done, key=lambda g: order[g.name])

    def _greedy(self, target: float) -> dict[str, float]:
        """Per-group sparsities of the block-wise greedy search for ``target``. Each block's
        search path (levels after every raise) is kept, so later targets below the longest
        path reuse it and higher ones extend it."""
        prefix, blocks = decoder_layers(self.model)
        levels: dict[str, float] = {}
        ids = torch.cat(self.batches)
        n_ctx = max(1, self.greedy_tokens // ids.shape[1])
        inputs = None
        for i, block in enumerate(blocks):
            mine = _in_block(self.groups, prefix, i)
            if not mine:
                continue
            path = self._paths.setdefault(str(i), [{g.name: 0.0 for g in mine}])
            if _weighted(path[-1], mine) < target - 1e-9 and not _stuck(path[-1]):
                if inputs is None:
                    inputs = block_inputs(self.model, blocks[0], [ids[:n_ctx]])
                    done = 0
                with torch.no_grad():
                    for j in range(done, i):  # dense inputs of block i
                        inputs = [with_hidden(inp, run_block(blocks[j], inp))
                                  for inp in inputs]
                    done = i
                    self._extend(path, block, inputs, mine, target)
            levels.update(_cut(path, mine, target))
        return levels

    def _extend(self, path, block, inputs, groups, target) -> None:
        """Raise one group at a time (least error increase per weight skipped) from the end of
        ``path`` until the block's weighted sparsity reaches ``target``."""
        dense = [run_block(block, inp).float() for inp in inputs]
        ref = max(sum(float((y ** 2).sum()) for y in dense), 1e-30)

        def error(trial: dict[str, float]) -> float:
            plan = ActivationSparsity(self.method, "greedy", target,
                                      [self.rule(g, trial[g.name]) for g in groups])
            with plan.attached(self.model):
                return sum(float(((run_block(block, inp).float() - y) ** 2).sum())
                           for inp, y in zip(inputs, dense, strict=True)) / ref

        level, current = path[-1], error(path[-1])
        while _weighted(level, groups) < target - 1e-9:
            best = None
            for g in groups:
                if level[g.name] + 1e-9 >= MAX_SPARSITY:
                    continue
                trial = {**level, g.name: min(level[g.name] + STEP, MAX_SPARSITY)}
                err = error(trial)
                cost = (err - current) / (g.params * (trial[g.name] - level[g.name]))
                if best is None or cost < best[0]:
                    best = (cost, trial, err)
            if best is None:
                break
            _, level, current = best
            path.append(level)


def _in_block(groups: list[Group], prefix: str, i: int) -> list[Group]:
    """The groups inside decoder block ``i`` (module paths under ``prefix.i.``)."""
    return [g for g in groups if g.name.startswith(f"{prefix}.{i}.")]


def _weighted(level: dict[str, float], groups: list[Group]) -> float:
    """Parameter-weighted sparsity of ``groups`` at per-group ``level``."""
    return sum(level[g.name] * g.params for g in groups) / sum(g.params for g in groups)


def _stuck(level: dict[str, float]) -> bool:
    return all(v + 1e-9 >= MAX_SPARSITY for v in level.values())


def _cut(path: list[dict[str, float]], groups: list[Group], target: float) -> dict[str, float]:
    """The first levels on ``path`` reaching ``target``, the last raise cut to land on it."""
    if _weighted(path[0], groups) >= target - 1e-9:
        return dict(path[0])
    for prev, level in zip(path, path[1:], strict=False):
        if _weighted(level, groups) >= target - 1e-9:
            over = (_weighted(level, groups) - target) * sum(g.params for g in groups)
            (g,) = [g for g in groups if level[g.name] != prev[g.name]]
            return {**level, g.name: level[g.name] - over / g.params}
    return dict(path[-1])


def _check_sparsity(sparsity: float) -> None:
    if not (isinstance(sparsity, (int, float)) and 0.0 <= sparsity < 1.0):
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")


def _linears(model: nn.Module, layers: str | Sequence[str] | None) -> list[str]:
    """The ``nn.Linear`` module paths named by ``layers`` (default: all inside the decoder
    blocks)."""
    mods = dict(model.named_modules())
    if layers is None:
        prefix, _ = decoder_layers(model)
        layers = f"{prefix}.*.**" if prefix else "*.**"
    names = [n for n in resolve(model, layers) if isinstance(mods[n], nn.Linear)]
    if not names:
        raise ValueError(f"{layers!r} matches modules of {type(model).__name__} but no "
                         "nn.Linear; name Linear layers, e.g. 'model.layers.*.mlp.*'")
    return names


def _first_inputs(model: nn.Module, names: list[str], ids: Tensor) -> dict[str, Tensor]:
    """The input tensor of each Linear in one forward of one context (shared inputs are the
    same object)."""
    mods = dict(model.named_modules())
    seen: dict[str, Tensor] = {}

    def grab(name):
        def hook(module, args):
            seen.setdefault(name, args[0])
        return hook

    handles = [mods[n].register_forward_pre_hook(grab(n)) for n in names]
    try:
        with torch.no_grad():
            model(input_ids=ids[:1].to(device_of(model)), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return seen


def _quantile(scores: Tensor, q: float) -> float:
    """The ``q``-quantile of ``scores`` (0 for ``q <= 0``): the threshold dropping a ``q``
    fraction of them."""
    flat = scores.flatten()
    if q <= 0 or not flat.numel():
        return 0.0
    return float(flat.kthvalue(min(max(1, round(q * flat.numel())), flat.numel())).values)


def _watched_forward(model: nn.Module, groups: list[Group],
                     make: Callable[[Group], Callable[[Tensor], None]], batches: list[Tensor]
                     ) -> None:
    """One no-grad forward of ``batches`` with ``make(g)`` watching each group's activation
    (:meth:`Group.watch`); the hooks are removed after, also on error."""
    mods = dict(model.named_modules())
    handles = [g.watch(mods, make(g)) for g in groups]
    try:
        with torch.no_grad():
            for ids in batches:
                model(input_ids=ids.to(device_of(model)), use_cache=False)
    finally:
        for h in handles:
            h.remove()


def _rotate(model: nn.Module, groups: list[Group], batches: list[Tensor]) -> None:
    """Give every gated-MLP input group the principal rotation of its calibration inputs (one
    forward pass accumulating their Grams)."""
    mine = mlp_inputs(model, groups)
    if not mine:
        raise ValueError(
            "rotate=True rotates the input of gated MLPs (gate_proj, up_proj, down_proj and an "
            "act_fn module), but none of the selected layers is the gate_proj of one in "
            f"{type(model).__name__}; use rotate=False")
    grams = {g.name: torch.zeros(g.width, g.width, dtype=torch.float64) for g in mine}

    def add(g: Group):
        def hook(x: Tensor) -> None:
            x2 = x.detach().reshape(-1, x.shape[-1]).double().cpu()
            grams[g.name].add_(x2.T @ x2)
        return hook

    _watched_forward(model, mine, add, batches)
    for g in mine:
        g.rotation = principal_rotation(grams[g.name])


def _sample_scores(model: nn.Module, groups: list[Group], batches: list[Tensor], seed: int
                   ) -> dict[str, Tensor]:
    """Sorted random samples of each group's scores on the dense model."""
    gen = torch.Generator().manual_seed(seed)
    parts: dict[str, list[Tensor]] = {g.name: [] for g in groups}

    def keep(g: Group):
        def add(x: Tensor) -> None:
            x2 = x.detach().reshape(-1, x.shape[-1])
            pick = torch.randperm(x2.shape[0], generator=gen)[:TOKENS_PER_BATCH]
            parts[g.name].append(g.score(x2[pick.to(x2.device)]).flatten().cpu())
        return add

    _watched_forward(model, groups, keep, batches)
    out = {}
    for name, p in parts.items():
        s = torch.cat(p)
        if s.numel() > SAMPLE:
            s = s[torch.randperm(s.numel(), generator=gen)[:SAMPLE]]
        out[name] = s.sort().values
    return out


def calibrate(model: nn.Module, calibration: Tensor | Sequence[Tensor], method: str = "magnitude",
              layers: str | Sequence[str] | None = None, batch_size: int = 4, seed: int = 0,
              rotate: bool = False) -> Calibration:
    """Score samples of every sparsified activation of ``model`` on ``calibration`` token ids
    ``(n, seq_len)``; ``layers``: Linear paths or globs (default: every Linear in the decoder
    blocks); ``rotate``: the rule of each gated MLP's input acts in the principal basis of its
    calibration inputs (LaRoSA, :mod:`sparsecode.activations.rules`). The samples serve every
    later :meth:`Calibration.plan` at any sparsity.

    >>> import torch, transformers
    >>> cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
    ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
    >>> model = transformers.LlamaForCausalLM(cfg).eval()
    >>> cal = calibrate(model, torch.randint(0, 64, (4, 16)), layers="model.layers.*.mlp.*")
    >>> [g.name for g in cal.groups]
    ['model.layers.0.mlp.gate_proj', 'model.layers.0.mlp.down_proj']
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    names = _linears(model, layers)
    batches = token_batches(calibration, batch_size)
    groups = find_groups(model, names, _first_inputs(model, names, batches[0]), method)
    if rotate:
        _rotate(model, groups, batches)
    if method == "wina":
        for g in groups:
            g.scale = column_norms(model, g)
    return Calibration(model, method, groups, _sample_scores(model, groups, batches, seed),
                       batches)


def measure_sparsity(plan: ActivationSparsity, model: nn.Module, tokens: Tensor,
                     batch_size: int = 4) -> dict[str, float]:
    """Fraction of zero entries of each group's sparse coordinates (:meth:`Group.coords`: in
    the rotated basis for a rotated rule) on ``tokens``, with the rules attached (the weight
    columns a sparse-input Linear skips)."""
    mods = dict(model.named_modules())
    zeros = {g.name: 0 for g in plan.groups}
    count = {g.name: 0 for g in plan.groups}

    def counter(g: Group):
        op = g.operator()

        def add(x: Tensor) -> None:
            z = g.coords(x, op)
            zeros[g.name] += int((z == 0).sum())
            count[g.name] += z.numel()
        return add

    # registered before the rules' hooks: each counter sees its input before the rule
    handles = [g.watch(mods, counter(g)) for g in plan.groups]
    try:
        with plan.attached(model), torch.no_grad():
            for ids in token_batches(tokens, batch_size):
                model(input_ids=ids.to(device_of(model)), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {n: zeros[n] / max(count[n], 1) for n in zeros}


def sparsify_activations(
    model: nn.Module,
    calibration: Tensor | Sequence[Tensor],
    sparsity: float = 0.4,
    method: str = "magnitude",
    allocation: str = "greedy",
    layers: str | Sequence[str] | None = None,
    heldout: Tensor | None = None,
    batch_size: int = 4,
    rotate: bool = False,
) -> ActivationSparsity:
    """Calibrate activation sparsity on ``calibration`` token ids ``(n, seq_len)`` and attach
    it to ``model`` (hooks; ``.remove()`` makes the model dense again). With ``heldout`` token
    ids the achieved sparsity of every group is measured there (``.achieved``).

    ``sparsity``: fraction of each sparsified activation set to zero (weighted by the weights
    that read it); ``method``: ``"magnitude"`` (TEAL), ``"wina"``, ``"cats"``, ``"topk"``;
    ``allocation``: ``"greedy"`` (TEAL's block-wise search, the most accurate on SmolLM2-135M:
    docs/activation_sparsity.md; about 4 minutes there on 2 CPU cores), ``"global"`` (from
    one backward pass) or ``"uniform"``; ``layers``: Linear paths or globs (default: every
    Linear in the decoder blocks); ``rotate``: sparsify each gated MLP's input in the
    principal basis of its calibration inputs (LaRoSA: lower perplexity at the same sparsity,
    one ``width x width`` product per token more; docs/activation_sparsity.md).
    """
    _check_sparsity(sparsity)
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {', '.join(ALLOCATIONS)}; got "
                         f"{allocation!r}")
    cal = calibrate(model, calibration, method, layers, batch_size, rotate=rotate)
    plan = cal.plan(sparsity, allocation)
    if heldout is not None:
        plan.achieved = measure_sparsity(plan, model, heldout, batch_size)
    return plan.attach(model)
