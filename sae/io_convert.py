"""Other tools' conventions, converted to and from an :class:`~sae.models.SAE`: what SAELens
(any version) records in a folder, read by :func:`sae.io.load_sae`; sparsify's layout (top-k SAEs
and transcoders, read by sparsify and delphi); a learned dictionary as an SAE. Everything here is
importable from :mod:`sae.io` too.

sparsify folder::

    cfg.json          activation, expansion_factor, normalize_decoder, num_latents, k, multi_topk,
                      skip_connection, transcode, d_in (+ our metadata, which sparsify ignores)
    sae.safetensors   encoder.weight [d_sae, d_in], encoder.bias [d_sae], W_dec [d_sae, d_in],
                      b_dec [d_in]
    checksums.json    {"sha256": {"sae.safetensors": ...}} (ours; sparsify ignores it), verified
                      on load
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch as st
import torch
from torch import Tensor

from sparsecode._files import atomic_folder

from .architectures import PURSUITS
from .config import SAEConfig
from .integrity import CHECKSUMS_FILENAME, check_finite_tensors, checksum_writer, load_tensors
from .io import (
    CFG_FILENAME,
    SAELENS_ARCHITECTURES,
    SPARSIFY_WEIGHTS_FILENAME,
    _as_dtype,
    _build,
    _check_scale,
    _check_shapes,
    _count,
    _inference_tensors,
    _json_text,
    _one_place_scales,
    _read_cfg,
    _saved_form,
    _saved_metadata,
)
from .models import SAE

SCALER_FILENAME = "activation_scaler.json"  # SAELens training checkpoints
WHITENING_FILENAME = "activation_whitening.safetensors"

# metadata keys that pre-6 SAELens configs keep at the top level (with their old names)
_PRE6_RENAMES = {
    "hook_point": "hook_name",
    "hook_point_layer": "hook_layer",
    "hook_point_head_index": "hook_head_index",
}
_PRE6_METADATA_KEYS = frozenset(
    {
        "model_name", "model_class_name", "hook_name", "hook_layer", "hook_head_index",
        "model_from_pretrained_kwargs", "prepend_bos", "exclude_special_tokens", "neuronpedia_id",
        "context_size", "seqpos_slice", "dataset_path", "sae_lens_version",
        "sae_lens_training_version", "hook_name_out", "hook_head_index_out", "hf_hook_name",
        "hf_hook_name_out",
    }
)  # fmt: skip
# where a folded-later activation norm scaling factor may be recorded
_SCALE_KEYS = ("norm_scaling_factor", "activation_normalization_factor")


# ---------------------------------------------------------------------------------- SAELens
def _number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _saelens_metadata(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The metadata of a SAELens ``cfg.json``: v6's ``metadata`` over the keys a pre-6 config
    keeps at the top level (under their new names)."""
    meta = {_PRE6_RENAMES.get(k, k): v for k, v in raw.items()}
    meta = {k: v for k, v in meta.items() if k in _PRE6_METADATA_KEYS}
    if isinstance(raw.get("metadata"), dict):
        meta.update(raw["metadata"])
    return meta


def _fold_saelens(t: dict[str, Tensor], tensors: Mapping[str, Tensor], form: str,
                  raw: Mapping[str, Any], meta: Mapping[str, Any], folder: Path,
                  scaling_factor: float | None) -> None:
    """Fold SAELens' conventions into the weights ``t`` (in place, in their working dtype), so
    the SAE works on raw activations with our encoder: a pre-6 per-latent ``scaling_factor``
    (from the file's ``tensors``), topk's ``rescale_acts_by_decoder_norm``,
    ``apply_b_dec_to_input=False`` and the input normalisation."""
    work = t["W_dec"].dtype
    # pre-6 per-latent output scale: decode is (z * scaling_factor) @ W_dec
    if "scaling_factor" in tensors:
        t["W_dec"] = t["W_dec"] * tensors["scaling_factor"].to(work).unsqueeze(1)
    if form == "topk" and raw.get("rescale_acts_by_decoder_norm"):
        norms = t["W_dec"].norm(dim=1)
        t["W_enc"], t["b_enc"] = t["W_enc"] * norms, t["b_enc"] * norms
        t["W_dec"] = t["W_dec"] / norms.unsqueeze(1)
    if raw.get("apply_b_dec_to_input", True) is False:
        t["b_enc"] = t["b_enc"] + t["b_dec"] @ t["W_enc"]
    _fold_normalization(t, raw, meta, folder, scaling_factor, work)


