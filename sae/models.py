"""One sparse autoencoder module; architectures are presets of independent parts.

An SAE encoder is one step of the core's proximal-gradient iteration from zero (see
docs/architecture.md): ``z = act((x - b_dec) W_enc + b_enc)``, ``x_hat = z W_dec + b_dec``, and
``act`` is a projection of :mod:`sparsecode.core.operators`. The SAE holds its preset
(:data:`sae.architectures.ARCHITECTURES`: activation, threshold, penalty, auxiliary loss,
Matryoshka prefixes, SAELens name) and calls the parts; it has no per-architecture branch:

=================  ====================================================  =====================
architecture       activation while training                              saved as (inference)
=================  ====================================================  =====================
``relu``           ``Jump(0)`` = ReLU; L1 penalty in the loss             ``standard``
``topk``           ``TopK(k)``: k largest per token                       ``topk``
``batchtopk``      ``BatchTopK(k)``: k*B largest over the batch           ``jumprelu``
``jumprelu``       ``Jump(theta)`` with a learned per-latent threshold    ``jumprelu``
``matryoshka``     ``BatchTopK(k)``, loss summed over nested prefixes     ``jumprelu``
``mutual_choice``  ``BatchTopK(k)`` (free allocation of the k*B budget)   ``jumprelu``
``feature_choice`` ``FeatureChoice(k)``: each latent picks kB/d_sae       ``jumprelu``
=================  ====================================================  =====================

The batch-dependent activations keep a running threshold while training (an exponential moving
average of the smallest selected value: one global threshold, or one per latent for feature
choice) so that inference is a per-token JumpReLU, as SAELens does for BatchTopK.

Codes are kept as ``(rows, cols, values)`` pairs while training, selected by the activation's
``encode`` (the core's fused encoders: no ``(N, d_sae)`` pre-activations) and decoded by its
sparse decode; the encoder backward is sparse too (:func:`sparsecode.core.kernels.gather_preact`).
Activations that do not bound the number of nonzeros (ReLU, JumpReLU) use the pairs once the last
batch's code was sparse (``SPARSE_CODE_MAX_DENSITY``), and train densely before that.

Collectives (latent sharding over several processes, :mod:`sae.distributed`) go through
``sae.collective``; on one process it does nothing.

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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from sparsecode.core import operators as ops
from sparsecode.core.kernels import preact, sorted_pairs, sparse_decode

from . import aux, losses
from .architectures import (
    ARCHITECTURES,
    INFERENCE,
    Activation,
    Architecture,
    default_group_sizes,
)
from .config import SAEConfig

__all__ = ["ARCHITECTURES", "SAE", "Code", "OneProcess", "SAEConfig", "TrainOutput"]


def dense_latents(encode_pairs: Callable[[Tensor], tuple[Tensor, Tensor, Tensor]], x: Tensor,
                  d_sae: int) -> Tensor:
    """Dense latents ``(..., d_sae)`` of ``x`` from an ``encode_pairs`` of 2-D inputs (its
    ``(rows, cols, values)`` scattered).

    >>> pairs = lambda x: (torch.tensor([0, 1]), torch.tensor([2, 0]), torch.tensor([5.0, 1.0]))
    >>> dense_latents(pairs, torch.zeros(2, 4), d_sae=3).tolist()
    [[0.0, 0.0, 5.0], [1.0, 0.0, 0.0]]
    """
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    rows, cols, vals = encode_pairs(x2)
    z = vals.new_zeros(x2.shape[0], d_sae).index_put((rows, cols), vals)
    return z.reshape(*shape[:-1], d_sae)


#: ReLU / JumpReLU train on sparse pairs when the last batch had at most this fraction of its
#: ``(N, d_sae)`` code entries above the cut (CPU crossover measured at 0.09 for ReLU and 0.14
#: for JumpReLU by benchmarks/bench_sae_paths.py).
SPARSE_CODE_MAX_DENSITY = 0.08


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


@dataclass
class Code:
    """One batch's code: ``(rows, cols)`` pairs with the pre-activations ``pre`` and the code's
    ``values`` there, or dense ``(n_rows, n_latents)`` tensors when ``cols`` is None."""

    pre: Tensor
    values: Tensor
    n_rows: int
    rows: Tensor | None = None
    cols: Tensor | None = None

    def at(self, per_latent: Tensor) -> Tensor:
        """A per-latent tensor at the code's entries (broadcast over the rows when dense)."""
        return per_latent if self.cols is None else per_latent[self.cols]

    def counts(self, n_latents: int) -> Tensor:
        """Tokens each latent fires on (value > 0)."""
        fired = self.values.detach() > 0
        if self.cols is None:
            return fired.sum(dim=0)
        return torch.bincount(self.cols[fired], minlength=n_latents)


