"""One sparse autoencoder module; the architectures differ only in the activation and the loss.

An SAE encoder is one step of the core's proximal-gradient iteration from zero (see
docs/architecture.md): ``z = act((x - b_dec) W_enc + b_enc)``, ``x_hat = z W_dec + b_dec``, and
``act`` is an operator of :mod:`sparsecode.core.operators`:

=================  ====================================================  =====================
architecture       activation while training                              saved as (inference)
=================  ====================================================  =====================
``relu``           ReLU (nonnegative soft threshold; L1 penalty in loss)  ``standard``
``topk``           ``TopK(k)``: k largest per token                       ``topk``
``batchtopk``      ``BatchTopK(k)``: k*B largest over the batch           ``jumprelu``
``jumprelu``       ``Jump(theta)`` with a learned per-latent threshold    ``jumprelu``
``matryoshka``     ``BatchTopK(k)``, loss summed over nested prefixes     ``jumprelu``
``mutual_choice``  ``BatchTopK(k)`` (free allocation of the k*B budget)   ``jumprelu``
``feature_choice`` ``FeatureChoice(m)``: each latent picks m = kB/d_sae   ``jumprelu``
=================  ====================================================  =====================

The batch-dependent activations keep a running threshold while training (an exponential moving
average of the smallest selected value: one global threshold, or one per latent for feature
choice) so that inference is a per-token JumpReLU, as SAELens does for BatchTopK.

Codes are kept as ``(rows, cols, values)`` pairs while training, selected by the core's fused
encoders (``topk_encode``, ``batch_topk_encode``, ``feature_choice_encode``, ``threshold_encode``:
no ``(N, d_sae)`` pre-activations) and decoded by its sparse decode; the encoder backward is
sparse too (:func:`sparsecode.core.kernels.gather_preact`). ``relu`` and ``jumprelu`` codes are
not sparse by construction, so they use the pairs only once the last batch's code was sparse
(``SPARSE_CODE_MAX_DENSITY``), and train densely before that.

Example
-------
>>> import torch
>>> from sae.models import SAE, SAEConfig
>>> sae = SAE(SAEConfig(d_in=8, d_sae=32, architecture="topk", k=4))
>>> x = torch.randn(16, 8)
>>> out = sae.training_forward(x)
>>> out.l0 <= 4
True
>>> sae.decode(sae.encode(x)).shape
torch.Size([16, 8])
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from sparsecode.core import operators as ops
from sparsecode.core.kernels import (
    batch_topk_encode,
    feature_choice_encode,
    preact,
    row_pairs,
    sorted_pairs,
    sparse_decode,
    sparse_preact,
    threshold_encode,
    topk_encode,
)

from . import losses

ARCHITECTURES: dict[str, str] = {
    "relu": "ReLU + L1 penalty weighted by decoder norms (Anthropic's April 2024 recipe)",
    "topk": "top-k per token (Gao et al. 2024), AuxK on dead latents",
    "batchtopk": "k*B largest over the batch (Bussmann et al. 2024), AuxK",
    "jumprelu": "learned per-latent threshold, L0 via straight-through estimator",
    "matryoshka": "batch top-k with nested latent prefixes, loss summed over prefixes",
    "mutual_choice": "budget k*B over all token-latent pairs (Ayonrinde 2024), aux_zipf",
    "feature_choice": "each latent picks its top m tokens (Ayonrinde 2024), aux_zipf",
}
BATCH_ARCHITECTURES = ("batchtopk", "matryoshka", "mutual_choice", "feature_choice")
SPARSE_ARCHITECTURES = ("topk", *BATCH_ARCHITECTURES)
JUMPRELU_MODES = ("step", "tanh", "quadratic")
#: ReLU / JumpReLU train on sparse pairs when the last batch had at most this fraction of its
#: ``(N, d_sae)`` code entries above the cut (CPU crossover measured at 0.09 for ReLU and 0.14
#: for JumpReLU by benchmarks/bench_sae_paths.py).
SPARSE_CODE_MAX_DENSITY = 0.08
#: The auxiliary (AuxK / aux_zipf) code is computed densely over its candidate latents only
#: while ``N * n_candidates`` is at most this (64 MiB of float32 pre-activations).
DENSE_AUX_MAX_ENTRIES = 2**24


def check_architecture(name: str) -> str:
    if name not in ARCHITECTURES:
        raise ValueError(
            f"unknown architecture {name!r}; known architectures: {', '.join(ARCHITECTURES)}"
        )
    return name


@dataclass
class SAEConfig:
    """Shape, architecture and loss settings of one SAE (everything the loss needs).

    ``k`` is the number of active latents per token (topk), or the average per token for the
    batch architectures; ``dead_tokens`` is the window (in tokens) after which a latent that has
    not fired counts as dead and joins the AuxK / aux_zipf loss.
    """

    d_in: int
    d_sae: int
    architecture: str = "topk"
    k: int = 32
    # relu: L1 weighted by decoder norms; jumprelu: L0 coefficient
    l1_coefficient: float = 5.0
    l0_coefficient: float = 10.0
    sparsity_warmup_tokens: int = 0
    # jumprelu
    jumprelu_mode: str = "quadratic"  # quadratic: (L0 / target_l0 - 1)^2, target_l0 = k
    target_l0: float | None = None
    bandwidth: float = 0.05
    threshold_init: float = 0.01
    tanh_scale: float = 4.0
    # matryoshka: fixed group sizes (sum = d_sae) or random log-uniform prefixes
    group_sizes: list[int] | None = None
    random_prefixes: bool = False
    # dead and under-used latents
    aux_k: int | None = None
    aux_coefficient: float = 1 / 32
    dead_tokens: int | None = None  # None: the trainer picks min(10M, run tokens / 20)
    zipf_exponent: float = 1.0
    # running inference threshold of the batch architectures (EMA rate)
    threshold_rate: float = 0.05
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_architecture(self.architecture)
        for name in ("d_in", "d_sae", "k"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.architecture in SPARSE_ARCHITECTURES and self.k > self.d_sae:
            raise ValueError(f"k={self.k} is larger than d_sae={self.d_sae}")
        if self.jumprelu_mode not in JUMPRELU_MODES:
            raise ValueError(
                f"unknown jumprelu_mode {self.jumprelu_mode!r}; use one of {JUMPRELU_MODES}"
            )
        if self.target_l0 is None:
            self.target_l0 = float(self.k)
        if self.target_l0 <= 0:
            raise ValueError(f"target_l0 must be > 0, got {self.target_l0}")
        if self.aux_k is None:
            self.aux_k = max(1, min(self.d_in // 2, self.d_sae))
        if self.architecture == "matryoshka" and self.group_sizes is None:
            self.group_sizes = default_group_sizes(self.d_sae)
        if self.group_sizes is not None:
            if sum(self.group_sizes) != self.d_sae or min(self.group_sizes) < 1:
                raise ValueError(
                    f"group_sizes {self.group_sizes} must be positive and sum to d_sae={self.d_sae}"
                )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_group_sizes(d_sae: int) -> list[int]:
    """Matryoshka groups of 1/16, 1/16, 1/8, 1/4, 1/2 of the latents (Bussmann et al. 2025)."""
    fractions = [1 / 16, 1 / 16, 1 / 8, 1 / 4]
    sizes = [max(1, int(d_sae * f)) for f in fractions]
    if sum(sizes) >= d_sae:
        return [d_sae]
    return [*sizes, d_sae - sum(sizes)]


@dataclass
class TrainOutput:
    """What one training forward returns."""

    loss: Tensor
    x_hat: Tensor
    terms: dict[str, float]
    l0: float
    counts: Tensor  # (n_latents,) int: tokens each latent fired on in this batch (this process)

    @property
    def fired(self) -> Tensor:
        """Latents active on this batch."""
        return self.counts > 0


def _all_reduce(t: Tensor, op: str, group: Any) -> Tensor:
    """In-place all-reduce over ``group`` (no-op without one); ``op`` is "sum", "max" or "min"."""
    if group is not None:
        import torch.distributed as dist

        dist.all_reduce(t, op=getattr(dist.ReduceOp, op.upper()), group=group)
    return t


class SAE(nn.Module):
    """Sparse autoencoder with SAELens parameter names and shapes:
    ``W_enc (d_in, d_sae)``, ``b_enc (d_sae)``, ``W_dec (d_sae, d_in)``, ``b_dec (d_in)``,
    ``threshold (d_sae)`` (JumpReLU and the batch architectures).

    ``encode``/``decode``/``forward`` give inference behaviour (dense codes, like SAELens);
    ``encode_pairs`` gives the sparse ``(rows, cols, values)`` form and ``training_forward``
    the loss.
    """

    def __init__(self, cfg: SAEConfig, *, generator: torch.Generator | None = None):
        super().__init__()
        self.cfg = cfg
        d, n = cfg.d_in, cfg.d_sae
        W = torch.randn(n, d, generator=generator)
        W = W / W.norm(dim=1, keepdim=True)
        if cfg.architecture == "relu":
            W = W * 0.1  # decoder-norm-weighted L1: start small (April 2024 update)
        self.W_dec = nn.Parameter(W.clone())
        self.W_enc = nn.Parameter(W.T.clone().contiguous())
        self.b_enc = nn.Parameter(torch.zeros(n))
        self.b_dec = nn.Parameter(torch.zeros(d))
        if cfg.architecture == "jumprelu":
            self.threshold = nn.Parameter(torch.full((n,), float(cfg.threshold_init)))
        else:
            self.register_buffer("threshold", torch.zeros(n))
        self.register_buffer("threshold_ready", torch.zeros((), dtype=torch.bool))
        self.register_buffer("tokens_since_fired", torch.zeros(n, dtype=torch.int64))
        self.register_buffer("fire_rate", torch.zeros(n))  # EMA of per-token firing frequency
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.int64))
        #: Process group over which the firing statistics and the running threshold are reduced
        #: (the data-parallel group; set by the trainer). ``None``: this process's batch only.
        self.stats_group: Any = None
        #: Fraction of code entries above the cut in the last ReLU / JumpReLU batch (chooses the
        #: sparse or dense training path; 1.0 until a batch has been seen).
        self._last_density = 1.0

    # ------------------------------------------------------------------ properties
    @property
    def architecture(self) -> str:
        return self.cfg.architecture

    @property
    def unit_decoder(self) -> bool:
        """Decoder rows are kept at unit norm (all but relu, which weighs L1 by the norms)."""
        return self.architecture != "relu"

    @property
    def inference_architecture(self) -> str:
        """SAELens ``architecture`` for the saved model."""
        a = self.architecture
        return {"relu": "standard", "topk": "topk"}.get(a, "jumprelu")

    def dead_mask(self) -> Tensor:
        window = self.cfg.dead_tokens if self.cfg.dead_tokens is not None else 10_000_000
        return self.tokens_since_fired >= window

    # ------------------------------------------------------------------ inference
    def _pre(self, x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        W = self.W_enc.T
        if dtype is not None and dtype != W.dtype:
            W = W.to(dtype)
        return preact(x, W, self.b_enc, self.b_dec).to(x.dtype)

    def _inference_operator(self) -> ops.Projection | None:
        a = self.architecture
        if a == "topk":
            return ops.TopK(self.cfg.k, positive=True)
        if a == "relu":
            return None
        return ops.Jump(self.threshold.detach().clamp_min(0))

    def encode(self, x: Tensor) -> Tensor:
        """Dense latents ``(..., d_sae)`` as the saved (inference) model computes them."""
        shape = x.shape
        pre = self._pre(x.reshape(-1, shape[-1]))
        op = self._inference_operator()
        z = pre.relu() if op is None else op.project(pre)
        return z.reshape(*shape[:-1], self.cfg.d_sae)

    def decode(self, z: Tensor) -> Tensor:
        """``z W_dec + b_dec`` for dense latents ``(..., d_sae)``."""
        return z @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    def encode_pairs(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Inference code of a 2-D ``x`` as ``(rows, cols, values)`` sorted by row then latent,
        without the ``(N, d_sae)`` pre-activations (the core's fused encoders: top-k for
        ``topk``, a threshold of 0 / ``max(theta, 0)`` for the others).

        >>> sae = SAE(SAEConfig(d_in=8, d_sae=32, architecture="topk", k=4)).eval()
        >>> x = torch.randn(5, 8)
        >>> rows, cols, vals = sae.encode_pairs(x)
        >>> torch.allclose(sae.decode_pairs(rows, cols, vals, 5), sae(x), atol=1e-6)
        True
        """
        W_rows = self.W_enc.T
        if self.architecture != "topk":
            theta = 0.0 if self.architecture == "relu" else self.threshold.detach().clamp_min(0)
            return threshold_encode(x, W_rows, self.b_enc, self.b_dec, theta)
        v, idx = topk_encode(x, W_rows, self.b_enc, self.b_dec, self.cfg.k)
        return sorted_pairs(*row_pairs(v, idx), self.cfg.d_sae, positive=True)

    def decode_pairs(self, rows: Tensor, cols: Tensor, values: Tensor, n_rows: int) -> Tensor:
        """``x_hat (n_rows, d_in)`` of a code given as pairs (what :meth:`encode_pairs` returns):
        the core's sparse decode, ``k`` decoder rows gathered per token."""
        return sparse_decode(values, rows, cols, self.W_dec, n_rows, bias=self.b_dec)

    # ------------------------------------------------------------------ training
    def training_forward(
        self,
        x: Tensor,
        *,
        sparsity_scale: float = 1.0,
        matmul_dtype: torch.dtype | None = None,
        generator: torch.Generator | None = None,
    ) -> TrainOutput:
        """Loss on a batch ``x (N, d_in)`` and statistics; updates the running threshold and
        the dead-latent counters (buffers) when the module is in training mode.

        ``sparsity_scale`` multiplies the L1 / L0 coefficient (warm-up); ``matmul_dtype``
        (e.g. ``torch.bfloat16``) runs the encoder matmul in that precision."""
        if x.dim() != 2 or x.shape[1] != self.cfg.d_in:
            raise ValueError(
                f"expected activations of shape (N, {self.cfg.d_in}), got {tuple(x.shape)}"
            )
        if self.architecture in SPARSE_ARCHITECTURES:
            out = self._sparse_forward(x, matmul_dtype, generator)
        else:
            out = self._threshold_forward(x, sparsity_scale, matmul_dtype)
        if self.training:
            self._update_statistics(out.counts, x.shape[0])
        return out

    @torch.no_grad()
    def _update_statistics(self, counts: Tensor, n_tokens: int) -> None:
        """Firing-rate EMA and tokens-since-fired, over the whole data-parallel batch."""
        if self.stats_group is not None:
            import torch.distributed as dist

            counts = _all_reduce(counts.clone(), "sum", self.stats_group)
            n_tokens *= dist.get_world_size(self.stats_group)
        rate = counts.float() / max(n_tokens, 1)
        if int(self.tokens_seen) == 0:
            self.fire_rate.copy_(rate)
        else:
            self.fire_rate.mul_(1 - self.cfg.threshold_rate).add_(
                rate, alpha=self.cfg.threshold_rate
            )
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired[counts > 0] = 0
        self.tokens_seen += n_tokens

    def _code_cut(self) -> Tensor | float:
        """Pre-activations above this take part in the ReLU / JumpReLU loss or its gradient:
        ``0`` for ReLU; for JumpReLU ``theta - bandwidth / 2``, where the straight-through
        estimator's window starts (entries below it have no value and no gradient)."""
        if self.architecture == "relu":
            return 0.0
        return self.threshold.detach() - self.cfg.bandwidth / 2

    def _threshold_forward(self, x: Tensor, scale: float, matmul_dtype) -> TrainOutput:
        """ReLU / JumpReLU loss on a batch, sparse or dense, the same loss and gradients.

        When the last batch's code was sparse (at most ``SPARSE_CODE_MAX_DENSITY`` of the
        ``(N, d_sae)`` entries above :meth:`_code_cut`) the code is encoded as pairs by
        :func:`~sparsecode.core.kernels.threshold_encode` (no dense pre-activations, sparse
        decode and backward); otherwise (early training, or the first batch) densely."""
        cfg, N = self.cfg, x.shape[0]
        if self._last_density > SPARSE_CODE_MAX_DENSITY:
            pre = self._pre(x, matmul_dtype)
            rows, cols = None, None
            self._last_density = float((pre.detach() > self._code_cut()).float().mean())
        else:
            rows, cols, pre = threshold_encode(x, self.W_enc.T, self.b_enc, self.b_dec,
                                               self._code_cut(), matmul_dtype=matmul_dtype)
            self._last_density = rows.numel() / max(1, N * cfg.d_sae)
        dn = self.W_dec.norm(dim=1)
        if cols is not None:
            dn = dn[cols]
        terms: dict[str, Tensor] = {}
        if self.architecture == "relu":
            z = pre.relu()
            sparsity = (z * dn).sum() / N
            terms["l1"] = cfg.l1_coefficient * scale * sparsity
        else:  # jumprelu
            theta = self.threshold if cols is None else self.threshold[cols]
            z = losses.JumpReLUFn.apply(pre, theta, cfg.bandwidth)
            if cfg.jumprelu_mode == "tanh":
                l0 = torch.tanh(cfg.tanh_scale * z * dn).sum() / N
            else:
                l0 = losses.StepFn.apply(pre, theta, cfg.bandwidth).sum() / N
            if cfg.jumprelu_mode == "quadratic":
                terms["l0_loss"] = cfg.l0_coefficient * scale * (l0 / cfg.target_l0 - 1).pow(2)
            else:
                terms["l0_loss"] = cfg.l0_coefficient * scale * l0
        if cols is None:
            x_hat = z @ self.W_dec + self.b_dec
            counts = (z > 0).sum(dim=0)
        else:
            x_hat = sparse_decode(z, rows, cols, self.W_dec, N, bias=self.b_dec)
            counts = torch.bincount(cols[z.detach() > 0], minlength=cfg.d_sae)
        terms = {"mse": losses.mse(x, x_hat), **terms}
        return TrainOutput(
            loss=sum(terms.values()),
            x_hat=x_hat,
            terms={k: float(v.detach()) for k, v in terms.items()},
            l0=float(counts.sum()) / max(N, 1),
            counts=counts,
        )

    def _sparse_forward(self, x: Tensor, matmul_dtype, generator) -> TrainOutput:
        cfg = self.cfg
        N = x.shape[0]
        W_rows = self.W_enc.T  # (d_sae, d_in) view
        if self.architecture == "topk":
            rows, cols, vals = self._fused_topk(x, W_rows, matmul_dtype)
        else:
            if self.architecture == "feature_choice":  # each latent picks its top m tokens
                m = max(1, math.ceil(cfg.k * N / cfg.d_sae))
                rows, cols, vals = feature_choice_encode(x, W_rows, self.b_enc, self.b_dec, m,
                                                         matmul_dtype=matmul_dtype)
            else:  # the batch top-k family: k * N winners over the batch, two passes
                rows, cols, vals = batch_topk_encode(x, W_rows, self.b_enc, self.b_dec, cfg.k,
                                                     matmul_dtype=matmul_dtype)

        terms: dict[str, Tensor] = {}
        if self.architecture == "matryoshka":
            groups = self._groups(generator, x.device)
            parts = self._decode_pairs(vals, rows, cols, N, groups=groups)
            prefixes = parts.cumsum(dim=1) + self.b_dec  # (N, G, d): every prefix, one pass
            errs = (x.unsqueeze(1) - prefixes).pow(2).sum(dim=-1).mean(dim=0)  # (G,)
            x_hat = prefixes[:, -1]
            terms["mse"] = errs[-1]
            terms["matryoshka"] = errs[:-1].sum()
        else:
            x_hat = self._decode_pairs(vals, rows, cols, N) + self.b_dec
            terms["mse"] = losses.mse(x, x_hat)

        e_hat = self._aux_reconstruction(x, W_rows, matmul_dtype)
        if e_hat is not None:
            residual = (x - x_hat).detach()
            name = "aux_zipf" if self._uses_zipf else "auxk"
            aux = losses.normalized_mse(residual, e_hat, self.stats_group)
            terms[name] = cfg.aux_coefficient * aux

        counts = torch.bincount(cols, minlength=self.W_dec.shape[0])
        if self.training and self.architecture in BATCH_ARCHITECTURES:
            self._update_threshold(vals.detach(), cols)
        loss = sum(terms.values())
        return TrainOutput(
            loss=loss,
            x_hat=x_hat,
            terms={k: float(v.detach()) for k, v in terms.items()},
            l0=rows.numel() / max(N, 1),
            counts=counts,
        )

    def _decode_pairs(
        self,
        vals: Tensor,
        rows: Tensor,
        cols: Tensor,
        n_rows: int,
        groups: Tensor | None = None,
    ) -> Tensor:
        """``sum vals * W_dec[cols]`` per row, without ``b_dec`` (per group with ``groups``)."""
        return sparse_decode(vals, rows, cols, self.W_dec, n_rows, groups=groups)

    def _fused_topk(self, x: Tensor, W_rows: Tensor, matmul_dtype) -> tuple[Tensor, ...]:
        """TopK code pairs without the ``(N, d_sae)`` pre-activations: the fused
        :func:`~sparsecode.core.kernels.topk_encode` (Triton on GPU, row chunks on CPU), sorted
        by row."""
        v, idx = topk_encode(x, W_rows, self.b_enc, self.b_dec, self.cfg.k,
                             matmul_dtype=matmul_dtype)
        return row_pairs(v, idx, keep=v > 0)

    def _aux_reconstruction(self, x: Tensor, W_rows: Tensor, matmul_dtype) -> Tensor | None:
        """``e_hat (N, d_in)``: the auxiliary code (AuxK / aux_zipf) decoded without ``b_dec``,
        or None when the loss is off this step.

        The code holds the top ``aux_k`` (weighted) pre-activations per token among the candidate
        latents. When it is dense within them (more than ``SPARSE_CODE_MAX_DENSITY`` of their
        entries, e.g. ``aux_k`` close to the number of dead latents) and small, it is encoded and
        decoded with dense matmuls over the candidates' rows (:meth:`_dense_aux`); otherwise as
        pairs (:meth:`_encoded_aux`, sparse decode). Both give the same loss and gradients.

        ``W_rows`` is the same ``W_enc.T`` view the main code used: autograd then sums the two
        ``(d_sae, d_in)`` gradients before the one transposed copy into ``W_enc.grad``."""
        cand, u = self._aux_candidates(x.device)
        if cand.numel() == 0:
            return None
        k_aux = min(self.cfg.aux_k, cand.numel())
        if (k_aux > SPARSE_CODE_MAX_DENSITY * cand.numel()
                and x.shape[0] * cand.numel() <= DENSE_AUX_MAX_ENTRIES):
            return self._dense_aux(x, W_rows, cand, u, k_aux)
        rows, cols, vals, w = self._encoded_aux(x, W_rows, cand, u, k_aux, matmul_dtype)
        return self._decode_pairs(vals if w is None else vals * w, rows, cols, x.shape[0])

    def _dense_aux(self, x: Tensor, W_rows: Tensor, cand: Tensor, u: Tensor | None,
                   k_aux: int) -> Tensor:
        """The auxiliary reconstruction through the ``(N, n_cand)`` pre-activations of the
        candidate latents: the core's ``TopK(k_aux, positive=True)`` projection of the (weighted)
        pre-activations, in the parameters' precision. ``u > 0`` on the candidates, so
        ``relu(pre) * u`` is ``relu(pre * u)``: selection and values come from one key."""
        key = preact(x, W_rows[cand], self.b_enc[cand], self.b_dec)
        if u is not None:
            key = key * u[cand].to(key.dtype)
        return ops.TopK(k_aux, positive=True).project(key) @ self.W_dec[cand]

    def _aux_candidates(self, device: torch.device) -> tuple[Tensor, Tensor | None]:
        """Latents the auxiliary loss may use and their weights: the dead ones (AuxK, no
        weights), or the under-used ones weighted by their Zipf shortfall (aux_zipf; a dead
        latent has weight 1, so aux_zipf generalises AuxK). Empty when the loss is off."""
        if self.cfg.aux_coefficient == 0 or not self.training:
            return torch.empty(0, dtype=torch.long, device=device), None
        if not self._uses_zipf:
            return self.dead_mask().nonzero(as_tuple=True)[0], None
        u = losses.underuse(self.fire_rate, self.cfg.k, self.cfg.zipf_exponent)
        u = torch.where(self.dead_mask(), torch.ones_like(u), u)
        return (u > 0).nonzero(as_tuple=True)[0], u

    def _encoded_aux(self, x: Tensor, W_rows: Tensor, cand: Tensor, u: Tensor | None,
                     k_aux: int, matmul_dtype) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """Auxiliary pairs ``(rows, cols, values, weights)``: the top ``k_aux`` (weighted)
        pre-activations per token among the candidate latents ``cand``, encoded against those
        latents' encoder rows only (no ``(N, d_sae)`` pre-activations). When more than half
        the latents are dead, AuxK encodes against all rows with the live ones masked instead
        of copying the dead rows."""
        with torch.no_grad():
            if u is None and 2 * cand.numel() > self.cfg.d_sae:
                # many dead latents: all rows, the others masked by a -inf bias (no row copy)
                cand = torch.arange(self.cfg.d_sae, device=x.device)
                W_c = W_rows
                b_c = self.b_enc.masked_fill(~self.dead_mask(), -math.inf)
            else:
                W_c, b_c = W_rows[cand], self.b_enc[cand]
            if u is not None:  # select on u * pre: scale the rows (u > 0 on candidates)
                scale = u[cand].to(W_c.dtype)
                W_c, b_c = W_c * scale[:, None], b_c * scale
            av, ai = topk_encode(x, W_c, b_c, self.b_dec, k_aux, matmul_dtype=matmul_dtype)
            rows, local, v = row_pairs(av, ai, keep=av > 0)
            if u is not None:
                v = v / scale[local]
        cols = cand[local]
        vals = sparse_preact(x, W_rows, self.b_enc, self.b_dec, rows, cols, v)
        return rows, cols, vals, (None if u is None else u[cols])

    @property
    def _uses_zipf(self) -> bool:
        return self.architecture in ("mutual_choice", "feature_choice")

    def _groups(self, generator, device) -> Tensor:
        cfg = self.cfg
        if cfg.random_prefixes:
            n_cuts = max(1, len(cfg.group_sizes or default_group_sizes(cfg.d_sae)) - 1)
            cuts = losses.log_uniform_cuts(n_cuts, cfg.d_sae, generator)
        else:
            sizes = cfg.group_sizes or [cfg.d_sae]
            cuts = torch.tensor(sizes).cumsum(0)[:-1].tolist()
        group_of = torch.zeros(cfg.d_sae, dtype=torch.long, device=device)
        for c in cuts:
            group_of[c:] += 1
        return group_of

    def _update_threshold(self, vals: Tensor, cols: Tensor) -> None:
        """EMA of the smallest selected value (global, or per latent for feature choice)."""
        if vals.numel() == 0 and self.stats_group is None:
            return
        rate = self.cfg.threshold_rate
        with torch.no_grad():
            if self.architecture == "feature_choice":
                inf = torch.full_like(self.threshold, math.inf)
                low = inf.scatter_reduce(0, cols, vals.to(inf.dtype), reduce="amin")
                _all_reduce(low, "min", self.stats_group)
                seen = torch.isfinite(low)
                if not bool(self.threshold_ready):
                    self.threshold[seen] = low[seen]
                else:
                    self.threshold[seen] = (1 - rate) * self.threshold[seen] + rate * low[seen]
            else:
                low = vals.min() if vals.numel() else torch.tensor(math.inf)
                low = _all_reduce(low.to(self.threshold).reshape(1), "min", self.stats_group)[0]
                if not torch.isfinite(low):
                    return
                if not bool(self.threshold_ready):
                    self.threshold.fill_(low)
                else:
                    self.threshold.mul_(1 - rate).add_(rate * low)
            self.threshold_ready.fill_(True)

    # ------------------------------------------------------------------ optimisation helpers
    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        """Scale the gradients so that their global norm is at most ``max_norm``."""
        return torch.nn.utils.clip_grad_norm_(self.parameters(), max_norm)

    def full_state_dict(self) -> dict[str, Tensor]:
        """The whole SAE's state (a latent-sharded SAE gathers its shards here)."""
        return self.state_dict()

    def load_full_state_dict(self, state: dict[str, Tensor]) -> None:
        """Load a whole SAE's state (a latent-sharded SAE keeps its slice)."""
        self.load_state_dict(state)

    def gather(self) -> SAE:
        """The whole SAE (itself; a latent-sharded SAE assembles a new one from its shards)."""
        return self

    def full_tensor(self, name: str, t: Tensor) -> Tensor:
        """A tensor shaped like parameter/buffer ``name`` (e.g. an Adam moment), whole."""
        return t

    def local_tensor(self, name: str, t: Tensor) -> Tensor:
        """This process's part of a whole tensor shaped like parameter/buffer ``name``."""
        return t

    # ------------------------------------------------------------------ decoder constraint
    @torch.no_grad()
    def remove_parallel_gradient(self) -> None:
        """Project each decoder row's gradient onto the row's tangent space (unit-norm decoder)."""
        g = self.W_dec.grad
        if g is None or not self.unit_decoder:
            return
        W = self.W_dec
        g.addcmul_(torch.linalg.vecdot(g, W)[:, None], W, value=-1)  # no (d_sae, d_in) temporaries

    @torch.no_grad()
    def constrain(self) -> None:
        """After an optimizer step: decoder rows back to unit norm (all but relu), JumpReLU
        thresholds kept positive."""
        if self.unit_decoder:
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
        if self.architecture == "jumprelu":
            self.threshold.clamp_(min=1e-6)
