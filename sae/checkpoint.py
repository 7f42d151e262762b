"""Checkpoints with exact resume: everything a run needs to continue as if never stopped.

A checkpoint is a folder written atomically (:func:`sparsecode._files.atomic_folder`: a
reader or a crash sees the old checkpoint or the new one)::

    state.safetensors   sae/<name>/<tensor>       whole SAE state (latent shards gathered)
                        opt/<name>/<param>/<key>  Adam moments, by parameter name
                        rng/generator             the trainer's generator (Matryoshka prefixes)
    trainer.json        step, tokens, n_steps, input scales, the activation stream's position
                        (per rank when the stream is per process), configs, history

A run resumes on any number of processes from the same checkpoint, except a live-model stream,
which is per process (the checkpoint says so).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import safetensors.torch as st
from torch import Tensor

from sparsecode._files import atomic_folder

if TYPE_CHECKING:
    from .train import Trainer

STATE_FILE = "state.safetensors"
META_FILE = "trainer.json"
#: Settings a resumed run must share with the checkpoint (the SAE's shape and selection).
MUST_MATCH = ("d_in", "d_sae", "architecture", "k", "d_out", "transcode", "skip", "places")


def capture(trainer: Trainer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Tensors (weights, buffers, Adam moments, RNG) and the JSON-able rest. Distributed:
    collective (whole SAEs, shards gathered; every rank's stream position)."""
    source_state = trainer.source_state()
    meta: dict[str, Any] = {
        "step": trainer.step,
        "tokens": trainer.tokens,
        "n_steps": trainer.n_steps,
        "scales": trainer.scales,
        "source": source_state,
        "train_config": asdict(trainer.cfg),
        "saes": {},
        "history": trainer.history,
    }
    if trainer.dist is not None:
        import torch.distributed as torch_dist

        states: list[Any] = [None] * trainer.dist.world
        torch_dist.all_gather_object(states, source_state)
        if any(st != states[0] for st in states):  # per-rank streams (live model)
            meta["source_ranks"] = states
    tensors: dict[str, Tensor] = {}
    for name, sae in trainer.saes.items():
        whole = sae.collective.whole
        for key, t in sae.state_dict().items():
            tensors[f"sae/{name}/{key}"] = whole(key, t.detach()).contiguous()
        meta["saes"][name] = {"config": sae.cfg.to_dict()}
        if name in trainer.optimizers:  # an online learner keeps its state in SAE buffers
            meta["saes"][name].update(_capture_optimizer(sae, name, trainer.optimizers[name],
                                                         tensors))
    tensors["rng/generator"] = trainer.generator.get_state()
    return tensors, meta


def _capture_optimizer(sae: Any, name: str, optimizer: Any, tensors: dict[str, Tensor]
                       ) -> dict[str, Any]:
    """The optimiser's moments into ``tensors`` (by parameter name); the JSON-able rest."""
    opt_state = optimizer.state_dict()
    pnames = [n for n, _ in sae.named_parameters()]
    scalars: dict[str, Any] = {}
    for idx, state in opt_state["state"].items():
        for key, v in state.items():
            if isinstance(v, Tensor):
                v = sae.collective.whole(pnames[idx], v) if v.dim() else v
                tensors[f"opt/{name}/{pnames[idx]}/{key}"] = v.detach().contiguous()
            else:
                scalars[f"{pnames[idx]}/{key}"] = v
    return {"param_groups": opt_state["param_groups"], "opt_scalars": scalars}


def write(path: str | Path, tensors: dict[str, Tensor], meta: dict[str, Any]) -> Path:
    """Write a checkpoint folder atomically (files fsynced before the rename)."""
    text = json.dumps(meta, indent=1)
    return atomic_folder(path, {
        STATE_FILE: lambda p: st.save_file(tensors, str(p)),
        META_FILE: lambda p: p.write_text(text),
    })


def read(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors and metadata of a checkpoint folder."""
    path = Path(path)
    if not (path / META_FILE).exists():
        raise FileNotFoundError(f"no checkpoint at {path} (expected {META_FILE})")
    meta = json.loads((path / META_FILE).read_text())
    return st.load_file(str(path / STATE_FILE)), meta


def _param_name(key: str, pnames: list[str]) -> str:
    """Parameter name of an optimiser-state key (older checkpoints keyed by position)."""
    return pnames[int(key)] if key.isdigit() else key


def _optimizer_state(sae: Any, name: str, tensors: dict[str, Tensor], saved: dict[str, Any],
                     device: Any) -> dict[str, Any]:
    """The optimiser's ``state_dict`` for this process's part of SAE ``name``."""
    pnames = [n for n, _ in sae.named_parameters()]
    index = {p: i for i, p in enumerate(pnames)}
    state: dict[int, dict[str, Any]] = {}
    prefix = f"opt/{name}/"
    for k, v in tensors.items():
        if k.startswith(prefix):
            pname, key = k[len(prefix):].split("/")
            pname = _param_name(pname, pnames)
            v = sae.collective.part(pname, v) if v.dim() else v
            state.setdefault(index[pname], {})[key] = v.to(device)
    for k, v in saved["opt_scalars"].items():
        pname, key = k.split("/")
        state.setdefault(index[_param_name(pname, pnames)], {})[key] = v
    return {"state": state, "param_groups": saved["param_groups"]}


def restore(trainer: Trainer, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    """Load a checkpoint into ``trainer`` (same SAEs, same source)."""
    if set(meta["saes"]) != set(trainer.saes):
        raise ValueError(
            f"checkpoint has SAEs {sorted(meta['saes'])}, this run has {sorted(trainer.saes)}"
        )
    for name, sae in trainer.saes.items():
        saved = meta["saes"][name]
        for key in MUST_MATCH:
            if saved["config"].get(key) != getattr(sae.cfg, key):
                raise ValueError(
                    f"checkpoint SAE {name!r} has {key}={saved['config'].get(key)!r}, "
                    f"this run has {getattr(sae.cfg, key)!r}"
                )
        sae.cfg.dead_tokens = saved["config"]["dead_tokens"]
        prefix = f"sae/{name}/"
        sae.load_state_dict({k[len(prefix):]: sae.collective.part(k[len(prefix):], v)
                             for k, v in tensors.items() if k.startswith(prefix)})
        if name in trainer.optimizers:
            trainer.optimizers[name].load_state_dict(
                _optimizer_state(sae, name, tensors, saved, trainer.device))
    trainer.step = meta["step"]
    trainer.tokens = meta["tokens"]
    trainer.n_steps = meta["n_steps"]
    trainer.scales = {k: {side: [float(f) for f in v[side]] for side in ("in", "out")}
                      for k, v in meta["scales"].items()}
    trainer.history = meta.get("history", [])
    trainer.restore_source(_source_state(trainer, meta))
    trainer.generator.set_state(tensors["rng/generator"])


def _source_state(trainer: Trainer, meta: dict[str, Any]) -> dict:
    """This process's stream position (per-rank streams need the same number of processes)."""
    if "source_ranks" not in meta:
        return meta["source"]
    world = trainer.dist.world if trainer.dist is not None else 1
    if len(meta["source_ranks"]) != world:
        raise ValueError(
            f"this checkpoint's activation stream is per process (a live model, "
            f"{len(meta['source_ranks'])} processes): resume it with the same number "
            f"of processes, not {world} (cached or .npy activations resume on any)"
        )
    return meta["source_ranks"][trainer.dist.rank if trainer.dist else 0]