def _all_reduce(t: Tensor, op: str, group: Any) -> Tensor:
    """In-place all-reduce over ``group`` (no-op without one); ``op`` is "sum", "max" or "min"."""
    if group is not None:
        import torch.distributed as dist

        dist.all_reduce(t, op=getattr(dist.ReduceOp, op.upper()), group=group)
    return t


class OneProcess:
    """The SAE's collective when all its latents live in this process: every operation is the
    local one. :class:`sae.distributed.LatentShards` is the latent-sharded implementation."""

    offset = 0
    local = True

    def encode(self, op: ops.Projection, x: Tensor, W_rows: Tensor, b_enc: Tensor,
               b_dec: Tensor, matmul_dtype: torch.dtype | None) -> tuple[Tensor, Tensor, Tensor]:
        """The activation's pairs ``(rows, cols, pre)`` (pre-activations with gradients)."""
        return op.encode(x, W_rows, b_enc, b_dec, matmul_dtype=matmul_dtype)

    def topk(self, x: Tensor, W_rows: Tensor, b_enc: Tensor, b_dec: Tensor, k: int,
             matmul_dtype: torch.dtype | None, latents: Tensor | None = None
             ) -> tuple[Tensor, Tensor, Tensor]:
        """Positive top-``k`` pairs among the rows of ``W_rows`` (no gradient), as indices into
        those rows; ``latents`` (this process's latent of each row, increasing) matters only
        where the selection spans processes."""
        with torch.no_grad():
            return ops.TopK(k, positive=True).encode(x, W_rows, b_enc, b_dec,
                                                     matmul_dtype=matmul_dtype)

    def decode(self, vals: Tensor, rows: Tensor, cols: Tensor, W_dec: Tensor, n_rows: int,
               groups: Tensor | None = None) -> Tensor:
        """``sum vals * W_dec[cols]`` per row (per group with ``groups``), without ``b_dec``."""
        return sparse_decode(vals, rows, cols, W_dec, n_rows, groups=groups)

    def share(self, t: Tensor) -> Tensor:
        """A replicated tensor used by this process's part of the computation."""
        return t

    def total(self, n: int) -> int:
        """A count summed over the processes holding latents."""
        return n

    def whole(self, name: str, t: Tensor) -> Tensor:
        """A tensor shaped like this process's parameter / buffer ``name``, whole."""
        return t

    def part(self, name: str, t: Tensor) -> Tensor:
        """This process's part of a whole tensor shaped like parameter / buffer ``name``."""
        return t

    def clip_grad_norm_(self, sae: SAE, max_norm: float) -> Tensor:
        """Scale the gradients so that their global norm is at most ``max_norm``."""
        return torch.nn.utils.clip_grad_norm_(sae.parameters(), max_norm)

    def gather(self, sae: SAE) -> SAE:
        """The whole SAE."""
        return sae


ONE_PROCESS = OneProcess()


