"""How an SAE's weights learn from a batch: by gradient, or by online dictionary learning.

The architecture table names the learner (``Architecture.learner``); the trainer calls
``learner.step(...)`` for every SAE and knows nothing else about it.

* :class:`GradientLearner`: Adam on the SAE's loss (every architecture but ``online_dl``): the
  LR schedule, the unit-norm decoder's tangent projection, gradient clipping.
* :class:`OnlineLearner`: online dictionary learning (Mairal et al. 2010; scikit-learn's
  ``MiniBatchDictionaryLearning``): the batch is coded with the SAE's activation (matching
  pursuit or non-negative OMP on the decoder, ``SAEConfig.pursuit``: the encoder it is saved
  with), the statistics ``A = Z^T Z``,
  ``B = Z^T (x - b_dec)`` are accumulated with the same forgetting factor
  (:func:`sparsecode.core.dictionary.accumulate`, from the pairs: no dense code), and the
  decoder takes one accelerated projected-gradient step
  of :func:`sparsecode.core.dictionary.update_dictionary`; unused atoms are resampled from the
  batch. No gradients, no optimiser.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from sparsecode.core.dictionary import accumulate, pair_statistics, update_dictionary

from . import losses
from .models import SAE, TrainOutput
from .optim import adam, base_lr


class GradientLearner:
    """Adam on the SAE's loss."""

    def __init__(self, sae: SAE, lr: float | None, betas: tuple[float, float]):
        self.sae, self.lr = sae, lr
        self.optimizer = adam(sae, base_lr(sae, lr), betas)

    def step(self, forward: Any, x: Tensor, lr_mult: float, grad_clip: float,
             **kwargs: Any) -> TrainOutput:
        sae, opt = self.sae, self.optimizer
        for group in opt.param_groups:
            group["lr"] = base_lr(sae, self.lr) * lr_mult
        out = forward(x, **kwargs)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        sae.remove_parallel_gradient()
        if grad_clip:
            sae.collective.clip_grad_norm_(sae, grad_clip)
        opt.step()
        sae.constrain()
        return out


class OnlineLearner:
    """Online dictionary learning on the decoder (see the module docstring)."""

    optimizer = None

    def __init__(self, sae: SAE, lr: float | None, betas: tuple[float, float]):
        self.sae = sae
        self.generator = torch.Generator().manual_seed(int(sae.cfg.d_sae))

    @torch.no_grad()
    def step(self, forward: Any, x: Tensor, lr_mult: float, grad_clip: float,
             **kwargs: Any) -> TrainOutput:
        sae = self.sae
        code = sae.training_code(x, kwargs.get("matmul_dtype"))
        N = x.shape[0]
        x_hat = sae._decode_code(code) + sae.b_dec
        xc = x - sae.b_dec
        A, B = pair_statistics(code.rows, code.cols, code.values.to(x.dtype), xc, sae.n_latents)
        accumulate(sae.stat_A, sae.stat_B, A, B, int(sae.online_steps), N)
        sae.online_steps += 1
        D, unused = update_dictionary(sae.W_dec, sae.stat_A, sae.stat_B, method="pgd")
        if bool(unused.any()):
            picks = torch.randint(N, (int(unused.sum()),), generator=self.generator)
            rows = xc[picks.to(x.device)]
            D[unused] = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
        sae.W_dec.copy_(D)
        sae.constrain()
        counts = code.counts(sae.n_latents)
        if sae.training:
            sae._update_statistics(counts, N)
        mse = losses.mse(x, x_hat)
        return TrainOutput(loss=mse, x_hat=x_hat, terms={"mse": float(mse)},
                           l0=float(counts.sum()) / max(N, 1), counts=counts)


#: Learner name (``Architecture.learner``) -> its class.
LEARNERS = {"gradient": GradientLearner, "online": OnlineLearner}