def _norm_scaling_factor(
    raw: Mapping[str, Any], meta: Mapping[str, Any], folder: Path, given: float | None
) -> float | None:
    if given is not None:
        return _check_scale(given)
    for source in (raw, meta):
        for key in _SCALE_KEYS:
            if (v := _number(source.get(key))) is not None:
                return _check_scale(v)
    scaler = folder / SCALER_FILENAME
    if scaler.is_file():
        v = _number(json.loads(scaler.read_text()).get("scaling_factor"))
        if v is not None:
            return _check_scale(v)
    return None


def _require(raw: Mapping[str, Any], cfg_path: Path) -> None:
    """The keys a SAELens ``cfg.json`` must have: ``d_in`` and ``d_sae`` (positive integers)
    and ``architecture`` (or, in a pre-6 config, ``activation_fn_str``): loading never guesses
    the architecture."""
    for key in ("d_in", "d_sae"):
        if key not in raw:
            raise ValueError(f"{cfg_path} lacks the required key {key!r}")
        _count(raw[key], key, cfg_path)
    if not raw.get("architecture") and not any(
            raw.get(k) for k in ("activation_fn_str", "activation_fn")):
        raise ValueError(f"{cfg_path} lacks the required key 'architecture' (one of "
                         f"{', '.join(SAELENS_ARCHITECTURES)}; pre-6 configs name "
                         "'activation_fn_str' instead)")


def _saelens_form(raw: Mapping[str, Any], cfg_path: Path) -> tuple[str, dict[str, Any]]:
    """The SAELens inference form (``standard``, ``topk``, ``jumprelu``, ``matching_pursuit``)
    and the SAEConfig fields it sets (``k``; a pursuit's ``residual_threshold``), from a
    ``cfg.json`` with the required keys (:func:`_require`)."""
    _require(raw, cfg_path)
    activation = raw.get("activation_fn", raw.get("activation_fn_str", "relu"))
    act_kwargs = raw.get("activation_fn_kwargs") or {}
    form = raw.get("architecture") or "standard"
    k = raw.get("k", act_kwargs.get("k"))
    if activation == "topk" and k is not None:
        form = "topk"  # pre-6 configs mark top-k SAEs by their activation only
    if form not in SAELENS_ARCHITECTURES:
        raise ValueError(
            f"{cfg_path}: unknown or unsupported SAELens architecture {form!r}; "
            f"known architectures: {', '.join(SAELENS_ARCHITECTURES)}"
        )
    if form == "standard" and activation not in ("relu", None):
        raise ValueError(f"{cfg_path}: activation {activation!r} is not supported (only relu)")
    if form == "topk" and k is None:
        raise ValueError(f"{cfg_path}: a topk SAE needs an integer 'k'")
    if form == "topk":
        return form, {"k": _count(k, "k", cfg_path)}
    if form == "matching_pursuit":
        if False in (raw.get("stop_on_duplicate_support"), raw.get("apply_b_dec_to_input")):
            raise ValueError(f"{cfg_path}: a matching pursuit SAE with stop_on_duplicate_support "
                             "or apply_b_dec_to_input false is not supported")
        steps = _count(raw.get("max_iterations") or raw.get("d_in"), "max_iterations", cfg_path)
        threshold = raw.get("residual_threshold", 0.01)
        if _number(threshold) is None or not (math.isfinite(threshold) and threshold >= 0):
            raise ValueError(f"{cfg_path}: 'residual_threshold' must be a finite number >= 0, "
                             f"got {threshold!r}")
        return form, {"k": steps, "residual_threshold": float(threshold)}
    return form, {}


def _fold_normalization(t: dict[str, Tensor], raw: Mapping[str, Any], meta: Mapping[str, Any],
                        folder: Path, scaling_factor: float | None, work: torch.dtype) -> None:
    """Fold SAELens' input normalisation into the weights ``t`` (in place), so the SAE works
    on raw activations: a scalar scale, or a whitening transform."""
    cfg_path = folder / CFG_FILENAME
    norm = raw.get("normalize_activations", "none")
    norm = {True: "expected_average_only_in", False: "none", None: "none"}.get(norm, norm)
    if norm == "expected_average_only_in":
        s = _norm_scaling_factor(raw, meta, folder, scaling_factor)
        if s is None:
            raise ValueError(
                f"{cfg_path}: normalize_activations='expected_average_only_in' but no scaling "
                f"factor is stored ({', '.join(_SCALE_KEYS)} in cfg.json or its metadata, or "
                f"{SCALER_FILENAME}); pass scaling_factor= to fold it in"
            )
        t["W_enc"], t["W_dec"], t["b_dec"] = t["W_enc"] * s, t["W_dec"] / s, t["b_dec"] / s
    elif norm == "covariance_whitening":
        wpath = folder / WHITENING_FILENAME
        if not wpath.is_file():
            raise FileNotFoundError(
                f"{cfg_path}: normalize_activations='covariance_whitening' needs {wpath}"
            )
        w = {name: v.to(work) for name, v in load_tensors(wpath).items()}
        check_finite_tensors(w, wpath)
        if not {"mean", "matrix", "inverse_matrix"} <= w.keys():
            raise ValueError(f"{wpath} should hold mean, matrix and inverse_matrix")
        t["W_enc"] = w["matrix"] @ t["W_enc"]
        t["W_dec"] = t["W_dec"] @ w["inverse_matrix"]
        t["b_dec"] = t["b_dec"] @ w["inverse_matrix"] + w["mean"]
    elif norm != "none":
        raise ValueError(
            f"{cfg_path}: normalize_activations={norm!r} normalises each token at run time and "
            "cannot be folded into the weights; supported: 'none', 'expected_average_only_in' "
            "(with a scaling factor), 'covariance_whitening'"
        )