class SAE(nn.Module):
    """Sparse autoencoder with SAELens parameter names and shapes:
    ``W_enc (d_in, d_sae)``, ``b_enc (d_sae)``, ``W_dec (d_sae, d_in)``, ``b_dec (d_in)``,
    ``threshold (d_sae)`` (a parameter for JumpReLU, a buffer otherwise).

    ``encode``/``decode``/``forward`` give inference behaviour (dense codes, like SAELens);
    ``encode_pairs`` gives the sparse ``(rows, cols, values)`` form and ``training_forward``
    the loss. ``n_latents`` (default ``cfg.d_sae``) is the number of latents this process
    holds when the SAE is latent-sharded.
    """

    def __init__(self, cfg: SAEConfig, *, generator: torch.Generator | None = None,
                 n_latents: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.arch: Architecture = ARCHITECTURES[cfg.architecture]
        d, d_out, n = cfg.d_in, cfg.d_out, n_latents or cfg.d_sae
        W = torch.randn(n, d, generator=generator)
        W = W / W.norm(dim=1, keepdim=True)
        if not self.arch.unit_decoder:
            W = W * 0.1  # decoder-norm-weighted L1: start small (April 2024 update)
        if d_out != d:  # a transcoder's decoder: its own random unit rows
            W_dec = torch.randn(n, d_out, generator=generator)
            W_dec = W_dec / W_dec.norm(dim=1, keepdim=True)
            W_dec = W_dec * (1.0 if self.arch.unit_decoder else 0.1)
        else:
            W_dec = W.clone()
        self.W_dec = nn.Parameter(W_dec)
        if self.arch.tied:  # W_enc is W_dec^T (see __getattr__); no encoder bias
            self.register_buffer("b_enc", torch.zeros(n))
        else:
            self.W_enc = nn.Parameter(W.T.clone().contiguous())
            self.b_enc = nn.Parameter(torch.zeros(n))
        self.b_dec = nn.Parameter(torch.zeros(d_out))
        if cfg.skip:  # skip transcoder: a linear term, starting at zero (as SAELens, sparsify)
            self.W_skip = nn.Parameter(torch.zeros(d_out, d))
        if cfg.transcode:  # a fixed centre of the input (folded into b_enc when saved)
            self.register_buffer("x_centre", torch.zeros(d))
        if self.arch.threshold == "learned":
            self.threshold = nn.Parameter(torch.full((n,), float(cfg.threshold_init)))
        else:
            self.register_buffer("threshold", torch.zeros(n))
        self.register_buffer("threshold_ready", torch.zeros((), dtype=torch.bool))
        self.register_buffer("tokens_since_fired", torch.zeros(n, dtype=torch.int64))
        self.register_buffer("fire_rate", torch.zeros(n))  # EMA of per-token firing frequency
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.int64))
        if self.arch.learner == "online":  # code statistics of online dictionary learning
            self.register_buffer("stat_A", torch.zeros(n, n))
            self.register_buffer("stat_B", torch.zeros(n, d))
            self.register_buffer("online_steps", torch.zeros((), dtype=torch.int64))
        #: Process group over which the firing statistics and the running threshold are reduced
        #: (the data-parallel group; set by the trainer). ``None``: this process's batch only.
        self.stats_group: Any = None
        #: Where the latents live (one process, or latent shards: :mod:`sae.distributed`).
        self.collective: Any = ONE_PROCESS
        #: Fraction of code entries above the cut in the last batch of an unbounded activation
        #: (chooses the sparse or dense training path; 1.0 until a batch has been seen).
        self._last_density = 1.0

    def __getattr__(self, name: str) -> Any:
        if name == "W_enc" and self.arch.tied:  # a tied SAE's encoder is its decoder
            return self.W_dec.T
        return super().__getattr__(name)

    # ------------------------------------------------------------------ parts
    @property
    def architecture(self) -> str:
        return self.cfg.architecture

    @property
    def n_latents(self) -> int:
        """Latents held by this process (``d_sae`` unless latent-sharded)."""
        return self.W_dec.shape[0]

    @property
    def b_in(self) -> Tensor:
        """What the encoder subtracts from its input: ``b_dec`` for an autoencoder or a
        crosscoder (input and output are one space); for a transcoder, whose ``b_dec`` lives in
        the output space, the fixed buffer ``x_centre``: the centre of its first training batch
        (:func:`sae.initialise.initialise`), zero once saved (it is folded into ``b_enc``).
        Without it a mean-dominated input (an MLP's normalised input) lets the encoder's updates
        along the mean push most latents below zero for good."""
        return self.x_centre if self.cfg.transcode else self.b_dec

    def decoder_norms(self) -> Tensor:
        """Each latent's decoder norm: the row norm, or for a crosscoder the sum over places of
        the per-place row norms (Lindsey et al. 2024), which the L1 penalty weighs by."""
        if self.cfg.places is None:
            return self.W_dec.norm(dim=1)
        return sum(part.norm(dim=1) for part in self.W_dec.split(self.cfg.places, dim=1))

    def skip_term(self, x: Tensor) -> Tensor | None:
        """A skip transcoder's linear term ``x W_skip^T`` (None without a skip)."""
        return x @ self.W_skip.T.to(x.dtype) if self.cfg.skip else None

    @property
    def unit_decoder(self) -> bool:
        """Decoder rows are kept at unit norm (all but relu, which weighs L1 by the norms)."""
        return self.arch.unit_decoder

    @property
    def inference_architecture(self) -> str:
        """SAELens ``architecture`` of the saved model."""
        return self.arch.saelens

    @property
    def activation(self) -> Activation:
        """The training activation: the preset's core operator, bound to this SAE's threshold."""
        return self.arch.activation(self.cfg, self.threshold)

    def inference_activation(self) -> Activation:
        """The per-token activation of the saved model (TopK, ReLU, JumpReLU or matching
        pursuit)."""
        return INFERENCE[self.arch.saelens](self.cfg, self.threshold)

    def dead_mask(self) -> Tensor:
        window = self.cfg.dead_tokens if self.cfg.dead_tokens is not None else 10_000_000
        return self.tokens_since_fired >= window

    # ------------------------------------------------------------------ inference
    def _pre(self, x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        W = self.W_enc.T
        if dtype is not None and dtype != W.dtype:
            W = W.to(dtype)
        return preact(x, W, self.b_enc, self.b_in).to(x.dtype)

    def encode(self, x: Tensor, encoder: str = "trained", **settings: Any) -> Tensor:
        """Dense latents ``(..., d_sae)`` as the saved (inference) model computes them; with
        ``encoder`` (``mp``, ``omp``, ``ormp``, ``nnomp``, ``fista``) by that pursuit on the
        decoder instead (:mod:`sae.encoders`; ``k``, ``tol``, ``alpha`` in ``settings``)."""
        if encoder != "trained":
            from .encoders import Encoded

            return Encoded(self, encoder, **settings).encode(x)
        op = self.inference_activation()
        if not isinstance(op, ops.Projection):  # a pursuit: no pre-activations
            return dense_latents(self.encode_pairs, x, self.cfg.d_sae)
        shape = x.shape
        z = op.project(self._pre(x.reshape(-1, shape[-1])))
        return z.reshape(*shape[:-1], self.cfg.d_sae)

    def decode(self, z: Tensor) -> Tensor:
        """``z W_dec + b_dec`` for dense latents ``(..., d_sae)`` (a skip transcoder's skip
        term is added by :meth:`forward`, which has the input)."""
        return z @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        """The reconstruction (an autoencoder), or the written activation ``(..., d_out)``
        (a transcoder: decoded latents plus the skip term)."""
        out = self.decode(self.encode(x))
        skip = self.skip_term(x)
        return out if skip is None else out + skip

    def encode_pairs(self, x: Tensor, encoder: str = "trained", **settings: Any
                     ) -> tuple[Tensor, Tensor, Tensor]:
        """Inference code of a 2-D ``x`` as ``(rows, cols, values)`` sorted by row then latent,
        without the ``(N, d_sae)`` pre-activations (the inference activation's fused encode;
        another ``encoder`` as in :meth:`encode`).

        >>> sae = SAE(SAEConfig(d_in=8, d_sae=32, architecture="topk", k=4)).eval()
        >>> x = torch.randn(5, 8)
        >>> rows, cols, vals = sae.encode_pairs(x)
        >>> torch.allclose(sae.decode_pairs(rows, cols, vals, 5), sae(x), atol=1e-6)
        True
        """
        if encoder != "trained":
            from .encoders import encode_pairs

            return encode_pairs(self, x, encoder, **settings)
        op = self.inference_activation()
        rows, cols, pre = op.encode(x, self.W_enc.T, self.b_enc, self.b_in)
        return sorted_pairs(rows, cols, op.project_pairs(pre, cols), self.cfg.d_sae,
                            positive=True)

    def decode_pairs(self, rows: Tensor, cols: Tensor, values: Tensor, n_rows: int,
                     x: Tensor | None = None) -> Tensor:
        """``x_hat (n_rows, d_out)`` of a code given as pairs (what :meth:`encode_pairs`
        returns): the core's sparse decode, ``k`` decoder rows gathered per token; a skip
        transcoder adds its skip term of the input ``x``."""
        out = sparse_decode(values, rows, cols, self.W_dec, n_rows, bias=self.b_dec)
        if self.cfg.skip:
            if x is None:
                raise ValueError("a skip transcoder's output needs its input: pass x")
            out = out + self.skip_term(x).to(out.dtype)
        return out

    # ------------------------------------------------------------------ training
    def training_code(self, x: Tensor, matmul_dtype: torch.dtype | None = None) -> Code:
        """The training activation's code of a batch: pairs from its fused ``encode``, or dense
        for an unbounded activation (a threshold) while its last code was dense."""
        op = self.activation
        N = x.shape[0]
        if not op.bounded and self._last_density > SPARSE_CODE_MAX_DENSITY:
            pre = self._pre(x, matmul_dtype)
            self._last_density = float((pre.detach() > op.cut).float().mean())  # op is a Jump
            return Code(pre, op.project(pre), N)
        rows, cols, pre = self.collective.encode(op, x, self.W_enc.T, self.b_enc, self.b_in,
                                                 matmul_dtype)
        if not op.bounded:
            self._last_density = rows.numel() / max(1, N * self.n_latents)
        return Code(pre, op.project_pairs(pre, cols), N, rows, cols)

    def training_forward(
        self,
        x: Tensor,
        y: Tensor | None = None,
        *,
        sparsity_scale: float = 1.0,
        matmul_dtype: torch.dtype | None = None,
        generator: torch.Generator | None = None,
    ) -> TrainOutput:
        """Loss on a batch ``x (N, d_in)`` with target ``y (N, d_out)`` (default ``x``: an
        autoencoder) and statistics; updates the running threshold and the dead-latent
        counters (buffers) when the module is in training mode.

        ``sparsity_scale`` multiplies the L1 / L0 coefficient (warm-up); ``matmul_dtype``
        (e.g. ``torch.bfloat16``) runs the encoder matmul in that precision."""
        if x.dim() != 2 or x.shape[1] != self.cfg.d_in:
            raise ValueError(
                f"expected activations of shape (N, {self.cfg.d_in}), got {tuple(x.shape)}"
            )
        if y is None:
            if self.cfg.transcode:
                raise ValueError("a transcoder needs its target y (the written activation)")
            y = x
        elif y.dim() != 2 or y.shape != (x.shape[0], self.cfg.d_out):
            raise ValueError(f"expected targets of shape ({x.shape[0]}, {self.cfg.d_out}), "
                             f"got {tuple(y.shape)}")
        N = x.shape[0]
        code = self.training_code(x, matmul_dtype)
        x_hat, terms = self._reconstruction_loss(x, y, code, generator)
        if self.arch.penalty is not None:
            terms.update(losses.PENALTIES[self.arch.penalty](self, code, sparsity_scale))
        if self.arch.aux is not None:
            e_hat = aux.reconstruction(self, x, matmul_dtype)
            if e_hat is not None:
                residual = (y - x_hat).detach()
                loss = losses.normalized_mse(residual, e_hat, self.stats_group)
                terms[self.arch.aux] = self.cfg.aux_coefficient * loss
        counts = code.counts(self.n_latents)
        if self.training:
            if self.arch.threshold in ("batch", "latent"):
                self._update_threshold(code)
            self._update_statistics(counts, N)
        return TrainOutput(
            loss=sum(terms.values()),
            x_hat=x_hat,
            terms={k: float(v.detach()) for k, v in terms.items()},
            l0=float(counts.sum()) / max(N, 1),
            counts=counts,
        )

    def _decode_code(self, code: Code, groups: Tensor | None = None) -> Tensor:
        """The code's reconstruction without ``b_dec`` (per prefix group with ``groups``)."""
        if code.cols is None:
            if groups is not None:
                raise ValueError("Matryoshka prefixes need a bounded (pairs) activation")
            return code.values @ self.W_dec
        return self.collective.decode(code.values, code.rows, code.cols, self.W_dec,
                                      code.n_rows, groups)

    def _reconstruction_loss(self, x: Tensor, y: Tensor, code: Code, generator
                             ) -> tuple[Tensor, dict]:
        """``y_hat`` (the estimate of the target ``y``) and the reconstruction terms: ``mse``,
        plus ``matryoshka`` (the errors of the shorter prefixes, all decoded in one pass) for
        the prefix architectures."""
        base = self.b_dec
        skip = self.skip_term(x)
        if skip is not None:
            base = base + skip
        if not self.arch.prefixes:
            y_hat = self._decode_code(code) + base
            return y_hat, {"mse": losses.mse(y, y_hat)}
        parts = self._decode_code(code, groups=self._groups(generator, x.device))  # (N, G, d)
        residual, errs = y - base, []
        for part in parts.unbind(dim=1):  # the residual of every prefix: G (N, d) subtractions
            residual = residual - part
            errs.append(residual.pow(2).sum(dim=-1).mean())
        return y - residual, {"mse": errs[-1], "matryoshka": sum(errs[:-1])}

    def _groups(self, generator, device) -> Tensor:
        """Prefix group of each latent: the fixed ``group_sizes``, or random log-uniform cuts."""
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

    def _update_threshold(self, code: Code) -> None:
        """EMA of the smallest selected value: global (``batch``) or per latent (``latent``)."""
        vals, cols = code.values.detach(), code.cols
        if vals.numel() == 0 and self.stats_group is None:
            return
        rate = self.cfg.threshold_rate
        with torch.no_grad():
            if self.arch.threshold == "latent":
                inf = torch.full_like(self.threshold, math.inf)
                low = inf.scatter_reduce(0, cols, vals.to(inf.dtype), reduce="amin")
                _all_reduce(low, "min", self.stats_group)
                seen = torch.isfinite(low)
            else:
                low = vals.min() if vals.numel() else torch.tensor(math.inf)
                low = _all_reduce(low.to(self.threshold).reshape(1), "min", self.stats_group)
                if not torch.isfinite(low[0]):
                    return
                seen = torch.ones_like(self.threshold, dtype=torch.bool)
                low = low.expand_as(self.threshold)
            if not bool(self.threshold_ready):
                self.threshold[seen] = low[seen]
            else:
                self.threshold[seen] = (1 - rate) * self.threshold[seen] + rate * low[seen]
            self.threshold_ready.fill_(True)

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
        """After an optimizer step: decoder rows back to unit norm (all but relu), learned
        thresholds kept positive."""
        if self.unit_decoder:
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
        if self.arch.threshold == "learned":
            self.threshold.clamp_(min=1e-6)
