"""The least-squares problem every solver minimises, and what the solvers share.

``0.5 * ||x - z D||^2`` per row ``x`` of a batch (atoms are the rows of ``D``), given either by the
data ``(X, D)`` or only through the Gram matrix ``G = D D^T`` and the correlations ``C = X D^T``
(what layer-wise pruning has): :class:`LeastSquares`. Solvers return a :class:`SolverResult`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from .sparse import SparseCodes

#: Default bound on the working memory of one chunk, in bytes.
CHUNK_BYTES = 64 * 2**20
#: OMP's working set per chunk (smaller: it streams over its storage once per selected atom).
OMP_CHUNK_BYTES = 20 * 2**20


@dataclass
class SolverResult:
    """Codes (dense tensor, or :class:`SparseCodes` for the pursuits) and iterations used per
    row; ``path`` (matching pursuit, on request) is the atom picked at each step, ``-1`` after a
    row stopped; ``residual`` (ADMM) is the final relative primal residual
    ``||z - u|| / ||u||`` of the splitting."""

    codes: Tensor | SparseCodes
    n_iter: Tensor  # (N,) int64
    path: Tensor | None = None  # (N, steps) int64
    residual: float | None = None


class LeastSquares:
    """The smooth term ``f(z) = 0.5 ||x - z D||^2`` of each row, batched.

    Build it from data with :meth:`from_data` or from second moments with :meth:`from_gram`.
    Gradients use whichever is cheaper: ``(z D - X) D^T`` costs ``2 K n`` per row, ``z G - C``
    costs ``K^2``.
    """

    def __init__(
        self,
        gram: Tensor,
        cov: Tensor | None,
        sq_norms: Tensor | None,
        X: Tensor | None = None,
        D: Tensor | None = None,
        target: Tensor | None = None,
    ):
        self.gram = gram
        self.X = X
        self.D = D
        self.target = target
        self._cov = cov
        self._sq_norms = sq_norms
        self.use_data = X is not None and D is not None and 2 * D.shape[1] < D.shape[0]

    @classmethod
    def from_data(cls, X: Tensor, D: Tensor, gram: Tensor | None = None) -> LeastSquares:
        """Problem for signals ``X (N, n)`` and dictionary ``D (K, n)``; ``gram`` may be given."""
        if gram is None:
            gram = D @ D.T
        return cls(gram, None, None, X, D)

    @classmethod
    def from_gram(
        cls, gram: Tensor, cov: Tensor, sq_norms: Tensor | None = None
    ) -> LeastSquares:
        """Problem given by ``gram = D D^T (K, K)`` and ``cov = X D^T (N, K)``.

        ``sq_norms`` (``||x||^2`` per row) only shifts objective values; it is needed for OMP's
        residual tolerance and for reporting objectives.
        """
        return cls(gram, cov, sq_norms)

    @classmethod
    def from_target(cls, gram: Tensor, target: Tensor) -> LeastSquares:
        """The problem ``0.5 (v - z) G (v - z)^T`` per row ``v`` of ``target (N, K)``: the Gram
        form with ``cov = target @ gram`` (computed on first use) and ``||x||^2 = v G v^T``, up
        to a constant. Layer-wise pruning is this problem (``v`` the weights, ``G`` the input
        Gram); ADMM's update needs only ``v`` (``z = v + (rho (u - v) - lam) (G + rho I)^-1``),
        which saves the ``(N, K) @ (K, K)`` product of ``cov``.

        >>> import torch
        >>> prob = LeastSquares.from_target(2 * torch.eye(2), torch.tensor([[1.0, 3.0]]))
        >>> prob.cov, prob.sq_norms
        (tensor([[2., 6.]]), tensor([20.]))
        """
        return cls(gram, None, None, target=target)

    @property
    def n_rows(self) -> int:
        if self.X is not None:
            return self.X.shape[0]
        return (self.target if self.target is not None else self._cov).shape[0]

    @property
    def n_atoms(self) -> int:
        return self.gram.shape[0]

    @property
    def max_support(self) -> int:
        """Most atoms that can be linearly independent: ``min(n_atoms, n_features)``."""
        K = self.n_atoms
        return min(K, self.D.shape[1]) if self.D is not None else K

    def lipschitz(self) -> float:
        """Lipschitz constant of the gradient, ``||D D^T||_2`` (from the smaller Gram)."""
        D = self.D
        return lipschitz(D.T @ D if D is not None and D.shape[1] < D.shape[0] else self.gram)

    def new_codes(self, width: int | None = None, dtype: torch.dtype | None = None) -> Tensor:
        """Zeros of shape ``(n_rows, width or n_atoms)`` on the problem's device and dtype."""
        ref = next(t for t in (self.X, self.target, self._cov) if t is not None)
        return torch.zeros(self.n_rows, width or self.n_atoms, dtype=dtype or ref.dtype,
                           device=ref.device)

    @property
    def cov(self) -> Tensor:
        """Correlations ``X D^T`` (computed on first use)."""
        if self._cov is None:
            self._cov = self.target @ self.gram if self.target is not None else self.X @ self.D.T
        return self._cov

    @property
    def sq_norms(self) -> Tensor:
        if self._sq_norms is None and self.target is not None:
            self._sq_norms = (self.cov * self.target).sum(dim=1)
        if self._sq_norms is None:
            if self.X is None:
                raise ValueError("this problem was built without ||x||^2 (pass sq_norms)")
            self._sq_norms = (self.X * self.X).sum(dim=1)
        return self._sq_norms

    def rows(self, index: Tensor | slice) -> LeastSquares:
        """The sub-problem of the given rows (shares the dictionary / Gram)."""
        def pick(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[index]

        return LeastSquares(self.gram, pick(self._cov), pick(self._sq_norms), pick(self.X), self.D,
                            pick(self.target))

    def chunks(self, size: int, progress: bool = False) -> Iterator[tuple[slice, LeastSquares]]:
        """Consecutive row blocks of at most ``size`` rows (a tqdm bar over rows if asked)."""
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.n_rows, unit="rows", leave=False)
        for start in range(0, self.n_rows, size):
            sl = slice(start, min(start + size, self.n_rows))
            yield sl, self.rows(sl)
            if bar is not None:
                bar.update(sl.stop - sl.start)
        if bar is not None:
            bar.close()

    def grad(self, z: Tensor) -> Tensor:
        if self.use_data:
            return (z @ self.D - self.X) @ self.D.T
        return z @ self.gram - self.cov

    def forward_step(self, z: Tensor, step: float) -> Tensor:
        """The gradient step ``z - step * grad f(z)``, its products fused into ``addmm`` calls.

        Same value as ``z - step * self.grad(z)`` with two fewer passes over ``(N, K)`` arrays:
        the proximal-gradient loops are memory-bound on these passes at sparse-coding sizes.
        """
        if self.use_data:
            r = torch.addmm(self.X, z, self.D, beta=-1)  # z D - X
            return torch.addmm(z, r, self.D.T, alpha=-step)
        return torch.addmm(torch.add(z, self.cov, alpha=step), z, self.gram, alpha=-step)

    def loss(self, z: Tensor) -> Tensor:
        """``0.5 ||x - z D||^2`` per row."""
        if self.X is not None and self.D is not None:
            r = self.X - z @ self.D
            return 0.5 * (r * r).sum(dim=1)
        return 0.5 * self.sq_norms - (z * self.cov).sum(1) + 0.5 * ((z @ self.gram) * z).sum(1)


