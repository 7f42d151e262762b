"""SAE quality metrics; each formula is written out in docs/metrics.md.

All metrics are computed on activations as the SAE sees them (after any input scaling the
trainer applies); FVU, cosine, L0 and the latent fractions do not depend on that scale.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .massive import MASSIVE_FACTOR, MassiveFilter

#: A latent firing on more than this fraction of tokens counts as dense.
DENSE_THRESHOLD = 0.1


def mse(x: Tensor, x_hat: Tensor) -> float:
    """Mean over tokens of the squared error summed over features."""
    return float((x - x_hat).pow(2).sum(dim=-1).mean())


def fvu(x: Tensor, x_hat: Tensor) -> float:
    """Fraction of variance unexplained: ``sum ||x - x_hat||^2 / sum ||x - mean(x)||^2``
    (mean-centred, so a constant offset is not credited as explained variance).

    >>> x = torch.randn(100, 4)
    >>> fvu(x, x), round(fvu(x, x.mean(0).expand_as(x)), 6)
    (0.0, 1.0)
    """
    num = (x - x_hat).pow(2).sum()
    den = (x - x.mean(dim=0)).pow(2).sum()
    return float(num / den.clamp_min(1e-30))


def cosine(x: Tensor, x_hat: Tensor) -> float:
    """Mean over tokens of the cosine between ``x`` and ``x_hat``."""
    return float(torch.nn.functional.cosine_similarity(x, x_hat, dim=-1).mean())


def l0(z: Tensor) -> float:
    """Mean number of nonzero latents per token."""
    return float((z != 0).sum(dim=-1).float().mean())


def density(z: Tensor) -> Tensor:
    """Per-latent fraction of tokens on which it is nonzero."""
    return (z != 0).float().mean(dim=0)


def density_histogram(dens: Tensor, bins: int = 20, low: float = -8.0) -> dict[str, list[float]]:
    """Histogram of ``log10(density)`` over ``[low, 0]``; dead latents (density 0) are counted
    separately under ``dead``."""
    dead = int((dens == 0).sum())
    logd = dens[dens > 0].double().log10().clamp(min=low)
    counts = torch.histc(logd, bins=bins, min=low, max=0.0) if logd.numel() else torch.zeros(bins)
    edges = torch.linspace(low, 0.0, bins + 1)
    return {"edges": edges.tolist(), "counts": counts.tolist(), "dead": [dead]}


@torch.no_grad()
def evaluate(sae, x: Tensor, batch_size: int = 8192, *, y: Tensor | None = None
             ) -> dict[str, float]:
    """Activation metrics of ``sae`` (inference behaviour) on held-out activations ``x``, whose
    estimate is of ``y`` (a transcoder's written activation; default ``x``).

    Returns ``mse``, ``fvu``, ``explained_variance`` (= 1 - fvu), ``cosine``, ``l0``,
    ``dead_fraction`` (latents that never fire on ``x``), ``dense_fraction`` (latents firing on
    more than 10% of tokens) and ``n_tokens``; for a crosscoder also ``fvu_place<i>``, the FVU
    of each place it writes.
    """
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"expected a non-empty (N, d_in) tensor, got shape {tuple(x.shape)}")
    y = x if y is None else y
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"x has {x.shape[0]} rows but y has {y.shape[0]}")
    places = sae.cfg.places or [y.shape[1]]
    was_training = sae.training
    sae.eval()
    err = torch.zeros(len(places), dtype=torch.float64)
    cos = torch.zeros((), dtype=torch.float64)
    nnz = torch.zeros((), dtype=torch.float64)
    counts = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    mean = y.double().mean(dim=0)
    var = torch.stack([p.pow(2).sum() for p in (y.double() - mean).split(places, dim=1)])
    if not bool(var.sum() > 0):
        raise ValueError(f"the {x.shape[0]} activation rows do not vary (every row is the same, "
                         "e.g. all zero): the FVU is undefined")
    for start in range(0, x.shape[0], batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        rows, cols, vals = sae.encode_pairs(xb)  # no (batch, d_sae) matrix
        y_hat = sae.decode_pairs(rows, cols, vals, xb.shape[0], x=xb).to(yb.dtype)
        err += torch.stack([p.pow(2).sum() for p in (yb - y_hat).double().split(places, 1)])
        cos += torch.nn.functional.cosine_similarity(yb, y_hat, dim=-1).double().sum()
        active = cols[vals != 0]
        nnz += active.numel()
        counts += torch.bincount(active, minlength=sae.cfg.d_sae).double().cpu()
    if was_training:
        sae.train()
    n = x.shape[0]
    dens = counts / n
    f = float(err.sum() / var.sum().clamp_min(1e-30))
    per_place = {} if len(places) == 1 else {
        f"fvu_place{i}": float(e / v.clamp_min(1e-30))
        for i, (e, v) in enumerate(zip(err, var, strict=True))}
    return {
        "mse": float(err.sum() / n),
        "fvu": f,
        "explained_variance": 1.0 - f,
        "cosine": float(cos / n),
        "l0": float(nnz / n),
        "dead_fraction": float((dens == 0).double().mean()),
        "dense_fraction": float((dens > DENSE_THRESHOLD).double().mean()),
        "n_tokens": n,
        **per_place,
    }


@torch.no_grad()
def support_jaccard(a, b, x: Tensor, batch_size: int = 8192) -> float:
    """Mean over tokens of ``|A ∩ B| / |A ∪ B|``, ``A`` and ``B`` the latents that ``a`` and
    ``b`` (SAEs, or SAEs seen through another encoder) make nonzero on the token (1 when both
    are empty): how much two encoders of one dictionary agree on the support.

    >>> import torch
    >>> from sae.models import SAE, SAEConfig
    >>> sae = SAE(SAEConfig(d_in=8, d_sae=32, k=4)).eval()
    >>> support_jaccard(sae, sae, torch.randn(10, 8))
    1.0
    """
    total = 0.0
    for start in range(0, x.shape[0], batch_size):
        xb = x[start : start + batch_size]
        n, width = xb.shape[0], a.cfg.d_sae
        keys = []
        for enc in (a, b):
            rows, cols, vals = enc.encode_pairs(xb)
            keep = vals != 0
            keys.append((rows[keep] * width + cols[keep], rows[keep]))
        (ka, ra), (kb, rb) = keys
        inter = torch.bincount(ra[torch.isin(ka, kb)], minlength=n).double()
        union = torch.bincount(ra, minlength=n) + torch.bincount(rb, minlength=n) - inter
        total += float(torch.where(union > 0, inter / union.clamp_min(1), 1.0).sum())
    return total / max(x.shape[0], 1)


def log_density(dens: Tensor) -> Tensor:
    """``log10`` feature density with dead latents at ``-inf`` replaced by -10 (SAELens'
    ``sparsity.safetensors`` convention stores log10 density)."""
    return torch.where(dens > 0, dens.clamp_min(1e-30).log10(), torch.full_like(dens, -10.0))


__all__ = [
    "DENSE_THRESHOLD",
    "cosine",
    "density",
    "density_histogram",
    "evaluate",
    "fvu",
    "l0",
    "log_density",
    "model_metrics",
    "mse",
    "support_jaccard",
]


@torch.no_grad()
def _written(sae, x: Tensor, widths: dict[str, int]) -> dict[str, Tensor]:
    """What ``sae`` writes at each place of ``widths`` (place -> width, in order) from the
    clean activations ``x (batch, ctx, d_in)`` it reads (all positions)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).to(sae.W_dec.dtype)
    rows, cols, vals = sae.encode_pairs(x2)
    y = sae.decode_pairs(rows, cols, vals, x2.shape[0], x=x2)
    return {p: part.reshape(*shape[:-1], -1) for p, part in
            zip(widths, y.split(list(widths.values()), dim=-1), strict=True)}