# ---------------------------------------------------------------------------------- sparsify
def save_sparsify(
    sae: SAE,
    folder: str | os.PathLike[str],
    *,
    input_scale: float = 1.0,
    output_scale: float | None = None,
    metadata: Mapping[str, Any] | None = None,
    dtype: torch.dtype | str | None = None,
) -> Path:
    """Write a top-k ``sae`` in sparsify's layout (for ``sparsify.SparseCoder.load_from_disk``,
    delphi); a transcoder as sparsify's (``transcode``, ``skip_connection`` with ``W_skip``),
    which needs ``d_out == d_in``. ``input_scale``, ``output_scale``, ``metadata`` and ``dtype``
    as in :func:`save_sae`."""
    if sae.inference_architecture != "topk" or sae.cfg.places is not None:
        raise ValueError(
            f"sparsify stores top-k SAEs and transcoders only; a {sae.architecture!r} "
            f"{sae.cfg.shape} is saved as {_saved_form(sae)!r}: use save_sae instead"
        )
    if sae.cfg.d_out != sae.cfg.d_in:
        raise ValueError(f"sparsify's transcoders write the width they read; this one reads "
                         f"{sae.cfg.d_in} and writes {sae.cfg.d_out}: use save_sae instead")
    s, out_s, scales = _one_place_scales(input_scale, output_scale)
    folder = Path(folder)
    t = _inference_tensors(sae, s, dtype, out_s)
    d_in, d_sae = sae.cfg.d_in, sae.cfg.d_sae
    cfg = {
        "activation": "topk",
        "expansion_factor": max(1, d_sae // d_in),
        "normalize_decoder": sae.unit_decoder,
        "num_latents": d_sae,
        "k": sae.cfg.k,
        "multi_topk": False,
        "skip_connection": sae.cfg.skip,
        "transcode": sae.cfg.transcode,
        "d_in": d_in,
        "metadata": _saved_metadata(sae, metadata, scales),
    }
    text = _json_text(cfg, folder)
    tensors = {
        "encoder.weight": t["W_enc"].T.contiguous(),
        "encoder.bias": t["b_enc"],
        "W_dec": t["W_dec"],
        "b_dec": t["b_dec"],
    }
    if sae.cfg.skip:
        tensors["W_skip"] = t["W_skip"]
    return atomic_folder(
        folder,
        {
            SPARSIFY_WEIGHTS_FILENAME: lambda p: st.save_file(
                tensors, str(p), metadata={"format": "pt"}
            ),
            CFG_FILENAME: lambda p: p.write_text(text),
            CHECKSUMS_FILENAME: checksum_writer([SPARSIFY_WEIGHTS_FILENAME]),
        },
    )


def load_sparsify(
    folder: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
) -> SAE:
    """Read a sparsify folder (``cfg.json`` + ``sae.safetensors``, top-k activation) into a
    ``topk`` :class:`SAE` in eval mode; a transcoder (``transcode``: the input is not centred
    by ``b_dec``; ``skip_connection``: ``W_skip``) into a ``topk`` transcoder."""
    folder = Path(folder)
    raw, weights_path = _read_cfg(folder, SPARSIFY_WEIGHTS_FILENAME)
    cfg_path = folder / CFG_FILENAME
    activation = raw.get("activation", "topk")
    if activation != "topk":
        raise ValueError(
            f"{cfg_path}: sparsify activation {activation!r} is not supported; only 'topk' loads"
        )
    tensors = load_tensors(weights_path)
    check_finite_tensors(tensors, weights_path)
    transcode = bool(raw.get("transcode"))
    skip = bool(raw.get("skip_connection"))
    if skip != ("W_skip" in tensors) or (skip and not transcode):
        raise ValueError(f"{cfg_path}: skip_connection={skip} and transcode={transcode} do not "
                         f"match {weights_path} ({'with' if 'W_skip' in tensors else 'no'} "
                         "W_skip); only transcoders with a skip connection are supported")
    needed = ["encoder.weight", "encoder.bias", "W_dec", "b_dec"]
    missing = [name for name in needed if name not in tensors]
    if missing:
        raise ValueError(f"{weights_path} lacks {', '.join(missing)}")
    if raw.get("k") is None:
        raise ValueError(f"{cfg_path}: missing integer 'k'")
    k = _count(raw["k"], "k", cfg_path)
    d_sae, d_in = tensors["encoder.weight"].shape
    n_latents = raw.get("num_latents") or raw.get("expansion_factor", 0) * raw.get("d_in", d_in)
    if raw.get("d_in", d_in) != d_in or n_latents != d_sae:
        raise ValueError(
            f"{cfg_path}: d_in={raw.get('d_in')}, {n_latents} latents do not match "
            f"encoder.weight of shape {(d_sae, d_in)}"
        )
    out_dtype = _as_dtype(dtype) or tensors["encoder.weight"].dtype
    work = torch.promote_types(tensors["encoder.weight"].dtype, torch.float32)
    t = {
        "W_enc": tensors["encoder.weight"].to(work).T,
        "b_enc": tensors["encoder.bias"].to(work),
        "W_dec": tensors["W_dec"].to(work),
        "b_dec": tensors["b_dec"].to(work),
    }
    if skip:
        t["W_skip"] = tensors["W_skip"].to(work)
    _check_shapes(t, d_in, d_sae, weights_path)
    meta = dict(raw["metadata"]) if isinstance(raw.get("metadata"), dict) else {}
    t["W_enc"] = t["W_enc"].contiguous()
    fields = {"k": k, "transcode": transcode, "skip": skip}
    return _build("topk", fields, t, meta, None, device, out_dtype, folder)


# ---------------------------------------------------------------------------------- dictionaries
def from_dictionary(
    D: Any,
    *,
    k: int,
    encoder: str = "mp",
    b_dec: Any = None,
    metadata: Mapping[str, Any] | None = None,
) -> SAE:
    """An SAE whose decoder is a learned dictionary ``D`` (atoms as rows, e.g. a
    :mod:`sparsecode` estimator's ``components_``, numpy or torch), so that ``sae eval``
    (with any ``--encoder``), ``sae browse`` and :func:`save_sae` (read by SAELens) work on it.

    ``encoder``: ``"mp"`` (matching pursuit, ``k`` steps: the ``mp`` architecture), ``"nnomp"``
    (OMP with a non-negative refit, up to ``k`` atoms: an ``online_dl`` SAE, which SAELens
    reads as a matching-pursuit SAE and encodes with mp) or ``"topk"`` (a TopK SAE
    whose encoder is the dictionary: ``W_enc = D^T``, ``b_enc = 0``). Rows are normalised to
    unit norm. ``b_dec`` is the offset the dictionary was learned around (default zero, e.g.
    for mean-removed signals).

    >>> import numpy as np
    >>> sae = from_dictionary(np.eye(4)[:3] * 2.0, k=1)
    >>> sae.encode(torch.tensor([[0.0, 3.0, 0.0, 1.0]])).tolist()
    [[0.0, 3.0, 0.0]]
    """
    if encoder not in (*PURSUITS, "topk"):
        raise ValueError(f"encoder must be one of {(*PURSUITS, 'topk')}, got {encoder!r}")
    W = torch.as_tensor(np.asarray(D) if not isinstance(D, Tensor) else D).detach().float()
    if W.dim() != 2 or W.shape[0] == 0 or not bool(torch.isfinite(W).all()):
        raise ValueError(f"D must be a finite (n_atoms, n_features) array, got {tuple(W.shape)}")
    norms = W.norm(dim=1, keepdim=True)
    if bool((norms == 0).any()):
        raise ValueError("D has zero atoms; remove them first")
    d_sae, d_in = W.shape
    arch = encoder if encoder in ("mp", "topk") else "online_dl"
    cfg = SAEConfig(d_in=d_in, d_sae=d_sae, architecture=arch, k=k,
                    pursuit=encoder if arch == "online_dl" else "mp",
                    metadata={"source": "dictionary", **(metadata or {})})
    with torch.device("meta"):
        sae = SAE(cfg)
    bias = torch.zeros(d_in) if b_dec is None else torch.as_tensor(np.asarray(b_dec)).float()
    state = {name: torch.zeros(t.shape, dtype=t.dtype) for name, t in sae.state_dict().items()}
    state.update(W_dec=W / norms, b_dec=bias.reshape(d_in))
    if "W_enc" in state:
        state["W_enc"] = (W / norms).T.contiguous()
    sae.load_state_dict(state, assign=True)
    return sae.eval()


__all__ = ["from_dictionary", "load_sparsify", "save_sparsify"]
