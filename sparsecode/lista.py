"""Learned ISTA (LISTA, Gregor & LeCun 2010): a trained, fixed-depth Lasso encoder.

For a dictionary ``D`` (``n_atoms x n_features``, atoms are rows) and signals ``x`` (rows of
``X``) the Lasso code minimises, as in :func:`sparsecode.sparse_encode`,

    F(z) = 0.5 * ||x - z D||^2 + alpha * ||z||_1 .

ISTA reaches it by ``z_{t+1} = soft(z_t - (z_t D - x) D^T / L, alpha / L)`` from ``z_0 = 0``
(``L`` = largest eigenvalue of ``D D^T``). :class:`LISTA` unrolls ``T = n_layers`` such steps into
a network and learns its parameters on the data, so that ``T`` layers do the work of many more
ISTA / FISTA iterations on signals like the training ones. Three parametrisations:

* ``"lista"`` (Gregor & LeCun): shared matrices ``W_e`` (``n_features x n_atoms``), ``S``
  (``n_atoms x n_atoms``) and one threshold per layer,

      z_1 = soft(x W_e, theta_0),    z_{t+1} = soft(x W_e + z_t S, theta_t),

  initialised at ``W_e = D^T / L``, ``S = I - D D^T / L``, ``theta_t = alpha / L``: before training
  the network *is* ``T`` ISTA steps.
* ``"fista"``: LISTA with FISTA's extrapolation, one learned momentum coefficient per layer,

      y_t = z_t + beta_t (z_t - z_{t-1}),    z_{t+1} = soft(x W_e + y_t S, theta_t),

  ``beta_t`` initialised at FISTA's ``(t_k - 1) / t_{k+1}``: before training the network is ``T``
  FISTA steps, a better start than ISTA's (on Gregor & LeCun's problem the trained 16 layers
  reach a lower objective than the plain ``"lista"`` ones; benchmarks/bench_lista.py).
* ``"step"``: only one step size per layer is learned (the dictionary stays fixed),

      z_{t+1} = prox_{s_t alpha ||.||_1}(z_t - s_t (z_t D - x) D^T),    s_t initialised at 1 / L.

``soft`` is the prox of :class:`sparsecode.core.operators.L1` (nonnegative soft threshold
``max(u - theta, 0)`` when ``positive_code``). Thresholds and steps are clamped at 0 in the forward
pass.

Training (``fit``) is unsupervised: Adam (cosine learning-rate decay by default) over shuffled
mini-batches on either the mean Lasso objective ``F`` of the network output
(``objective="lasso"``) or the mean squared distance ``||z_T - z*||^2`` to the exact Lasso codes
``z*`` of :func:`sparsecode.core.lasso` (``objective="imitate"``, Gregor & LeCun's original loss).
The parameters with the smallest loss on the whole training set (evaluated before training and
after every epoch) are kept.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import StrOptions
from sklearn.utils.validation import check_is_fitted
from torch import Tensor

from ._arrays import check_dictionary, to_output, to_tensor
from ._base import (
    DEVICE,
    NONNEGATIVE,
    NONNEGATIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    DictionaryTransformerMixin,
)
from .core.operators import L1
from .core.solvers import LeastSquares, fista_momentum, lasso

__all__ = ["LISTA", "LR_SCHEDULES", "OBJECTIVES", "PARAMETRIZATIONS"]

#: Training objectives accepted by :class:`LISTA`.
OBJECTIVES = ("lasso", "imitate")
#: Parametrisations of the unrolled network accepted by :class:`LISTA`.
PARAMETRIZATIONS = ("lista", "fista", "step")
#: Learning-rate schedules accepted by :class:`LISTA`.
LR_SCHEDULES = ("cosine", "constant")


class LISTA(DictionaryTransformerMixin, BaseEstimator):
    """Learned ISTA: ``n_layers`` unrolled ISTA steps with parameters trained on the data.

    The network maps a signal ``x`` to an approximate minimiser of
    ``0.5 ||x - z D||^2 + alpha ||z||_1`` (atoms are the rows of ``dictionary``; same scaling as
    :func:`sparsecode.sparse_encode`). With ``parametrization="lista"`` it computes
    ``z_1 = soft(x W_e, theta_0)``, ``z_{t+1} = soft(x W_e + z_t S, theta_t)`` with learned
    ``W_e``, ``S`` and per-layer thresholds ``theta_t``, initialised at ISTA's values
    (``D^T / L``, ``I - D D^T / L``, ``alpha / L``); ``parametrization="fista"`` adds FISTA's
    extrapolation ``y_t = z_t + beta_t (z_t - z_{t-1})`` before each layer with learned
    ``beta_t`` (initialised at FISTA's coefficients); with ``parametrization="step"`` it computes
    ISTA steps ``z_{t+1} = prox_{s_t alpha l1}(z_t - s_t (z_t D - x) D^T)`` with learned step sizes
    ``s_t`` (initialised at ``1 / L``). Untrained (``max_epochs=0``) the network is exactly
    ``n_layers`` ISTA steps from ``z = 0`` (FISTA steps, without restart, for ``"fista"``).

    Parameters
    ----------
    dictionary : array or tensor of shape (n_atoms, n_features)
        The fixed dictionary, atoms as rows (no zero rows).
    n_layers : int, default=16
        Number of unrolled steps ``T``.
    alpha : float, default=0.1
        Weight of the l1 penalty.
    objective : {"lasso", "imitate"}, default="lasso"
        Training loss: the mean Lasso objective of the output, or the mean squared distance
        ``||z_T - z*||^2`` to the exact Lasso solution (computed once on the training set).
    parametrization : {"fista", "lista", "step"}, default="fista"
        Learned matrices, thresholds and momentum (initialised as FISTA); Gregor & LeCun's
        learned matrices and thresholds without momentum (initialised as ISTA); or learned step
        sizes only.
    max_epochs : int, default=50
        Passes over the training set (0: keep the initial ISTA / FISTA values).
    batch_size : int, default=256
        Mini-batch size for Adam.
    learning_rate : float, default=1e-3
        Adam's (initial) learning rate.
    lr_schedule : {"cosine", "constant"}, default="cosine"
        ``"cosine"``: the learning rate decays to 0 along a half cosine over all mini-batch steps
        of ``max_epochs`` (the last epochs refine instead of jittering); ``"constant"``: fixed.
    positive_code : bool, default=False
        Nonnegative codes (nonnegative soft threshold).
    random_state : int, RandomState instance or None, default=None
        Seeds the shuffling of the mini-batches.
    device : str, default="auto"
        Where to train and encode: ``"auto"`` is the tensor's device for torch input, CUDA when
        available for numpy input.
    verbose : bool, default=False
        Progress bar (tqdm) over epochs.

    Attributes
    ----------
    components_ : ndarray or tensor of shape (n_atoms, n_features)
        The dictionary (numpy after numpy input, a tensor on the input's device after torch
        input), in the training dtype.
    weights_ : dict of str to tensor
        The learned parameters, on CPU: ``"W_e"``, ``"S"``, ``"theta"`` (``"lista"``; plus
        ``"beta"`` for ``"fista"``) or ``"step"`` (``"step"``).
    lipschitz_ : float
        ``L``, the Lipschitz constant used for the initialisation.
    initial_loss_ : float
        The training loss of the untrained network (``n_layers`` ISTA steps).
    loss_curve_ : list of float
        The training loss over the whole training set after each epoch.
    best_loss_ : float
        The smallest training loss seen (its parameters are the ones kept).
    n_iter_ : int
        Epochs run.
    n_features_in_ : int
        Number of features seen during ``fit``.

    Notes
    -----
    Training runs in the dtype of ``X`` (float32 or float64; other dtypes are converted to
    float64, as scikit-learn): pass float32 data to train faster. ``transform`` keeps the dtype of
    its input (float32 stays float32) and returns numpy for numpy input and a tensor on the
    input's device for torch input.

    Examples
    --------
    >>> import numpy as np
    >>> from sparsecode.lista import LISTA
    >>> rng = np.random.default_rng(0)
    >>> D = rng.standard_normal((10, 5))
    >>> X = rng.standard_normal((40, 5))
    >>> net = LISTA(D, n_layers=2, alpha=0.1, max_epochs=1, batch_size=20, random_state=0)
    >>> Z = net.fit_transform(X)
    >>> Z.shape, Z.dtype, net.n_iter_
    ((40, 10), dtype('float64'), 1)
    >>> bool(net.best_loss_ <= net.initial_loss_)
    True
    >>> net.inverse_transform(Z).shape
    (40, 5)
    """

    _parameter_constraints: dict = {
        "dictionary": ["array-like"],
        "n_layers": [POSITIVE_INT],
        "alpha": [NONNEGATIVE],
        "objective": [StrOptions(set(OBJECTIVES))],
        "parametrization": [StrOptions(set(PARAMETRIZATIONS))],
        "max_epochs": [NONNEGATIVE_INT],
        "batch_size": [POSITIVE_INT],
        "learning_rate": [POSITIVE],
        "lr_schedule": [StrOptions(set(LR_SCHEDULES))],
        "positive_code": ["boolean"],
        "random_state": ["random_state"],
        "device": DEVICE,
        "verbose": ["verbose"],
    }

    def __init__(
        self,
        dictionary: Any,
        *,
        n_layers: int = 16,
        alpha: float = 0.1,
        objective: str = "lasso",
        parametrization: str = "fista",
        max_epochs: int = 50,
        batch_size: int = 256,
        learning_rate: float = 1e-3,
        lr_schedule: str = "cosine",
        positive_code: bool = False,
        random_state: Any = None,
        device: str | torch.device | None = "auto",
        verbose: bool = False,
    ):
        self.dictionary = dictionary
        self.n_layers = n_layers
        self.alpha = alpha
        self.objective = objective
        self.parametrization = parametrization
        self.max_epochs = max_epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.lr_schedule = lr_schedule
        self.positive_code = positive_code
        self.random_state = random_state
        self.device = device
        self.verbose = verbose

    # ----------------------------------------------------------------------------------------
    # checks
    # ----------------------------------------------------------------------------------------

    def _dictionary(self, Xt: Tensor) -> Tensor:
        D = to_tensor(self.dictionary, "dictionary", device=Xt.device, dtype=Xt.dtype)
        check_dictionary(D, Xt)
        return D

    # ----------------------------------------------------------------------------------------
    # the network
    # ----------------------------------------------------------------------------------------

    def _init_params(self, D: Tensor) -> dict[str, Tensor]:
        """ISTA's values: ``W_e = D^T / L``, ``S = I - D D^T / L``, ``theta = alpha / L`` (and
        FISTA's momentum ``beta``) or ``step = 1 / L`` (``L`` computed as
        :func:`sparsecode.core.fista` does)."""
        L = LeastSquares.from_data(D[:0], D).lipschitz()
        L = L if L > 0 else 1.0
        self.lipschitz_ = L
        T, K = self.n_layers, D.shape[0]
        if self.parametrization == "step":
            return {"step": torch.full((T,), 1.0 / L, dtype=D.dtype, device=D.device)}
        eye = torch.eye(K, dtype=D.dtype, device=D.device)
        params = {
            "W_e": D.T / L,
            "S": eye - (D @ D.T) / L,
            "theta": torch.full((T,), float(self.alpha) / L, dtype=D.dtype, device=D.device),
        }
        if self.parametrization == "fista":
            params["beta"] = fista_momentum(T - 1, D.dtype, D.device)[: T - 1]
        return params

    def _forward(self, params: dict[str, Tensor], X: Tensor, D: Tensor) -> Tensor:
        """The codes ``z_T`` of the unrolled network for the rows of ``X``."""
        if self.parametrization == "step":
            steps = params["step"].clamp(min=0)
            prox = L1(float(self.alpha), positive=self.positive_code).prox
            prob = LeastSquares.from_data(X, D)
            z = prox(steps[0] * prob.cov, steps[0])  # first step from z = 0
            for t in range(1, self.n_layers):
                z = prox(z - steps[t] * prob.grad(z), steps[t])
            return z
        theta = params["theta"].clamp(min=0)
        prox = L1(1.0, positive=self.positive_code).prox
        b = X @ params["W_e"]
        z = prox(b, theta[0])
        beta = params.get("beta")
        z_prev = torch.zeros_like(z) if beta is not None else None
        for t in range(1, self.n_layers):
            if beta is None:
                y = z
            else:  # FISTA's extrapolation with a learned coefficient per layer
                y = torch.lerp(z, z_prev, -beta[t - 1])  # z + beta (z - z_prev)
                z_prev = z
            z = prox(b + y @ params["S"], theta[t])
        return z

    def _lasso_objective(self, Z: Tensor, X: Tensor, D: Tensor) -> Tensor:
        """``0.5 ||x - z D||^2 + alpha ||z||_1`` per row."""
        r = X - Z @ D
        return 0.5 * (r * r).sum(dim=1) + float(self.alpha) * Z.abs().sum(dim=1)

    def _loss(self, params, X: Tensor, D: Tensor, target: Tensor | None) -> Tensor:
        """Mean training loss over the rows of ``X`` (``target``: exact codes for imitate)."""
        Z = self._forward(params, X, D)
        if target is None:
            return self._lasso_objective(Z, X, D).mean()
        d = Z - target
        return (d * d).sum(dim=1).mean()

    @torch.no_grad()
    def _full_loss(self, params, X: Tensor, D: Tensor, target: Tensor | None) -> float:
        total, n, bs = 0.0, X.shape[0], max(int(self.batch_size), 1024)
        for s in range(0, n, bs):
            tgt = None if target is None else target[s : s + bs]
            rows = min(s + bs, n) - s
            total += float(self._loss(params, X[s : s + bs], D, tgt)) * rows
        return total / n

    # ----------------------------------------------------------------------------------------
    # scikit-learn API
    # ----------------------------------------------------------------------------------------

    def fit(self, X: Any, y: Any = None) -> LISTA:
        """Train the network on the rows of ``X`` (unsupervised; ``y`` is ignored)."""
        self._validate_params()
        Xt, X = self._validate_input(X, reset=True)
        D = self._dictionary(Xt)
        target = None
        if self.objective == "imitate":
            prob = LeastSquares.from_data(Xt, D)
            target = lasso(prob, float(self.alpha), positive=self.positive_code).codes

        params = {k: v.clone().requires_grad_(True) for k, v in self._init_params(D).items()}
        n = Xt.shape[0]
        bs = min(int(self.batch_size), n)
        rng = check_random_state(self.random_state)
        gen = torch.Generator().manual_seed(int(rng.randint(np.iinfo(np.int32).max)))
        optimizer = torch.optim.Adam(params.values(), lr=float(self.learning_rate))
        scheduler = None
        if self.lr_schedule == "cosine" and self.max_epochs > 0:
            total = int(self.max_epochs) * math.ceil(n / bs)
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)

        best_loss = self.initial_loss_ = self._full_loss(params, Xt, D, target)
        best = {k: v.detach().clone() for k, v in params.items()}
        curve: list[float] = []
        epochs = range(int(self.max_epochs))
        bar = None
        if self.verbose:
            from tqdm.auto import tqdm

            epochs = bar = tqdm(epochs, unit="epoch", desc=type(self).__name__)
        for _ in epochs:
            order = torch.randperm(n, generator=gen).to(Xt.device)
            for s in range(0, n, bs):
                idx = order[s : s + bs]
                optimizer.zero_grad(set_to_none=True)
                loss = self._loss(params, Xt[idx], D, None if target is None else target[idx])
                loss.backward()
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
            epoch_loss = self._full_loss(params, Xt, D, target)
            curve.append(epoch_loss)
            if epoch_loss < best_loss:
                best_loss = epoch_loss
                best = {k: v.detach().clone() for k, v in params.items()}
            if bar is not None:
                bar.set_postfix(loss=f"{epoch_loss:.4g}", best=f"{best_loss:.4g}")
        if bar is not None:
            bar.close()

        self.weights_ = {k: v.cpu() for k, v in best.items()}
        self.components_ = to_output(D, X)
        self.loss_curve_ = curve
        self.best_loss_ = best_loss
        self.n_iter_ = len(curve)
        return self

    def _params_like(self, Xt: Tensor) -> dict[str, Tensor]:
        return {k: v.to(device=Xt.device, dtype=Xt.dtype) for k, v in self.weights_.items()}

    def _encode(self, X: Any) -> tuple[Tensor, Tensor, Tensor, Any]:
        check_is_fitted(self, "weights_")
        Xt, X = self._validate_input(X, reset=False)
        D = to_tensor(self.components_, "components_", device=Xt.device, dtype=Xt.dtype)
        params = self._params_like(Xt)
        with torch.no_grad():
            Z = torch.cat(
                [
                    self._forward(params, Xt[s : s + 4096], D)
                    for s in range(0, Xt.shape[0], 4096)
                ]
            )
        return Z, Xt, D, X

    def transform(self, X: Any) -> Any:
        """Codes of ``X`` (n_samples, n_features) -> (n_samples, n_atoms): the network output."""
        Z, _, _, X = self._encode(X)
        return to_output(Z, X)

    def score(self, X: Any, y: Any = None) -> float:
        """Minus the mean Lasso objective ``0.5 ||x - z D||^2 + alpha ||z||_1`` of the codes
        ``transform(X)`` (higher is better, for model selection)."""
        Z, Xt, D, _ = self._encode(X)
        return -float(self._lasso_objective(Z, Xt, D).mean())