@torch.no_grad()
def model_metrics(
    model,
    sae,
    hookpoint: str | None,
    tokens: Tensor,
    *,
    batch_contexts: int = 8,
    massive_factor: float | None = MASSIVE_FACTOR,
    progress: bool = False,
    reference=None,
) -> dict[str, float]:
    """Language-model metrics of an SAE, transcoder or crosscoder spliced into the model (see
    docs/metrics.md).

    The dictionary reads and writes its places (:mod:`sae.wiring`; ``hookpoint`` is the place
    of an SAE whose metadata names none). For held-out contexts ``tokens (n_ctx, ctx)`` the
    model runs clean (recording the places), then with the written places' outputs replaced by
    what the dictionary computes from the clean activations (an SAE's reconstruction, a
    transcoder's estimate of its module's output, a crosscoder's reconstruction of all its
    layers at once), then with them replaced by zeros (zero ablation), at every position except
    position 0 and massive-norm positions (which the dictionary never trained on; they keep
    their activation in all three runs). Next-token cross-entropy and KL to the clean
    distribution are averaged over the predictions made at positions ``1 .. ctx-2``.

    Returns ``ce_clean``, ``ce_sae``, ``ce_zero``, ``ce_loss_recovered`` =
    ``(ce_zero - ce_sae) / (ce_zero - ce_clean)``, ``delta_lm_loss`` = ``ce_sae - ce_clean``,
    ``kl_sae``, ``kl_zero``, ``kl_recovered`` = ``1 - kl_sae / kl_zero``, the activation metrics
    of :func:`evaluate` on the spliced positions (FVU of the written activation), ``n_tokens``
    and ``fraction_spliced``; with a ``reference`` (the same SAE's trained encoder, when ``sae``
    is seen through a pursuit) also ``support_jaccard`` (:func:`support_jaccard`) on the
    spliced positions.
    """
    from tqdm.auto import tqdm

    from sparsecode.hooks import capture, patch

    from . import wiring

    if tokens.dim() != 2 or tokens.shape[1] < 3:
        raise ValueError(f"tokens must be (n_contexts, >= 3), got shape {tuple(tokens.shape)}")
    reads, writes = wiring.reads(sae.cfg, hookpoint), wiring.writes(sae.cfg, hookpoint)
    places = list(dict.fromkeys(reads + writes))
    device = next(model.parameters()).device
    sums = dict.fromkeys(("ce_clean", "ce_sae", "ce_zero", "kl_sae", "kl_zero"), 0.0)
    n_pred = 0
    xs, ys, n_positions = [], [], 0
    positions = MassiveFilter(massive_factor)  # BOS and massive positions keep their value
    sae.eval()
    for start in tqdm(range(0, tokens.shape[0], batch_contexts), disable=not progress,
                      desc="eval", unit="batch"):
        ids = tokens[start : start + batch_contexts].to(device)
        with capture(model, places) as cap:
            clean = model(input_ids=ids, use_cache=False).logits.float()
        acts = {p: cap[p] for p in places}
        keep = positions.keep_positions(acts)[..., None]
        x = torch.cat([acts[p] for p in reads], dim=-1)
        written = _written(sae, x, {p: acts[p].shape[-1] for p in writes})
        runs = {}
        for name, new in (("sae", written), ("zero", None)):
            values = {p: torch.where(keep, acts[p] * 0 if new is None else new[p].to(acts[p]),
                                     acts[p]) for p in writes}
            with patch(model, values):
                runs[name] = model(input_ids=ids, use_cache=False).logits.float()
        target = ids[:, 2:]  # predictions made at positions 1 .. ctx-2
        logp_clean = torch.log_softmax(clean[:, 1:-1], dim=-1)
        sums["ce_clean"] += float(-logp_clean.gather(-1, target[..., None]).sum())
        for name, logits in runs.items():
            logp = torch.log_softmax(logits[:, 1:-1], dim=-1)
            sums[f"ce_{name}"] += float(-logp.gather(-1, target[..., None]).sum())
            kl = (logp_clean.exp() * (logp_clean - logp)).sum(dim=-1)
            sums[f"kl_{name}"] += float(kl.sum())
        n_pred += target.numel()
        mask = keep[..., 0]
        xs.append(x[mask].float().cpu())
        if writes != reads:  # a transcoder's target
            ys.append(torch.cat([acts[p] for p in writes], -1)[mask].float().cpu())
        n_positions += ids[:, 1:].numel()
    out = {k: v / max(n_pred, 1) for k, v in sums.items()}
    gap = out["ce_zero"] - out["ce_clean"]
    out["ce_loss_recovered"] = (out["ce_zero"] - out["ce_sae"]) / gap if gap else float("nan")
    out["delta_lm_loss"] = out["ce_sae"] - out["ce_clean"]
    out["kl_recovered"] = 1 - out["kl_sae"] / out["kl_zero"] if out["kl_zero"] else float("nan")
    x = torch.cat(xs)
    out["fraction_spliced"] = x.shape[0] / max(n_positions, 1)
    if x.numel():
        dev = next(sae.parameters()).device
        y = torch.cat(ys).to(dev) if ys else None
        x = x.to(dev)
        out.update(evaluate(sae, x, y=y))
        if reference is not None:
            out["support_jaccard"] = support_jaccard(reference, sae, x)
    out["n_tokens"] = n_pred
    return out
