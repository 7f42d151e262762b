"""Checkpoints with exact resume: everything a run needs to continue as if never stopped.

A checkpoint is a folder written atomically (:func:`sparsecode._files.atomic_folder`: a
reader or a crash sees the old checkpoint or the new one)::

    state.safetensors   sae/<name>/<tensor>       whole SAE state (latent shards gathered)
                        opt/<name>/<param>/<key>  Adam moments, by parameter name
                        rng/generator             the trainer's generator (Matryoshka prefixes)
    trainer.json        step, tokens, n_steps, input scales, the activation stream's position
                        (per rank when the stream is per process), configs, history, and the
                        SHA-256 of state.safetensors (written last: a folder without it is
                        incomplete)

A run resumes on any number of processes from the same checkpoint, except a live-model stream,
which is per process (the checkpoint says so).

Integrity: :func:`write` refuses non-finite weights or moments (a diverged state never replaces
the last good checkpoint); :func:`read` verifies the checksum and the finiteness of every tensor
and names the file on any failure. A crash between the two renames of an atomic folder write
leaves ``.checkpoint.*.old`` / ``.checkpoint.*.tmp`` siblings: :func:`recover` puts the newest
complete one back in place. :func:`check_same_run` refuses to resume with other settings.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import safetensors.torch as st
from torch import Tensor

from sparsecode._files import atomic_folder, fsync

from .config import SAEConfig, TrainConfig
from .integrity import check_finite_tensors, load_tensors, sha256

if TYPE_CHECKING:
    from .train import Trainer

STATE_FILE = "state.safetensors"
META_FILE = "trainer.json"
CHECKPOINT = "checkpoint"
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
        "batch_size": trainer.batch_size,
        "data_size": trainer._data_size,  # processes sharing a step: the global batch
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
    """Write a checkpoint folder atomically (files fsynced before the rename; the checksum of
    the tensors in ``trainer.json``, written last). Non-finite tensors are refused: the last
    good checkpoint stays in place."""
    check_finite_tensors({k: v for k, v in tensors.items() if not k.startswith("rng/")},
                         f"refusing to checkpoint to {path}")

    def write_meta(p: Path) -> None:
        meta["sha256"] = {STATE_FILE: sha256(p.parent / STATE_FILE)}
        p.write_text(json.dumps(meta, indent=1, allow_nan=False))

    return atomic_folder(path, {
        STATE_FILE: lambda p: st.save_file(tensors, str(p)),
        META_FILE: write_meta,
    })


def read(path: str | Path, *, verify: bool = True) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors and metadata of a checkpoint folder, checked: complete, checksum
    matching (checkpoints from before checksums are accepted), every weight and moment finite.
    Errors name the file."""
    path = Path(path)
    meta_path, state_path = path / META_FILE, path / STATE_FILE
    if not meta_path.exists():
        raise FileNotFoundError(f"no checkpoint at {path} (expected {META_FILE})")
    try:
        meta = json.loads(meta_path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{meta_path} is not valid JSON ({e}): the checkpoint is damaged") from e
    if not isinstance(meta, dict) or not {"step", "tokens", "saes"} <= set(meta):
        raise ValueError(f"{meta_path} is not a checkpoint's {META_FILE} (missing step, tokens "
                         "or saes)")
    if not state_path.is_file():
        raise FileNotFoundError(f"{state_path} is missing: the checkpoint is incomplete")
    want = (meta.get("sha256") or {}).get(STATE_FILE)
    if verify and want is not None and sha256(state_path) != want:
        raise ValueError(f"{state_path} does not match the checksum in {meta_path}: the "
                         "checkpoint is corrupted")
    tensors = load_tensors(state_path)
    if verify:
        check_finite_tensors({k: v for k, v in tensors.items() if not k.startswith("rng/")},
                             str(state_path))
    return tensors, meta


def _candidates(out_dir: Path) -> list[Path]:
    """The checkpoint folder and the leftovers of an interrupted atomic write of it."""
    found = [out_dir / CHECKPOINT] if (out_dir / CHECKPOINT).is_dir() else []
    found += sorted(p for p in out_dir.glob(f".{CHECKPOINT}.*")
                    if p.is_dir() and p.name.endswith((".tmp", ".old")))
    return found


def has_checkpoint(out_dir: str | Path) -> bool:
    """Does ``out_dir`` hold a checkpoint, or a leftover of one?"""
    return bool(_candidates(Path(out_dir)))


def recover(out_dir: str | Path) -> Path | None:
    """Put the newest complete, verified checkpoint of ``out_dir`` at ``out_dir/checkpoint``
    (a crash between the renames of an atomic write leaves it as a ``.checkpoint.*.tmp`` or
    ``.old`` sibling), remove the other leftovers and return its path; None when there is none.
    Raises ``ValueError`` when checkpoints exist but none is intact, naming why."""
    out_dir = Path(out_dir)
    found = _candidates(out_dir)
    if not found:
        return None
    good: list[tuple[int, int, Path]] = []
    errors = []
    for p in found:
        try:
            _, meta = read(p)
        except (OSError, ValueError) as e:
            errors.append(str(e))
            continue
        # newest step first; at equal steps the folder in place, then .tmp (newer) over .old
        order = 0 if p.name == CHECKPOINT else 1 if p.name.endswith(".tmp") else 2
        good.append((-int(meta["step"]), order, p))
    if not good:
        raise ValueError("no intact checkpoint in " + str(out_dir) + ": " + "; ".join(errors))
    best = min(good)[2]
    target = out_dir / CHECKPOINT
    if best != target:
        if target.exists():
            os.replace(target, out_dir / f".{CHECKPOINT}.damaged.old")
        os.replace(best, target)
        fsync(out_dir)
    for p in _candidates(out_dir):
        if p != target:
            shutil.rmtree(p, ignore_errors=True)
    return target


#: TrainConfig fields that may change on resume (bookkeeping, not the optimisation).
MAY_CHANGE = frozenset({"progress", "wandb", "wandb_project", "eval_every", "log_every",
                        "checkpoint_every"})


def _flag(cls: type, name: str) -> str:
    for f in fields(cls):
        if f.name == name:
            return "--" + f.metadata.get("flag", name).replace("_", "-")
    return name


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def check_same_run(trainer: Trainer, meta: dict[str, Any]) -> None:
    """Refuse (``ValueError`` naming the settings and their flags) to resume a checkpoint with
    other training, SAE or batch settings than it was written with."""
    diff = []
    saved_train = meta.get("train_config") or {}
    now = asdict(trainer.cfg)
    for key, value in now.items():
        if key in MAY_CHANGE or key not in saved_train:
            continue
        if not _same(saved_train[key], value):
            diff.append(f"{_flag(TrainConfig, key)} {saved_train[key]!r} (now {value!r})")
    if meta.get("batch_size") is not None and trainer.batch_size is not None:
        # the global batch (rows per step over all data-parallel processes) must not change; a
        # run on two processes may resume on one with twice the batch
        saved = meta["batch_size"] * meta.get("data_size", 1)
        if saved != trainer.batch_size * trainer._data_size:
            diff.append(f"--batch-size {saved!r} (now {trainer.batch_size * trainer._data_size!r}"
                        " rows per step over all processes)")
    for name, sae in trainer.saes.items():
        saved = (meta.get("saes", {}).get(name) or {}).get("config", {})
        for key, value in sae.cfg.to_dict().items():
            if key in ("metadata", "dead_tokens") or key not in saved:
                continue
            if not _same(saved[key], value):
                diff.append(f"{_flag(SAEConfig, key)} {saved[key]!r} (now {value!r}) of SAE "
                            f"{name!r}")
    if diff:
        raise ValueError("the checkpoint was written with other settings: " + "; ".join(diff)
                         + ". Resume with the settings it was written with, or start over "
                         "with --force")


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
        for key in MUST_MATCH:
            if meta["saes"][name]["config"].get(key) != getattr(sae.cfg, key):
                raise ValueError(
                    f"checkpoint SAE {name!r} has {key}={meta['saes'][name]['config'].get(key)!r}, "
                    f"this run has {getattr(sae.cfg, key)!r}"
                )
    check_same_run(trainer, meta)
    for name, sae in trainer.saes.items():
        saved = meta["saes"][name]
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
