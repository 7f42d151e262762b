"""Dictionary updates for dictionary learning, from the sufficient statistics of the codes.

With codes ``Z (N, K)`` of signals ``X (N, n)`` and atoms as rows of ``D (K, n)``,

    0.5 ||X - Z D||^2 = 0.5 tr(D^T A D) - tr(D^T B) + const,   A = Z^T Z (K, K),  B = Z^T X (K, n)

so a dictionary step only needs ``A`` and ``B`` (Mairal et al. 2010 accumulate them over a
stream). Atoms are constrained to the unit ball ``||d_k|| <= 1`` (scikit-learn's and SPAMS'
constraint), optionally with ``d_k >= 0``.

Two updates, both monotone on the objective above:

* ``"bcd"``: one pass of block-coordinate descent, atom by atom (the update of scikit-learn and
  SPAMS): ``d_k <- P(d_k + (b_k - a_k D) / A_kk)``. Exact per atom, sequential over atoms; on
  the CPU the pass runs compiled (:func:`sparsecode.core.kernels.cpu_solvers.bcd_pass`).
* ``"pgd"``: projected gradient steps on all atoms at once, ``D <- P(D - (A D - B) / L)`` with
  ``L = ||A||_2``, accelerated (FISTA with monotone restart). Each step is one ``(K, K) @ (K, n)``
  product, so it suits large ``K`` and GPUs.

Atoms whose ``A_kk`` is (numerically) zero are not used by any code; they are left unchanged
and reported, so that the caller can resample them from data.

Example
-------
>>> import torch
>>> from sparsecode.core.dictionary import update_dictionary
>>> Z = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
>>> X = torch.tensor([[0.6, 0.8], [0.0, 2.0]], dtype=torch.float64)
>>> D, unused = update_dictionary(torch.eye(2, dtype=torch.float64), Z.T @ Z, Z.T @ X)
>>> D
tensor([[0.6000, 0.8000],
        [0.0000, 1.0000]], dtype=torch.float64)
"""

from __future__ import annotations

import torch
from torch import Tensor

from .kernels.cpu_solvers import bcd_pass, numba_available
from .solvers import lipschitz

#: An atom with ``A_kk`` at most this counts as unused (scikit-learn's threshold, for ``A``
#: averaged over the batch).
UNUSED_TOL = 1e-6


def forgetting_factor(step: int, batch_size: int) -> float:
    """Weight of the old statistics at online step ``step`` (0-based) with batches of
    ``batch_size`` rows: scikit-learn's ``beta = (theta + 1 - b) / (theta + 1)`` with
    ``theta = (step + 1) b`` for the first ``b`` steps and ``b^2 + step + 1 - b`` after
    (Mairal et al. 2010, section 3.4.3)."""
    b = batch_size
    theta = (step + 1) * b if step < b - 1 else b * b + step + 1 - b
    return (theta + 1 - b) / (theta + 1)


def accumulate(A: Tensor, B: Tensor, batch_A: Tensor, batch_B: Tensor, step: int,
               batch_size: int) -> None:
    """The online statistics, in place: ``A <- beta A + batch_A / b``, same for ``B``."""
    beta = forgetting_factor(step, batch_size)
    A.mul_(beta).add_(batch_A, alpha=1.0 / batch_size)
    B.mul_(beta).add_(batch_B, alpha=1.0 / batch_size)


def pair_statistics(rows: Tensor, cols: Tensor, values: Tensor, X: Tensor, n_atoms: int
                    ) -> tuple[Tensor, Tensor]:
    """``(Z^T Z, Z^T X)`` of a code given as ``(rows, cols, values)`` pairs grouped by row,
    without the dense ``(N, n_atoms)`` code: ``O(N k^2 + nnz d)`` for ``k`` pairs per row.

    >>> import torch
    >>> Z = torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 0.0]])
    >>> X = torch.tensor([[1.0, 1.0], [2.0, 0.0]])
    >>> r, c = Z.nonzero(as_tuple=True)
    >>> A, B = pair_statistics(r, c, Z[r, c], X, 3)
    >>> torch.equal(A, Z.T @ Z), torch.equal(B, Z.T @ X)
    (True, True)
    """
    n = X.shape[0]
    counts = torch.bincount(rows, minlength=n)
    width = int(counts.max()) if rows.numel() else 0
    rank = torch.arange(rows.numel(), device=rows.device) - (counts.cumsum(0) - counts)[rows]
    V = values.new_zeros(n, width).index_put((rows, rank), values)
    idx = cols.new_zeros(n, width).index_put((rows, rank), cols)
    A = values.new_zeros(n_atoms, n_atoms)
    A.index_put_((idx[:, :, None].expand(-1, -1, width), idx[:, None, :].expand(-1, width, -1)),
                 V[:, :, None] * V[:, None, :], accumulate=True)
    B = X.new_zeros(n_atoms, X.shape[1]).index_add_(0, cols, values[:, None].to(X.dtype) * X[rows])
    return A, B


