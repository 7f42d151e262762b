"""Save and load SAEs as SAELens folders (read by SAELens, SAEBench, Neuronpedia tooling), and
load any SAE folder: SAELens', sparsify's (:mod:`sae.io_convert`, which also turns SAELens'
conventions and learned dictionaries into SAEs) or a crosscoder's (:mod:`sae.io_crosscoder`).
Never pickles.

SAELens folder (written in the v6 layout; v6 and the older flat ``cfg.json`` are read)::

    cfg.json                  architecture ("standard" | "topk" | "jumprelu"), d_in, d_sae, dtype,
                              device, apply_b_dec_to_input, normalize_activations,
                              reshape_activations, [k, rescale_acts_by_decoder_norm], metadata
    sae_weights.safetensors   W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc [d_sae], b_dec [d_in],
                              threshold [d_sae] (jumprelu)
    sparsity.safetensors      {"sparsity": log10 firing density [d_sae]} (when statistics exist)
    checksums.json            {"sha256": {file name: hex}} of the safetensors files (ours; SAELens
                              ignores it), verified on load: a damaged file is refused by name

Every architecture is saved as its inference form (:attr:`sae.models.SAE.inference_architecture`):
relu as ``standard``, topk as ``topk``, and jumprelu and the batch architectures as ``jumprelu``
with their (running) threshold. ``metadata`` keeps the SAE's own metadata (hook_name, model_name,
...), SAELens' ``training_architecture`` and ``sae_lens_version`` (the format marker SAELens needs
to read the file as v6), and a ``sparsecode`` entry: ``{"version", "architecture",
"input_scale", "config"}`` with the full :class:`~sae.models.SAEConfig`.

Writes are atomic: the folder is written next to its destination under a temporary name and
renamed into place only when complete.

Example
-------
>>> import tempfile, torch
>>> from sae.models import SAE, SAEConfig
>>> sae = SAE(SAEConfig(d_in=8, d_sae=32, architecture="topk", k=4))
>>> with tempfile.TemporaryDirectory() as tmp:
...     path = save_sae(sae, Path(tmp) / "layer3", metadata={"hook_name": "model.layers.3"})
...     again = load(path)
>>> x = torch.randn(5, 8)
>>> torch.equal(again.encode(x), sae.encode(x)), again.cfg.metadata["hook_name"]
(True, 'model.layers.3')
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import safetensors.torch as st
import torch
from torch import Tensor

from sparsecode import __version__
from sparsecode._files import atomic_folder, is_temporary

from . import wiring
from .architectures import ARCHITECTURES, LOADED_AS, RUNNING_THRESHOLDS
from .config import SAEConfig
from .integrity import (
    CHECKSUMS_FILENAME,
    check_finite_tensors,
    checksum_writer,
    load_tensors,
    verify_checksums,
)
from .metrics import log_density
from .models import SAE

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
SPARSITY_FILENAME = "sparsity.safetensors"
SPARSIFY_WEIGHTS_FILENAME = "sae.safetensors"

#: The ``architecture`` of a crosscoder folder (our layout: :mod:`sae.io_crosscoder`).
CROSSCODER = "crosscoder"
#: SAELens reads ``cfg.json`` as v6 only when ``metadata.sae_lens_version`` is at least 6.
SAELENS_FORMAT_VERSION = "6.0.0"
#: SAELens inference architecture -> the architecture of the loaded :class:`SAE`.
SAELENS_ARCHITECTURES = LOADED_AS

_CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(SAEConfig))


# ---------------------------------------------------------------------------------- helpers
def _count(value: Any, key: str, cfg_path: Path) -> int:
    """A positive integer setting of ``cfg.json`` (an integral float such as 8.0 is read as 8;
    7.9, a string or a boolean is refused)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{cfg_path}: {key!r} must be a positive integer, got {value!r}")
    return value


