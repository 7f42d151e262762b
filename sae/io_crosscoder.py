"""The crosscoder folder: one dictionary over ``L`` places, one set of keys per place.

SAELens and sparsify have no crosscoder class, so a crosscoder is saved in this layout (read by
:func:`sae.io.load`; SAELens' loader stops at the unknown ``architecture``)::

    cfg.json                  architecture "crosscoder", activation ("standard" | "topk" |
                              "jumprelu": the inference form), d_sae, [k], dtype,
                              places [{"hook_name", "d_in"}, ...] in order, metadata
    sae_weights.safetensors   per place i: W_enc.{i} [d_in_i, d_sae], W_dec.{i} [d_sae, d_in_i],
                              b_dec.{i} [d_in_i]; shared: b_enc [d_sae], threshold [d_sae]
                              (jumprelu)
    checksums.json            {"sha256": {"sae_weights.safetensors": ...}}, verified on load

The encoder sums the places' pre-activations, ``z = act(sum_i (x_i - b_dec.i) W_enc.i +
b_enc)``, and place ``i`` is reconstructed as ``z W_dec.i + b_dec.i`` (Lindsey et al. 2024,
acausal crosscoder). Weights work on raw activations: each place's training scale is folded in.

>>> import tempfile, torch
>>> from sae.models import SAE, SAEConfig
>>> cc = SAE(SAEConfig(d_in=12, d_sae=32, k=4, places=[4, 8],
...                    metadata={"hook_names": ["model.layers.1", "model.layers.2"]})).eval()
>>> with tempfile.TemporaryDirectory() as tmp:
...     again = load_crosscoder(save_crosscoder(cc, Path(tmp) / "cc", input_scale=[2.0, 0.5]))
>>> x = torch.randn(3, 12)
>>> s = torch.tensor([2.0] * 4 + [0.5] * 8)
>>> torch.allclose(again(x) * s, cc(x * s), atol=1e-5), again.cfg.places
(True, [4, 8])
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import safetensors.torch as st
import torch
from torch import Tensor

from sparsecode._files import atomic_folder

from . import io
from .integrity import CHECKSUMS_FILENAME, check_finite_tensors, checksum_writer, load_tensors
from .models import SAE


def save_crosscoder(
    sae: SAE,
    folder: str | os.PathLike[str],
    *,
    input_scale: float | Sequence[float] = 1.0,
    metadata: Mapping[str, Any] | None = None,
    dtype: torch.dtype | str | None = None,
) -> Path:
    """Write crosscoder ``sae`` (``cfg.places`` set) in the layout above; ``input_scale`` is one
    factor per place (or one for all), folded into the weights."""
    if sae.cfg.places is None:
        raise ValueError("not a crosscoder (cfg.places is None): use sae.io.save_sae")
    folder = Path(folder)
    t = io._inference_tensors(sae, input_scale, dtype)
    places = sae.cfg.places
    meta = io._saved_metadata(sae, metadata, {"input_scale": _as_list(input_scale, places)})
    names = meta.get("hook_names") or [None] * len(places)
    form = sae.inference_architecture
    cfg: dict[str, Any] = {
        "architecture": io.CROSSCODER,
        "activation": form,
        "d_sae": sae.cfg.d_sae,
        "dtype": io._dtype_name(t["W_dec"].dtype),
        "places": [{"hook_name": n, "d_in": w} for n, w in zip(names, places, strict=True)],
    }
    cfg.update(io._form_config(sae, 1.0))
    cfg["metadata"] = meta
    text = io._json_text(cfg, folder)
    tensors = {name: t[name] for name in ("b_enc", "threshold") if name in t}
    for i, (enc, dec, bias) in enumerate(zip(t["W_enc"].split(places, dim=0),
                                             t["W_dec"].split(places, dim=1),
                                             t["b_dec"].split(places), strict=True)):
        tensors.update({f"W_enc.{i}": enc.contiguous(), f"W_dec.{i}": dec.contiguous(),
                        f"b_dec.{i}": bias.contiguous()})
    writers: dict[str, Callable[[Path], None]] = {
        io.WEIGHTS_FILENAME: lambda p: st.save_file(tensors, str(p), metadata={"format": "pt"}),
        io.CFG_FILENAME: lambda p: p.write_text(text),
        CHECKSUMS_FILENAME: checksum_writer([io.WEIGHTS_FILENAME]),
    }
    return atomic_folder(folder, writers)


def _as_list(scale: float | Sequence[float], places: list[int]) -> list[float]:
    return [float(scale)] * len(places) if isinstance(scale, (int, float)) else list(scale)


def load_crosscoder(
    folder: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
) -> SAE:
    """Read a crosscoder folder into an :class:`SAE` with ``cfg.places`` (eval mode)."""
    folder = Path(folder)
    raw, weights_path = io._read_cfg(folder, io.WEIGHTS_FILENAME)
    cfg_path = folder / io.CFG_FILENAME
    places = raw.get("places")
    if not isinstance(places, list) or len(places) < 2:
        raise ValueError(f"{cfg_path}: a crosscoder lists two or more 'places'")
    form = raw.get("activation")
    if form not in ("standard", "topk", "jumprelu"):
        raise ValueError(f"{cfg_path}: unknown crosscoder activation {form!r}")
    tensors = load_tensors(weights_path)
    check_finite_tensors(tensors, weights_path)
    parts: dict[str, list[Tensor]] = {"W_enc": [], "W_dec": [], "b_dec": []}
    for i in range(len(places)):
        for name, part in parts.items():
            key = f"{name}.{i}"
            if key not in tensors:
                raise ValueError(f"{weights_path} lacks {key} (place {i} of {len(places)})")
            part.append(tensors[key])
    work = torch.promote_types(parts["W_dec"][0].dtype, torch.float32)
    t = {"W_enc": torch.cat(parts["W_enc"], dim=0).to(work),
         "W_dec": torch.cat(parts["W_dec"], dim=1).to(work),
         "b_dec": torch.cat(parts["b_dec"]).to(work)}
    for name in io.SAELENS_TENSORS[form]:
        if name not in t:
            if name not in tensors:
                raise ValueError(f"{weights_path} lacks {name} ({form} crosscoder)")
            t[name] = tensors[name].to(work)
    widths = [int(p.shape[0]) for p in parts["W_enc"]]
    stated = [p.get("d_in") if isinstance(p, dict) else None for p in places]
    if stated != widths:
        raise ValueError(f"{cfg_path}: places have d_in {stated} but the weights {widths}")
    d_sae, d_in = int(t["W_dec"].shape[0]), sum(widths)
    io._check_shapes(t, d_in, d_sae, weights_path)
    meta = dict(raw["metadata"]) if isinstance(raw.get("metadata"), dict) else {}
    meta.setdefault("hook_names", [p.get("hook_name") for p in places])
    form_fields: dict[str, Any] = {"places": widths}
    if form == "topk":
        form_fields["k"] = io._count(raw.get("k"), "k", cfg_path)
    out_dtype = io._as_dtype(dtype) or io._as_dtype(raw.get("dtype")) or work
    return io._build(io._loaded_architecture(form, meta), form_fields, t, meta, None, device,
                     out_dtype, folder)