def project_atoms(D: Tensor, positive: bool = False) -> Tensor:
    """Project each row onto ``{||d|| <= 1}`` (and ``d >= 0`` first if ``positive``)."""
    if positive:
        D = D.clamp(min=0)
    norms = torch.linalg.vector_norm(D, dim=1, keepdim=True)
    return D / norms.clamp(min=1.0)


def surrogate(D: Tensor, A: Tensor, B: Tensor, AD: Tensor | None = None) -> Tensor:
    """``0.5 tr(D^T A D) - tr(D^T B)``: the dictionary's part of ``0.5||X - Z D||^2``.

    ``AD`` is ``A @ D`` when the caller has it already (the product is the costly part).
    """
    if AD is None:
        AD = A @ D
    return (D * (0.5 * AD - B)).sum()


def auto_method(device: torch.device | str) -> str:
    """The faster update where ``D`` lives: ``"bcd"`` on a CPU with the compiled pass (one
    exact pass costs about one product ``A @ D``), ``"pgd"`` elsewhere (no loop over atoms).

    >>> auto_method("cuda") == "pgd"
    True
    """
    return "bcd" if torch.device(device).type == "cpu" and numba_available() else "pgd"


def update_dictionary(
    D: Tensor,
    A: Tensor,
    B: Tensor,
    *,
    method: str = "bcd",
    positive: bool = False,
    n_iter: int = 1,
    unused_tol: float = UNUSED_TOL,
) -> tuple[Tensor, Tensor]:
    """Improve ``D`` for the statistics ``A = Z^T Z``, ``B = Z^T X``; see the module docstring.

    ``n_iter`` passes (``"bcd"``) or steps (``"pgd"``). Returns the new dictionary (rows in the
    unit ball) and a boolean mask of unused atoms (``A_kk <= unused_tol``), left as they were.
    """
    if method not in ("bcd", "pgd"):
        raise ValueError(f"method must be 'bcd' or 'pgd', got {method!r}")
    if A.shape != (D.shape[0], D.shape[0]) or B.shape != D.shape:
        raise ValueError(
            f"A must be (K, K) and B (K, n) for D (K, n) = {tuple(D.shape)}; got A "
            f"{tuple(A.shape)}, B {tuple(B.shape)}"
        )
    diag = torch.diagonal(A)
    unused = diag <= unused_tol
    D = D.clone()
    if method == "bcd":
        atoms = torch.nonzero(~unused).squeeze(1)
        if D.device.type == "cpu" and numba_available() and not D.requires_grad:
            bcd_pass(D.numpy(), A.contiguous().numpy(), B.contiguous().numpy(),
                     (A @ D).numpy(), atoms.numpy(), n_iter, positive)
            return D, unused
        for _ in range(n_iter):
            for k in atoms.tolist():
                d = D[k] + (B[k] - A[k] @ D) / A[k, k]
                D[k] = project_atoms(d[None], positive)[0]
        return D, unused
    # projected gradient with momentum; restart when the surrogate would increase (monotone).
    # A @ D is carried along (A @ Y follows from it by linearity): one product per step.
    L = lipschitz(A)
    if L <= 0:
        return D, unused
    keep = ~unused[:, None] if bool(unused.any()) else None

    def project(V: Tensor) -> Tensor:
        P = project_atoms(V, positive)
        return P if keep is None else torch.where(keep, P, D)

    AD = A @ D
    f = surrogate(D, A, B, AD)
    D_prev, AD_prev, t = D, AD, 1.0
    for _ in range(n_iter):
        t_new = 0.5 * (1 + (1 + 4 * t * t) ** 0.5)
        beta = (t - 1) / t_new
        Y = torch.lerp(D, D_prev, -beta) if beta else D  # D + beta (D - D_prev)
        AY = torch.lerp(AD, AD_prev, -beta) if beta else AD
        D_new = project(Y - (AY - B) / L)
        AD_new = A @ D_new
        f_new = surrogate(D_new, A, B, AD_new)
        if beta and f_new > f:  # momentum overshot: plain projected-gradient step from D
            D_new = project(D - (AD - B) / L)
            AD_new = A @ D_new
            f_new, t_new = surrogate(D_new, A, B, AD_new), 1.0
        D_prev, AD_prev, D, AD, f, t = D, AD, D_new, AD_new, f_new, t_new
    return D, unused
