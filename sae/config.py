"""Configuration dataclasses. The ``sae`` command line is generated from them
(:mod:`sparsecode.flags`: each field is a flag with its default and help), so every setting has
one default, in one place: :class:`SAEConfig` (one SAE), :class:`TrainConfig` (the optimisation),
:class:`RunConfig` (where ``sae train`` reads activations and writes the run), and
:class:`sparsecode.lm.ModelConfig` (model, hook point, text, device) shared with every command.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from sparsecode.flags import meta as _help

from .architectures import ARCHITECTURES, PURSUITS, check_architecture, default_group_sizes

JUMPRELU_MODES = ("step", "tanh", "quadratic")


def check_int(name: str, value: Any, low: int, *, optional: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is an integer ``>= low`` (or None if
    ``optional``)."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def check_number(name: str, value: Any, low: float | None = None, *, above: bool = False,
                 high: float | None = None, optional: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite number ``>= low`` (``> low`` if
    ``above``; ``<= high``), or None if ``optional``."""
    if optional and value is None:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if above else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        bound = "" if low is None else f" {'>' if above else '>='} {low:g}"
        bound += "" if high is None else f" and <= {high:g}"
        raise ValueError(f"{name} must be a finite number{bound}, got {value!r}")


@dataclass
class SAEConfig:
    """Shape, architecture and loss settings of one SAE (everything the loss needs).

    ``k`` is the number of active latents per token (topk), or the average per token for the
    batch architectures; ``dead_tokens`` is the window (in tokens) after which a latent that has
    not fired counts as dead and joins the AuxK / aux_zipf loss.
    """

    d_in: int = field(metadata=_help("input width (read from the activations)", cli=False))
    d_sae: int = field(metadata=_help("number of latents", cli=False))
    d_out: int | None = field(default=None, metadata=_help(
        "width of the written activation (default d_in; set for a transcoder)", cli=False))
    transcode: bool = field(default=False, metadata=_help(
        "transcoder: the input is not centred by b_dec, which lives in the output space",
        cli=False))
    skip: bool = field(default=False, metadata=_help(
        "transcoders: add a linear skip term x W_skip^T (W_skip starts at zero)"))
    places: list[int] | None = field(default=None, metadata=_help(
        "crosscoder: the width of each place it reads and writes (summing to d_in)", cli=False))
    architecture: str = field(default="topk", metadata=_help(
        f"architecture(s), comma-separated: {', '.join(ARCHITECTURES)}", flag="arch",
        sweep=True))
    k: int = field(default=32, metadata=_help(
        "active latents per token (the average for the batch architectures; the L0 target of "
        "jumprelu); a comma list trains one SAE per value", sweep=True))
    l1_coefficient: float = field(default=5.0, metadata=_help(
        "relu: weight of the decoder-norm-weighted L1 penalty"))
    l0_coefficient: float = field(default=10.0, metadata=_help(
        "jumprelu: weight of the L0 penalty"))
    sparsity_warmup_tokens: int = field(default=0, metadata=_help(
        "relu / jumprelu: tokens over which the sparsity coefficient ramps up linearly"))
    jumprelu_mode: str = field(default="quadratic", metadata=_help(
        "jumprelu L0 penalty: step (L0), tanh (smooth L0) or quadratic ((L0 / target_l0 - 1)^2)",
        choices=JUMPRELU_MODES))
    target_l0: float | None = field(default=None, metadata=_help(
        "jumprelu quadratic mode: the L0 aimed at (default: k)"))
    bandwidth: float = field(default=0.05, metadata=_help(
        "jumprelu: width of the straight-through estimator's window"))
    threshold_init: float = field(default=0.01, metadata=_help("jumprelu: initial threshold"))
    tanh_scale: float = field(default=4.0, metadata=_help("jumprelu tanh mode: slope"))
    group_sizes: list[int] | None = field(default=None, metadata=_help(
        "matryoshka: latents per nested group, comma-separated, summing to d_sae (default: "
        "1/16, 1/16, 1/8, 1/4, 1/2)"))
    random_prefixes: bool = field(default=False, metadata=_help(
        "matryoshka: random log-uniform prefixes instead of the fixed groups"))
    aux_k: int | None = field(default=None, metadata=_help(
        "latents in the auxiliary code (default: min(d_in / 2, d_sae))"))
    aux_coefficient: float = field(default=1 / 32, metadata=_help(
        "weight of the AuxK / aux_zipf loss (0: off)"))
    dead_tokens: int | None = field(default=None, metadata=_help(
        "tokens without firing after which a latent counts as dead (default: min(10M, run "
        "tokens / 20))"))
    zipf_exponent: float = field(default=1.0, metadata=_help(
        "aux_zipf: exponent of the target firing-rate distribution"))
    threshold_rate: float = field(default=0.05, metadata=_help(
        "batch architectures: EMA rate of the running inference threshold"))
    residual_threshold: float = field(default=0.0, metadata=_help(
        "mp: a token's pursuit stops once its residual norm is at most this (0: after k steps "
        "or a repeated latent)"))
    pursuit: str = field(default="mp", metadata=_help(
        "online_dl: the pursuit that codes each batch and encodes with the saved SAE: mp, or "
        "nnomp (OMP with a non-negative refit; SAELens reads the file as its matching-pursuit "
        "SAE and encodes it with mp)",
        choices=PURSUITS))
    metadata: dict[str, Any] = field(default_factory=dict, metadata=_help(
        "saved with the SAE (hook point, model, ...)", cli=False))

    def __post_init__(self) -> None:
        arch = check_architecture(self.architecture)
        for name in ("d_in", "d_sae", "k"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if arch.budgeted and self.k > self.d_sae:
            raise ValueError(f"k={self.k} is larger than d_sae={self.d_sae}")
        if self.jumprelu_mode not in JUMPRELU_MODES:
            raise ValueError(
                f"unknown jumprelu_mode {self.jumprelu_mode!r}; use one of {JUMPRELU_MODES}"
            )
        if self.target_l0 is None:
            self.target_l0 = float(self.k)
        self._check_numbers()
        self._check_shape(arch)
        if self.pursuit not in PURSUITS:
            raise ValueError(f"unknown pursuit {self.pursuit!r}; known pursuits: "
                             f"{', '.join(PURSUITS)}")
        if self.pursuit != "mp" and arch.learner != "online":
            raise ValueError(f"pursuit {self.pursuit!r} codes online_dl dictionaries only (it has "
                             "no gradient); gradient-trained pursuit SAEs use mp")
        if not self.residual_threshold >= 0:
            raise ValueError(f"residual_threshold must be >= 0, got {self.residual_threshold}")
        if self.target_l0 <= 0:
            raise ValueError(f"target_l0 must be > 0, got {self.target_l0}")
        if self.aux_k is None:
            self.aux_k = max(1, min(self.d_out // 2, self.d_sae))
        if arch.prefixes and self.group_sizes is None:
            self.group_sizes = default_group_sizes(self.d_sae)
        if self.group_sizes is not None:
            if sum(self.group_sizes) != self.d_sae or min(self.group_sizes) < 1:
                raise ValueError(
                    f"group_sizes {self.group_sizes} must be positive and sum to d_sae={self.d_sae}"
                )

    def _check_numbers(self) -> None:
        """Coefficients and rates: finite and in range (a NaN or a negative weight would
        otherwise surface only as a broken model after training)."""
        for name in ("l1_coefficient", "l0_coefficient", "aux_coefficient", "threshold_init",
                     "residual_threshold", "zipf_exponent"):
            check_number(name, getattr(self, name), 0)
        for name in ("bandwidth", "tanh_scale", "target_l0"):
            check_number(name, getattr(self, name), 0, above=True)
        check_number("threshold_rate", self.threshold_rate, 0, above=True, high=1)
        check_int("sparsity_warmup_tokens", self.sparsity_warmup_tokens, 0)
        check_int("aux_k", self.aux_k, 1, optional=True)
        check_int("dead_tokens", self.dead_tokens, 1, optional=True)

    def _check_shape(self, arch: Any) -> None:
        """The shape fields: an autoencoder (``d_out == d_in``), a transcoder (``transcode``,
        optionally ``skip``) or a crosscoder (``places``)."""
        if self.d_out is None:
            self.d_out = self.d_in
        if isinstance(self.d_out, bool) or not isinstance(self.d_out, int) or self.d_out < 1:
            raise ValueError(f"d_out must be a positive integer, got {self.d_out!r}")
        if self.d_out != self.d_in and not self.transcode:
            raise ValueError(f"d_out={self.d_out} differs from d_in={self.d_in}: only a "
                             "transcoder (transcode=True) writes another width than it reads")
        if self.skip and not self.transcode:
            raise ValueError("skip needs a transcoder (transcode=True)")
        if self.transcode and arch.tied:
            raise ValueError(f"{arch.name!r} is a tied pursuit over the decoder: it reads and "
                             "writes one space, so it cannot transcode")
        if self.places is not None:
            widths = list(self.places)
            if self.transcode:
                raise ValueError("a crosscoder reads and writes the same places: it cannot "
                                 "also transcode")
            if arch.tied:
                raise ValueError(f"{arch.name!r} cannot be a crosscoder (per-place input "
                                 "scales break its unit-norm atoms)")
            if len(widths) < 2 or any(isinstance(w, bool) or not isinstance(w, int) or w < 1
                                      for w in widths):
                raise ValueError(f"places must list two or more positive widths, got {widths}")
            if sum(widths) != self.d_in:
                raise ValueError(f"places {widths} sum to {sum(widths)}, not d_in={self.d_in}")
            self.places = widths

    @property
    def shape(self) -> str:
        """``"sae"``, ``"transcoder"`` or ``"crosscoder"``."""
        if self.places is not None:
            return "crosscoder"
        return "transcoder" if self.transcode else "sae"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: Encoder matmul precisions (``auto``: bfloat16 where the hardware multiplies it natively).
MATMUL_DTYPES = ("auto", "float32", "bfloat16", "float16")
B_DEC_INITS = ("geometric_median", "mean", "zeros")


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping settings shared by the SAEs of one run."""

    total_tokens: int = field(default=2_000_000, metadata=_help("training tokens", flag="tokens"))
    lr: float | None = field(default=None, metadata=_help(
        "learning rate (default: 1.5e-3 / sqrt(d_sae / 2^14), per SAE)"))
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata=_help(
        "Adam betas", cli=False))
    warmup_steps: int | None = field(default=None, metadata=_help(
        "linear LR warm-up steps (default: 5%% of the steps, at most 1000)"))
    decay_fraction: float = field(default=0.2, metadata=_help(
        "linear LR decay to 0 over this final fraction of the steps"))
    grad_clip: float = field(default=1.0, metadata=_help("gradient-norm clip (0: off)"))
    matmul_dtype: str = field(default="auto", metadata=_help(
        "encoder matmul precision (auto: bfloat16 on CUDA and on CPUs with AMX / AVX512-BF16)",
        choices=MATMUL_DTYPES))
    b_dec_init: str = field(default="geometric_median", metadata=_help(
        "b_dec from the first batch", choices=B_DEC_INITS))
    normalize_input: bool = field(default=True, metadata=_help(
        "scale inputs to E||x|| = sqrt(d_in) (folded into the saved weights)"))
    eval_every: int = field(default=0, metadata=_help(
        "held-out evaluation every this many steps (0: only at the end)"))
    log_every: int = field(default=10, metadata=_help("steps between history / wandb rows"))
    checkpoint_every: int = field(default=100, metadata=_help(
        "checkpoint every this many steps when there is an output folder (0: only on "
        "interruption)"))
    divergence_factor: float = field(default=100.0, metadata=_help(
        "stop the run as diverged when a step's training FVU exceeds this many times "
        "max(1, the first step's FVU) (0: off; a non-finite loss or weight always stops it)"))
    seed: int = field(default=0, metadata=_help("random seed (weights, data order, prefixes)"))
    progress: bool = field(default=True, metadata=_help("progress bar"))
    wandb: bool = field(default=False, metadata=_help("log to Weights & Biases"))
    wandb_project: str = field(default="sae", metadata=_help("Weights & Biases project"))

    def __post_init__(self) -> None:
        check_int("total_tokens", self.total_tokens, 1)
        check_number("lr", self.lr, 0, above=True, optional=True)
        check_int("warmup_steps", self.warmup_steps, 0, optional=True)
        check_number("grad_clip", self.grad_clip, 0)
        check_number("divergence_factor", self.divergence_factor, 0)
        for name in ("eval_every", "checkpoint_every"):
            check_int(name, getattr(self, name), 0)
        check_int("log_every", self.log_every, 1)
        check_int("seed", self.seed, 0)
        if len(self.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1
                                           for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.matmul_dtype not in MATMUL_DTYPES:
            raise ValueError(
                f"matmul_dtype must be one of {list(MATMUL_DTYPES)}, got {self.matmul_dtype!r}"
            )
        if self.b_dec_init not in B_DEC_INITS:
            raise ValueError(f"unknown b_dec_init {self.b_dec_init!r}; use one of {B_DEC_INITS}")
        if not 0 <= self.decay_fraction <= 1:
            raise ValueError(f"decay_fraction must be in [0, 1], got {self.decay_fraction}")


RUN_DIR = "runs/sae"


@dataclass
class PlacesConfig:
    """What the dictionaries read and write (:mod:`sae.wiring`): one hook point (an SAE, the
    default), a module's input and output (a transcoder) or several places (a crosscoder)."""

    transcode: str | None = field(default=None, metadata=_help(
        "train transcoders of this module: read its input, write its output (e.g. "
        "model.layers.15.mlp)"))
    hookpoint_in: str | None = field(default=None, metadata=_help(
        "transcoders reading this hook point (with --hookpoint-out; MODULE:input is a "
        "module's input)"))
    hookpoint_out: str | None = field(default=None, metadata=_help(
        "transcoders writing this hook point (with --hookpoint-in)"))
    crosscode: str | None = field(default=None, metadata=_help(
        "train crosscoders reading and writing these places: a glob or a brace list, e.g. "
        "'model.layers.{6,12,18}'"))

    def __post_init__(self) -> None:
        if (self.hookpoint_in is None) != (self.hookpoint_out is None):
            raise ValueError("--hookpoint-in and --hookpoint-out go together")
        given = [n for n, v in (("--transcode", self.transcode),
                                ("--hookpoint-in/--hookpoint-out", self.hookpoint_in),
                                ("--crosscode", self.crosscode)) if v]
        if len(given) > 1:
            raise ValueError(f"choose one of {' and '.join(given)}")


@dataclass
class RunConfig:
    """Where ``sae train`` reads activations, how it batches them and where the run goes
    (besides the model and text of :class:`sparsecode.lm.ModelConfig`)."""

    activations: str | None = field(default=None, metadata=_help(
        "train from an (N, d_in) .npy array instead of a model"))
    cache: str | None = field(default=None, metadata=_help(
        "train from a cache written by `sae cache` instead of a model"))
    d_sae: int | None = field(default=None, metadata=_help(
        "number of latents (default: expansion_factor x d_in)"))
    expansion_factor: int = field(default=16, metadata=_help(
        "d_sae = expansion_factor x d_in when --d-sae is not given"))
    batch_size: int = field(default=4096, metadata=_help(
        "tokens per optimizer step (over all processes)"))
    holdout: int = field(default=16384, metadata=_help("held-out tokens for metrics"))
    out: str = field(default=RUN_DIR, metadata=_help("run folder"))
    resume: bool = field(default=False, metadata=_help("continue from OUT/checkpoint"))
    keep_checkpoint: bool = field(default=False, metadata=_help(
        "keep OUT/checkpoint after a finished run"))
    latent_shards: int = field(default=1, metadata=_help(
        "torchrun: split each TopK SAE's latents over this many processes (the rest of the "
        "processes are data parallel)"))
    dist_timeout: float = field(default=300.0, metadata=_help(
        "torchrun: seconds a process waits for the others before failing"))
    force: bool = field(default=False, metadata=_help(
        "start over in a run folder that holds a checkpoint (deleting it) instead of refusing"))

    def __post_init__(self) -> None:
        check_int("d_sae", self.d_sae, 1, optional=True)
        for name in ("expansion_factor", "batch_size", "latent_shards"):
            check_int(name, getattr(self, name), 1)
        check_int("holdout", self.holdout, 1)
        check_number("dist_timeout", self.dist_timeout, 0, above=True)
        if self.activations and self.cache:
            raise ValueError("choose one of --activations and --cache")
        if self.resume and self.force:
            raise ValueError("--resume continues the checkpoint and --force deletes it: "
                             "choose one")