def _check_recorded(form: str, meta: Mapping[str, Any], cfg_path: Path) -> None:
    """A folder we wrote records the architecture it was saved from: its SAELens form must be
    the one ``cfg.json`` names (an edited or damaged ``architecture`` would load another
    function)."""
    ours = meta.get("sparsecode")
    name = ours.get("architecture") if isinstance(ours, Mapping) else None
    arch = ARCHITECTURES.get(name) if isinstance(name, str) else None
    if arch is not None and arch.saelens != form:
        raise ValueError(f"{cfg_path}: 'architecture' gives a {form!r} SAE but the file was saved "
                         f"from a {name!r} SAE, whose SAELens form is {arch.saelens!r}")


def _as_dtype(value: Any) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    dt = getattr(torch, str(value).removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise ValueError(f"unknown floating-point dtype {value!r}")
    return dt


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_scale(input_scale: float) -> float:
    s = float(input_scale)
    if not (math.isfinite(s) and s > 0):
        raise ValueError(f"input_scale must be a positive finite number, got {input_scale!r}")
    return s


def _scale_vectors(sae: SAE, input_scale: float | Sequence[float],
                   output_scale: float | Sequence[float] | None) -> tuple[Tensor, Tensor]:
    """Per-coordinate factors of the input and of the written activation: a number, or one
    per place (:mod:`sae.wiring`); the output's default is the input's (same places)."""
    if output_scale is None:
        if sae.cfg.transcode and not isinstance(input_scale, (int, float)):
            raise ValueError("a transcoder's output_scale must be given with a per-place "
                             "input_scale")
        output_scale = input_scale

    def vector(scale: Any, widths: list[int], what: str) -> Tensor:
        factors = [scale] * len(widths) if isinstance(scale, (int, float)) else list(scale)
        if len(factors) != len(widths):
            raise ValueError(f"{what} has {len(factors)} factors for {len(widths)} places")
        return wiring.per_coordinate([_check_scale(f) for f in factors], widths)

    return (vector(input_scale, wiring.widths_in(sae.cfg), "input_scale"),
            vector(output_scale, wiring.widths_out(sae.cfg), "output_scale"))


def _is_v6(version: Any) -> bool:
    try:
        return int(str(version).split(".")[0]) >= 6
    except ValueError:
        return False


def _json_text(cfg: Mapping[str, Any], folder: Path) -> str:
    try:
        return json.dumps(cfg, indent=2, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"cannot write {folder / CFG_FILENAME}: {e} (metadata values must be JSON-serializable)"
        ) from e


#: Tensors of each SAELens inference form (``matching_pursuit`` is tied: no encoder).
SAELENS_TENSORS = {
    "standard": ("W_enc", "W_dec", "b_enc", "b_dec"),
    "topk": ("W_enc", "W_dec", "b_enc", "b_dec"),
    "jumprelu": ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"),
    "matching_pursuit": ("W_dec", "b_dec"),
}
#: A transcoder's SAELens architecture by inference form (``+ skip``: with ``W_skip``). SAELens
#: has the ReLU and JumpReLU ones; ``topk_transcoder`` is ours (sparsify's layout, which
#: :func:`save_sparsify` writes, is the top-k transcoder format other tools read).
TRANSCODER_FORMS = {
    ("standard", False): "transcoder",
    ("standard", True): "skip_transcoder",
    ("jumprelu", False): "jumprelu_transcoder",
    ("jumprelu", True): "jumprelu_skip_transcoder",
    ("topk", False): "topk_transcoder",
    ("topk", True): "topk_skip_transcoder",
}
_TRANSCODER_BASE = {name: key for key, name in TRANSCODER_FORMS.items()}


def _inference_tensors(sae: SAE, input_scale: float | Sequence[float], dtype: Any,
                       output_scale: float | Sequence[float] | None = None) -> dict[str, Tensor]:
    """The saved model's parameters with the training scales folded in (per coordinate:
    ``s`` of the input, ``t`` of the written activation): ``W_enc * s``, ``W_dec / t``,
    ``b_dec / t``, ``W_skip * s / t``; thresholds are unchanged, and so is ``b_enc`` but for a
    transcoder's input centre, folded in (``b_enc - x_centre W_enc``). A matching
    pursuit keeps its unit-norm atoms (``W_dec`` unchanged): its codes scale with the input, so
    only ``b_dec / s`` (and the residual threshold, :func:`_form_config`) change."""
    s, t = _scale_vectors(sae, input_scale, output_scale)
    out = _as_dtype(dtype) or sae.W_dec.dtype
    work = torch.promote_types(sae.W_dec.dtype, torch.float32)
    s, t = s.to(work), t.to(work)

    def get(x: Tensor) -> Tensor:
        return x.detach().to("cpu", work)

    form = sae.inference_architecture
    tensors = {
        "W_enc": lambda: get(sae.W_enc) * s[:, None],
        "W_dec": lambda: get(sae.W_dec) / (1.0 if form == "matching_pursuit" else t),
        "b_enc": lambda: get(sae.b_enc) - get(sae.x_centre) @ get(sae.W_enc)
        if sae.cfg.transcode else get(sae.b_enc),
        "b_dec": lambda: get(sae.b_dec) / t,
        "threshold": lambda: get(sae.threshold).clamp_min(0),  # as the module's inference
        "W_skip": lambda: get(sae.W_skip) * s[None, :] / t[:, None],
    }
    names = SAELENS_TENSORS[form] + (("W_skip",) if sae.cfg.skip else ())
    return {k: tensors[k]().to(out).contiguous() for k in names}


def _saved_form(sae: SAE) -> str:
    """The ``architecture`` written to ``cfg.json``: the inference form, or its transcoder."""
    if sae.cfg.transcode:
        return TRANSCODER_FORMS[sae.inference_architecture, sae.cfg.skip]
    return sae.inference_architecture


def _form_config(sae: SAE, s: float) -> dict[str, Any]:
    """The ``cfg.json`` entries of the inference form besides the common ones."""
    form = sae.inference_architecture
    if form == "topk":
        return {"k": sae.cfg.k, "rescale_acts_by_decoder_norm": False}
    if form == "matching_pursuit":  # the threshold is on residual norms: raw units
        return {"residual_threshold": sae.cfg.residual_threshold / s,
                "max_iterations": sae.cfg.k, "stop_on_duplicate_support": True}
    return {}


def _one_scale(scale: Any, what: str) -> float:
    """A single place's factor given as a number or a one-element list."""
    if isinstance(scale, (int, float)):
        return _check_scale(scale)
    factors = list(scale)
    if len(factors) != 1:
        raise ValueError(f"{what} has {len(factors)} factors; this SAE has one place")
    return _check_scale(factors[0])


def _one_place_scales(input_scale: Any, output_scale: Any
                      ) -> tuple[float, float | None, dict[str, float]]:
    """A one-place SAE's (or transcoder's) input and output factors, and their record in the
    saved metadata."""
    s = _one_scale(input_scale, "input_scale")
    t = None if output_scale is None else _one_scale(output_scale, "output_scale")
    return s, t, {"input_scale": s} if t is None else {"input_scale": s, "output_scale": t}


def _saved_metadata(sae: SAE, metadata: Mapping[str, Any] | None,
                    scales: Mapping[str, Any]) -> dict[str, Any]:
    meta = {**sae.cfg.metadata, **(metadata or {})}
    # a loaded jumprelu/topk/relu SAE keeps the training architecture recorded in its file
    # (ours, or a SAELens name such as "matryoshka_batchtopk") unless it contradicts it
    prev = meta.get("training_architecture")
    inference = sae.inference_architecture
    keep = (
        isinstance(prev, str)
        and prev != ""
        and sae.architecture == SAELENS_ARCHITECTURES[inference]
        and (prev not in ARCHITECTURES or ARCHITECTURES[prev].saelens == inference)
    )
    if not keep:
        meta["training_architecture"] = sae.architecture
    if not _is_v6(meta.get("sae_lens_version")):
        meta["sae_lens_version"] = SAELENS_FORMAT_VERSION
    config = sae.cfg.to_dict()
    config.pop("metadata", None)
    meta["sparsecode"] = {
        "version": __version__,
        "architecture": sae.architecture,
        **scales,
        "config": config,
    }
    return meta


def _has_statistics(sae: SAE) -> bool:
    return int(sae.tokens_seen) > 0 or bool((sae.fire_rate != 0).any())


# ---------------------------------------------------------------------------------- SAELens
def save_sae(
    sae: SAE,
    folder: str | os.PathLike[str],
    *,
    input_scale: float | Sequence[float] = 1.0,
    output_scale: float | Sequence[float] | None = None,
    metadata: Mapping[str, Any] | None = None,
    dtype: torch.dtype | str | None = None,
) -> Path:
    """Write ``sae`` as a SAELens v6 folder that works on raw activations; return its path.

    ``input_scale`` is the factor the trainer multiplied activations by (one per place for a
    crosscoder) and ``output_scale`` that of a transcoder's written activation (default: the
    input's); both are folded into the weights (``normalize_activations`` is ``"none"``).
    ``metadata`` is merged over ``sae.cfg.metadata``; ``dtype`` (default: the parameters'
    dtype) is the stored precision. ``sparsity.safetensors`` is written when the SAE has firing
    statistics. An existing folder is replaced atomically.

    A transcoder is written as SAELens' ``transcoder`` / ``skip_transcoder`` /
    ``jumprelu_transcoder`` / ``jumprelu_skip_transcoder`` (``d_out``, ``W_skip``,
    ``apply_b_dec_to_input`` false); a top-k one as ``topk_transcoder``, which SAELens has no
    class for (:func:`save_sparsify` writes it in sparsify's layout). A crosscoder is written in
    its own layout (:func:`sae.io_crosscoder.save_crosscoder`).
    """
    if sae.cfg.places is not None:
        from .io_crosscoder import save_crosscoder

        return save_crosscoder(sae, folder, input_scale=input_scale, metadata=metadata,
                               dtype=dtype)
    folder = Path(folder)
    s, t, scales = _one_place_scales(input_scale, output_scale)
    tensors = _inference_tensors(sae, s, dtype, t)
    check_finite_tensors(tensors, f"refusing to save {folder}")
    cfg: dict[str, Any] = {
        "architecture": _saved_form(sae),
        "d_in": sae.cfg.d_in,
        "d_sae": sae.cfg.d_sae,
        "dtype": _dtype_name(tensors["W_dec"].dtype),
        "device": "cpu",
        "apply_b_dec_to_input": not sae.cfg.transcode,
        "normalize_activations": "none",
        "reshape_activations": "none",
    }
    if sae.cfg.transcode:
        cfg["d_out"] = sae.cfg.d_out
    cfg.update(_form_config(sae, s))
    cfg["metadata"] = _saved_metadata(sae, metadata, scales)
    text = _json_text(cfg, folder)

    writers: dict[str, Callable[[Path], None]] = {
        WEIGHTS_FILENAME: lambda p: st.save_file(tensors, str(p), metadata={"format": "pt"}),
    }
    if _has_statistics(sae):
        sparsity = log_density(sae.fire_rate.detach().to("cpu", torch.float32)).contiguous()
        writers[SPARSITY_FILENAME] = lambda p: st.save_file({"sparsity": sparsity}, str(p))
    writers[CFG_FILENAME] = lambda p: p.write_text(text)
    writers[CHECKSUMS_FILENAME] = checksum_writer([n for n in writers if n != CFG_FILENAME])
    return atomic_folder(folder, writers)


def _read_cfg(folder: Path, weights_name: str) -> tuple[dict[str, Any], Path]:
    """``folder``'s parsed ``cfg.json`` and the path of its weights, both present and, when the
    folder records checksums (:func:`sae.integrity.verify_checksums`), undamaged."""
    if not folder.is_dir():
        raise FileNotFoundError(f"SAE folder not found: {folder}")
    cfg_path, weights_path = folder / CFG_FILENAME, folder / weights_name
    for p in (cfg_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(
                f"{p} not found (this format needs {CFG_FILENAME} and {weights_name})"
            )
    verify_checksums(folder)
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_path} does not hold a JSON object")
    return cfg, weights_path


def _stored_config(meta: Mapping[str, Any]) -> dict[str, Any]:
    """SAEConfig fields saved by :func:`save_sae` (loss settings etc.), if any."""
    ours = meta.get("sparsecode")
    config = ours.get("config") if isinstance(ours, Mapping) else None
    if not isinstance(config, Mapping):
        return {}
    skip = {"metadata", "architecture", "d_in", "d_sae", "k", "residual_threshold", "d_out",
            "transcode", "skip", "places"}
    return {k: v for k, v in config.items() if k in _CONFIG_FIELDS and k not in skip}


def _loaded_architecture(form: str, meta: Mapping[str, Any]) -> str:
    """The architecture a file of SAELens form ``form`` loads as: the one we saved it from
    when that one computes the same function at inference (``online_dl`` and its pursuit), the
    form's default (:data:`SAELENS_ARCHITECTURES`) otherwise (e.g. a batchtopk file is a
    jumprelu SAE once saved)."""
    ours = meta.get("sparsecode")
    name = ours.get("architecture") if isinstance(ours, Mapping) else None
    arch = ARCHITECTURES.get(name) if isinstance(name, str) else None
    if arch is not None and arch.saelens == form and arch.threshold not in RUNNING_THRESHOLDS:
        return arch.name
    return SAELENS_ARCHITECTURES[form]


def _read_density(path: Path, d_sae: int) -> Tensor | None:
    """Per-latent firing rate from a SAELens ``sparsity.safetensors`` (log10 density)."""
    if not path.is_file():
        return None
    tensors = load_tensors(path)
    logd = tensors.get("sparsity")
    if logd is None or tuple(logd.shape) != (d_sae,):
        shape = None if logd is None else tuple(logd.shape)
        raise ValueError(f"{path} should hold 'sparsity' of shape ({d_sae},), got {shape}")
    logd = logd.float()
    return torch.where(logd > -10, torch.pow(10.0, logd), torch.zeros_like(logd))


def _build(
    architecture: str,
    form_fields: Mapping[str, Any],
    tensors: Mapping[str, Tensor],
    metadata: dict[str, Any],
    fire_rate: Tensor | None,
    device: str | torch.device,
    dtype: torch.dtype,
    source: Path,
) -> SAE:
    d_sae, d_out = tensors["W_dec"].shape
    d_in = tensors["W_enc"].shape[0] if "W_enc" in tensors else d_out
    fields = _stored_config(metadata)
    fields.update(d_in=d_in, d_sae=d_sae, d_out=d_out, architecture=architecture,
                  metadata=metadata)
    fields.update(form_fields)
    try:
        cfg = SAEConfig(**fields)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: cannot build an SAE from the stored settings: {e}") from e
    with torch.device("meta"):
        sae = SAE(cfg)
    state = {}
    for name, ref in sae.state_dict().items():
        if name in tensors:
            state[name] = tensors[name].to(device=device, dtype=dtype)
        elif name == "fire_rate" and fire_rate is not None:
            state[name] = fire_rate.to(device=device, dtype=ref.dtype)
        else:
            kind = dtype if name == "threshold" else ref.dtype
            state[name] = torch.zeros(ref.shape, dtype=kind, device=device)
    sae.load_state_dict(state, assign=True)
    return sae.eval()


def _check_shapes(tensors: Mapping[str, Tensor], d_in: int, d_sae: int, path: Path,
                  d_out: int | None = None) -> None:
    d_out = d_in if d_out is None else d_out
    want = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_out), "b_enc": (d_sae,),
            "b_dec": (d_out,), "threshold": (d_sae,), "W_skip": (d_out, d_in)}
    for name, shape in want.items():
        if name not in tensors:
            continue
        if tuple(tensors[name].shape) != shape:
            raise ValueError(
                f"{path}: {name} has shape {tuple(tensors[name].shape)}, expected {shape} "
                f"for d_in={d_in}, d_sae={d_sae}" + (f", d_out={d_out}" if d_out != d_in else "")
            )