def lipschitz(gram: Tensor, n_iter: int = 50, seed: int = 0, rtol: float = 1e-4) -> float:
    """Largest eigenvalue of the PSD matrix ``gram`` by power iteration (+1% safety margin).

    This is the Lipschitz constant of ``grad f`` for ``f = 0.5||x - z D||^2`` with ``gram = D D^T``
    (``D^T D`` has the same value and is smaller when atoms outnumber features). Stops early once
    the estimate moves by less than ``rtol`` (relative) over 5 iterations.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(gram.shape[0], 1, generator=gen, dtype=gram.dtype).to(gram.device)
    tiny = torch.finfo(gram.dtype).tiny
    lam_old = 0.0
    for i in range(1, n_iter + 1):
        w = gram @ v
        norm = torch.linalg.vector_norm(w)
        v = w / norm.clamp(min=tiny)
        if i % 5 == 0:  # host sync only every few iterations
            lam = float(norm)
            if lam == 0.0 or lam - lam_old <= rtol * lam:
                break
            lam_old = lam
    return float(torch.linalg.vector_norm(gram @ v)) * 1.01


def _default_chunk(n_atoms: int, itemsize: int, per_row: int = 10) -> int:
    """Rows per chunk so that ``per_row`` row-vectors of ``n_atoms`` fit in ``CHUNK_BYTES``."""
    return max(64, CHUNK_BYTES // max(per_row * n_atoms * itemsize, 1))


def _check_iter(max_iter: int, tol: float) -> None:
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol!r}")
