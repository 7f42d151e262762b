"""``sae eval --suite``: the evals by name, what each needs, and their output files.

Each eval is one :class:`Eval` in :data:`EVALS` (adding one is adding an entry): its SAEBench
``eval_type_id``, a check that says why it does not apply to a dictionary (or ``None``), and a
function from a dictionary and the shared :class:`Context` to ``{"metrics", "details", ...}``.
Results are written one JSON file per eval and dictionary in SAEBench's output layout
(``eval_type_id``, ``eval_config``, ``eval_id``, ``datetime_epoch_millis``,
``eval_result_metrics`` by category, ``eval_result_details``, ``sae_cfg_dict``, ...) at
``<SAE folder>/eval_results/<eval_type_id>/<run>_<name>_eval_results.json``, so SAEBench's
readers (``sae_bench.sae_bench_utils.graphing_utils.get_eval_results``) accept them.
"""

from __future__ import annotations

import json
import math
import time
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparsecode._files import atomic_write

__all__ = [
    "EVALS", "Context", "Eval", "NotApplicable", "latent_notes", "parse_suite", "result_path",
    "write_result",
]


class NotApplicable(Exception):
    """An eval that does not apply to a dictionary; the message says why."""


@dataclass
class Context:
    """What the evals of one ``sae eval`` call share: the model runs and datasets built once
    for all dictionaries (keyed by model and places), and the per-eval settings."""

    load_model: Callable[[str], tuple[Any, Any]] | None  # model name -> (model, tokenizer)
    model_settings: Callable[[Any], Any] | None  # sae -> sparsecode.lm.ModelConfig
    core: Callable[[Any, Any], dict[str, Any]] | None = None  # (view, reference) -> metrics
    synthetic: Callable[[Any], dict[str, Any]] | None = None  # view -> recovery metrics
    n_words: int = 6000
    probe_tokens: int = 12_000
    seed: int = 42
    progress: bool = False
    cache: dict[Any, Any] = field(default_factory=dict)
    # per dictionary object: what several evals compute from the same dictionary (freed with
    # it, so a later view that reuses its memory never sees another dictionary's results)
    owned: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary)

    def shared(self, key: Any, build: Callable[[], Any]) -> Any:
        """What every dictionary at the same ``key`` (model, places, ...) shares, built once."""
        if key not in self.cache:
            self.cache[key] = build()
        return self.cache[key]

    def of(self, sae: Any, key: str, build: Callable[[], Any]) -> Any:
        """What the evals of one dictionary share (e.g. its k-sparse probes), built once."""
        mine = self.owned.setdefault(sae, {})
        if key not in mine:
            mine[key] = build()
        return mine[key]

    def lm_places(self, sae: Any) -> tuple[Any, Any, Any, Any]:
        """``(cfg, model, tokenizer, places)`` of a dictionary evaluated in its model."""
        from .activations import sae_places

        if self.load_model is None:
            raise NotApplicable("it runs the language model (not on --activations)")
        cfg = self.model_settings(sae)
        model, tok = self.load_model(cfg.model)
        try:
            places = sae_places(sae, cfg.hookpoint)
        except ValueError as e:
            raise NotApplicable(str(e)) from e
        return cfg, model, tok, places


@dataclass(frozen=True)
class Eval:
    type_id: str  # SAEBench's eval_type_id (ours where SAEBench has none)
    run: Callable[[Any, Context], dict[str, Any]]
    doc: str


def _core(sae: Any, ctx: Context) -> dict[str, Any]:
    if ctx.core is None:
        raise NotApplicable("no activations and no model to evaluate on")
    m = ctx.core(sae, None)
    groups = {
        "model_behavior_preservation": {"kl_div_score": "kl_recovered",
                                        "kl_div_with_ablation": "kl_zero",
                                        "kl_div_with_sae": "kl_sae"},
        "model_performance_preservation": {"ce_loss_score": "ce_loss_recovered",
                                           "ce_loss_with_ablation": "ce_zero",
                                           "ce_loss_with_sae": "ce_sae",
                                           "ce_loss_without_sae": "ce_clean",
                                           "delta_lm_loss": "delta_lm_loss"},
        "reconstruction_quality": {"explained_variance": "explained_variance", "mse": "mse",
                                   "cossim": "cosine", "fvu": "fvu"},
        "sparsity": {"l0": "l0", "dead_fraction": "dead_fraction",
                     "dense_fraction": "dense_fraction"},
    }
    metrics = {g: {ours_as: m[k] for ours_as, k in keys.items() if k in m}
               for g, keys in groups.items()}
    used = {k for keys in groups.values() for k in keys.values()}
    metrics["misc"] = {k: v for k, v in m.items() if k not in used and _number(v)}
    return {"metrics": {g: v for g, v in metrics.items() if v}, "config": {}}