def load_sae(
    folder: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    *,
    scaling_factor: float | None = None,
) -> SAE:
    """Read a SAELens folder (v6 or pre-6 ``cfg.json``) into an :class:`SAE` in eval mode.

    ``standard`` loads as ``relu``, ``topk`` as ``topk``, ``jumprelu`` as ``jumprelu``; the
    file's metadata (including a recorded training architecture) goes to ``cfg.metadata``.
    Folded in so that the module works on raw activations: ``apply_b_dec_to_input=False``
    (into ``b_enc``), topk's ``rescale_acts_by_decoder_norm``, a pre-6 ``scaling_factor``,
    ``normalize_activations="expected_average_only_in"`` (factor from ``scaling_factor``, the
    config's ``norm_scaling_factor``/``activation_normalization_factor`` or a training
    checkpoint's ``activation_scaler.json``) and ``"covariance_whitening"`` (from
    ``activation_whitening.safetensors``). ``dtype`` defaults to the config's.
    """
    from .io_convert import _fold_saelens, _saelens_form, _saelens_metadata

    folder = Path(folder)
    raw, weights_path = _read_cfg(folder, WEIGHTS_FILENAME)
    cfg_path = folder / CFG_FILENAME
    meta = _saelens_metadata(raw)
    if raw.get("architecture") == CROSSCODER:
        raise ValueError(f"{cfg_path} is a crosscoder: SAELens has no crosscoder class; read it "
                         "with sae.io.load")
    saved_form = raw.get("architecture")
    transcode, skip = _TRANSCODER_BASE.get(saved_form, (None, False))
    if transcode is not None:
        if raw.get("normalize_activations", "none") not in ("none", None, False):
            raise ValueError(f"{cfg_path}: a transcoder with normalize_activations="
                             f"{raw['normalize_activations']!r} is not supported")
        # read as its inference form; its input is not centred by b_dec, and nothing is to
        # be folded into b_enc (what apply_b_dec_to_input=False means for an autoencoder)
        raw = {**raw, "architecture": transcode, "apply_b_dec_to_input": True}
    form, form_fields = _saelens_form(raw, cfg_path)
    _check_recorded(form, meta, cfg_path)
    if transcode is not None:
        form_fields = {**form_fields, "transcode": True, "skip": skip}
    tensors = load_tensors(weights_path)
    if "log_threshold" in tensors and "threshold" not in tensors:
        tensors["threshold"] = tensors.pop("log_threshold").exp()
    needed = list(SAELENS_TENSORS[form]) + (["W_skip"] if skip else [])
    missing = [name for name in needed if name not in tensors]
    if missing:
        raise ValueError(f"{weights_path} lacks {', '.join(missing)} ({saved_form} SAE)")
    check_finite_tensors({k: v for k, v in tensors.items() if k in (*needed, "scaling_factor")},
                         weights_path)
    if tensors["W_dec"].dim() != 2:
        raise ValueError(f"{weights_path}: W_dec has shape {tuple(tensors['W_dec'].shape)}, "
                         "expected (d_sae, d_in)")
    d_sae, d_out = tensors["W_dec"].shape
    d_in = tensors["W_enc"].shape[0] if "W_enc" in tensors else d_out
    for name, n in (("d_in", d_in), ("d_sae", d_sae), ("d_out", d_out)):
        if name in raw and raw[name] != n:
            raise ValueError(f"{cfg_path}: {name}={raw[name]} but the weights have "
                             f"{name}={n}")
    if transcode is None and d_out != d_in:
        raise ValueError(f"{weights_path}: W_dec has shape {(d_sae, d_out)} but W_enc reads "
                         f"d_in={d_in} ({saved_form} is not a transcoder)")
    _check_shapes(tensors, d_in, d_sae, weights_path, d_out)
    out_dtype = _as_dtype(dtype) or _as_dtype(raw.get("dtype")) or tensors["W_dec"].dtype
    work = torch.promote_types(tensors["W_dec"].dtype, torch.float32)
    t = {name: tensors[name].to(work) for name in needed}
    _fold_saelens(t, tensors, form, raw, meta, folder, scaling_factor)
    fire_rate = _read_density(folder / SPARSITY_FILENAME, d_sae)
    return _build(_loaded_architecture(form, meta), form_fields, t, meta, fire_rate, device,
                  out_dtype, folder)


def find_sae_folders(path: str | os.PathLike[str]) -> dict[str, Path]:
    """SAE folders (holding ``cfg.json``) at ``path``: the folder itself, or its subfolders;
    leftovers of interrupted writes (hidden ``.*.tmp`` / ``.*.old`` folders) are not SAEs.

    Raises ``FileNotFoundError`` when ``path`` is missing and ``ValueError`` when it holds none.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such run or SAE folder: {path}")
    _not_temporary(path)
    if (path / CFG_FILENAME).is_file():
        return {path.name: path}
    found = {p.parent.name: p.parent for p in sorted(path.glob(f"*/{CFG_FILENAME}"))
             if not is_temporary(p.parent)}
    if not found:
        raise ValueError(f"no SAE folder (a folder with {CFG_FILENAME}) in {path}")
    return found


def _not_temporary(folder: Path) -> None:
    if is_temporary(folder.absolute()):
        raise ValueError(f"{folder} is the leftover of an interrupted write (a hidden .*.tmp / "
                         ".*.old folder), not an SAE; delete it")


def _is_crosscoder(folder: Path) -> bool:
    try:
        return json.loads((folder / CFG_FILENAME).read_text()).get("architecture") == CROSSCODER
    except (OSError, ValueError, AttributeError):
        return False  # the format's own reader reports a missing or broken cfg.json


def load(
    folder: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
) -> SAE:
    """Load a SAELens folder (``sae_weights.safetensors``), a sparsify one
    (``sae.safetensors``) or a crosscoder (:mod:`sae.io_crosscoder`), whichever ``folder``
    holds."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"SAE folder not found: {folder}")
    _not_temporary(folder)
    if _is_crosscoder(folder):
        from .io_crosscoder import load_crosscoder

        return load_crosscoder(folder, device, dtype)
    if (folder / WEIGHTS_FILENAME).is_file():
        return load_sae(folder, device, dtype)
    if (folder / SPARSIFY_WEIGHTS_FILENAME).is_file():
        from .io_convert import load_sparsify

        return load_sparsify(folder, device, dtype)
    raise FileNotFoundError(
        f"{folder} holds neither {WEIGHTS_FILENAME} (SAELens) nor {SPARSIFY_WEIGHTS_FILENAME} "
        "(sparsify)"
    )


if TYPE_CHECKING:  # for type checkers; at run time, __getattr__ below
    from .io_convert import from_dictionary, load_sparsify, save_sparsify

_CONVERTERS = frozenset({"from_dictionary", "load_sparsify", "save_sparsify"})


def __getattr__(name: str) -> Any:
    """``from sae.io import save_sparsify`` (and ``load_sparsify``, ``from_dictionary``): they
    live in :mod:`sae.io_convert`, which builds on this module, so they are imported on first
    use rather than at import time (no import cycle)."""
    if name in _CONVERTERS:
        from . import io_convert

        return getattr(io_convert, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "SAELENS_ARCHITECTURES",
    "find_sae_folders",
    "from_dictionary",
    "load",
    "load_sae",
    "load_sparsify",
    "save_sae",
    "save_sparsify",
]