def _first_letter(sae: Any, ctx: Context):
    from .activations import latents
    from .first_letter import MIN_PROBE_F1, first_letter_data
    from .splitting import k_sparse_probing, letters_present

    cfg, model, tok, places = ctx.lm_places(sae)
    try:
        data = ctx.shared(("first_letter", cfg.model, places), lambda: first_letter_data(
            model, tok, places, n_words=ctx.n_words, seed=ctx.seed, progress=ctx.progress))
    except ValueError as e:
        raise NotApplicable(str(e)) from e
    present = letters_present(data)
    if len(present) < MIN_LETTERS:
        raise NotApplicable(
            f"the model represents only {len(present)} first letters at {list(places.reads)} "
            f"(activation probe F1 > {MIN_PROBE_F1}; {MIN_LETTERS} needed, as in SAEBench)")
    def probes():
        z = {s: latents(sae, data.x[s]) for s in ("train", "test")}
        return z["test"], k_sparse_probing(z["train"], data.labels["train"], z["test"],
                                           data.labels["test"], seed=ctx.seed)

    z_test, ks = ctx.of(sae, "k_sparse", probes)
    config = {**data.config, "model_name": cfg.model, "max_k_value": 10,
              "f1_jump_threshold": 0.03, "min_GT_probe_f1": MIN_PROBE_F1,
              "min_feats_for_eval": MIN_LETTERS, "k_sparse_probe_l1_decay": 0.01}
    return data, ks, z_test, config


def skipped_letters(data: Any) -> dict[str, str]:
    """Why each letter left out of absorption and splitting is left out."""
    from .first_letter import LETTERS, MIN_PROBE_F1, probe_f1

    f1 = probe_f1(data)
    counts = [int((data.labels["test"] == j).sum()) for j in range(len(LETTERS))]
    return {c: f"activation probe F1 {f1[j]:.2f} <= {MIN_PROBE_F1} on {counts[j]} test words"
            for j, c in enumerate(LETTERS) if f1[j] <= MIN_PROBE_F1}


#: SAEBench's ``min_feats_for_eval``: letters the model must represent for absorption to apply.
MIN_LETTERS = 20


def _absorption(sae: Any, ctx: Context) -> dict[str, Any]:
    from .absorption import absorption

    data, ks, z_test, config = _first_letter(sae, ctx)
    out = absorption(sae, ks, data, z_test)
    return {**out, "config": config, "unstructured": {"absorbers": out.pop("absorbers"),
                                                      "letters_skipped": skipped_letters(data)}}


def _splitting(sae: Any, ctx: Context) -> dict[str, Any]:
    from .splitting import splitting

    data, ks, _, config = _first_letter(sae, ctx)
    return {**splitting(ks, data), "config": config,
            "unstructured": {"letters_skipped": skipped_letters(data)}}


def _probing(sae: Any, ctx: Context) -> dict[str, Any]:
    from sparsecode.text import load_texts

    from .sparse_probing import llm_probes, probing_data, sae_probes

    cfg, model, tok, places = ctx.lm_places(sae)
    key = ("probing", cfg.model, places, cfg.source)
    data = ctx.shared(key, lambda: probing_data(
        model, tok, places, load_texts(cfg.source), n_tokens=ctx.probe_tokens, seed=ctx.seed,
        progress=ctx.progress))
    if not data.tasks:
        raise NotApplicable("no probing task has 20 samples of each class in the text")
    llm = ctx.shared(key + ("llm",), lambda: llm_probes(data))
    out = sae_probes(sae, data, llm)
    return {**out, "config": {**data.config, "model_name": cfg.model, "text": cfg.source},
            "unstructured": {"tasks": out.pop("tasks")}}


def _synthetic(sae: Any, ctx: Context) -> dict[str, Any]:
    if ctx.synthetic is None:
        raise NotApplicable("it needs --synthetic MODEL (the synthetic model it was trained on)")
    try:
        m = ctx.synthetic(sae)
    except ValueError as e:  # e.g. a synthetic model of another width than the SAE's
        raise NotApplicable(str(e)) from e
    return {"metrics": {"recovery": {k: v for k, v in m.items() if _number(v)}}, "config": {}}


EVALS: dict[str, Eval] = {
    "core": Eval("core", _core, "reconstruction, sparsity and the spliced model's loss"),
    "absorption": Eval("absorption_first_letter", _absorption,
                       "feature absorption on the first-letter task (Chanin et al. 2024)"),
    "splitting": Eval("feature_splitting", _splitting,
                      "feature splitting on the first-letter task (Chanin et al. 2024)"),
    "probing": Eval("sparse_probing", _probing, "k-sparse probing (Gurnee et al. 2023)"),
    "synthetic": Eval("synthetic_recovery", _synthetic,
                      "recovery of a synthetic model's known features (SynthSAEBench)"),
}


def parse_suite(spec: str) -> list[str]:
    """The eval names of ``--suite`` (comma-separated; ``all`` is every eval)."""
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise ValueError("--suite names no eval")
    if "all" in names:
        return list(EVALS)
    bad = [n for n in names if n not in EVALS]
    if bad:
        raise ValueError(f"unknown eval(s) {bad}; choose from {', '.join(EVALS)} or all")
    return list(dict.fromkeys(names))


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _finite(obj: Any) -> Any:
    """``obj`` with non-finite floats as ``None`` (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_result(folder: Path, label: str, name: str, result: dict[str, Any],
                 seconds: float) -> Path:
    """Write one eval's result for the SAE in ``folder`` in SAEBench's layout; the path."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        ours = version("sparsecode")
    except PackageNotFoundError:
        ours = "unknown"
    type_id = EVALS[name].type_id
    cfg = json.loads((folder / "cfg.json").read_text())
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    cfg_dict = {**cfg, "training_tokens": meta.get("training_tokens")}
    doc = {
        "eval_type_id": type_id,
        "eval_config": result.get("config", {}),
        "eval_id": str(uuid.uuid4()),
        "datetime_epoch_millis": int(time.time() * 1000),
        "eval_result_metrics": result["metrics"],
        "eval_result_details": result.get("details", []),
        "sae_bench_commit_hash": f"sparsecode {ours}",
        "sae_lens_id": label,
        "sae_lens_release_id": folder.parent.name,
        "sae_lens_version": None,
        "sae_cfg_dict": cfg_dict,
        "eval_result_unstructured": {**result.get("unstructured", {}),
                                     "seconds": round(seconds, 2)},
    }
    out = result_path(folder, type_id, label)
    out.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(out, json.dumps(_finite(doc), indent=2, allow_nan=False))


def result_path(folder: str | Path, type_id: str = "*", label: str | None = None) -> Path:
    """Where the result of eval ``type_id`` for the dictionary ``label`` (default: the SAE of
    ``folder`` itself, not an ``--encoder`` view) lives: SAEBench's
    ``eval_results/<type_id>/<run>_<label>_eval_results.json`` inside the SAE folder (``"*"``
    as ``type_id`` gives the glob over every eval)."""
    folder = Path(folder)
    name = f"{folder.parent.name}_{label or folder.name}_eval_results.json"
    return folder / "eval_results" / type_id / name


def latent_notes(folder: str | Path) -> dict[int, list[str]]:
    """Per latent, what the SAE's own absorption result in ``folder`` says of it: the first
    letters it is a main latent of, and the letters whose words it fully absorbs (for the
    feature browser). Empty without a result."""
    path = result_path(folder, EVALS["absorption"].type_id)
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    notes: dict[int, list[str]] = {}
    for d in doc.get("eval_result_details") or []:
        main = d.get("main_latents") or []
        for j in main:
            split = f", split over {len(main)} latents" if len(main) > 1 else ""
            notes.setdefault(int(j), []).append(
                f"main latent of first letter '{d['first_letter']}' (absorption fraction "
                f"{d['mean_absorption_fraction']:.2f}{split})")
    absorbers = (doc.get("eval_result_unstructured") or {}).get("absorbers") or {}
    for j, letters in absorbers.items():
        words = ", ".join(f"'{k}' on {n} word{'s' * (n > 1)}" for k, n in letters.items())
        notes.setdefault(int(j), []).append(f"absorbs first letter {words}")
    return notes
