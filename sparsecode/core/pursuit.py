"""Greedy pursuits in the Gram domain: MP, OMP / ORMP, and least squares on a chosen support."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .kernels.cpu_solvers import numba_available, omp_gram
from .problem import (
    CHUNK_BYTES,
    OMP_CHUNK_BYTES,
    LeastSquares,
    SolverResult,
    _check_iter,
    _default_chunk,
)
from .select import row_max
from .sparse import SparseCodes


def mp(
    problem: LeastSquares,
    *,
    n_nonzero_coefs: int | None = None,
    tol: float | None = None,
    positive: bool = False,
    stop_on_repeat: bool = False,
    return_path: bool = False,
    chunk_size: int | None = None,
    progress: bool = False,
) -> SolverResult:
    """Batched matching pursuit (Mallat & Zhang 1993) in the Gram domain.

    Each step picks, for every row at once, the atom ``j`` whose normalised correlation with
    the residual, ``rho_j / ||d_j||``, is largest in magnitude (with ``positive``: the largest
    positive one), adds the residual's projection ``v = rho_j / ||d_j||^2`` to that atom's code
    (an atom may be picked again: its value accumulates) and updates the residual correlations
    with one row of the Gram matrix, ``rho -= v G[j]``. Codes are never re-fitted (that is
    :func:`omp`). A row stops after ``n_nonzero_coefs`` steps, when its squared residual norm is
    ``<= tol``, when no atom correlates with the residual (positively, with ``positive``), or,
    with ``stop_on_repeat``, after a step that picked an atom already in its code (that step is
    kept: the rule of SAELens' ``MatchingPursuitSAE``).

    Returns :class:`SparseCodes` with ``n_nonzero_coefs`` slots (a repeated atom shares its
    slot); ``n_iter`` is the number of steps per row; with ``return_path`` also ``path``, the
    atom of each step (``-1`` once a row has stopped), which is what
    :class:`MatchingPursuit` differentiates through.

    >>> import torch
    >>> D = torch.eye(3, dtype=torch.float64)
    >>> X = torch.tensor([[3.0, -1.0, 0.5]], dtype=torch.float64)
    >>> mp(LeastSquares.from_data(X, D), n_nonzero_coefs=2).codes.to_dense()
    tensor([[ 3., -1.,  0.]], dtype=torch.float64)
    """
    if n_nonzero_coefs is None and tol is None:
        raise ValueError("mp needs n_nonzero_coefs or tol")
    kmax = problem.max_support if n_nonzero_coefs is None else n_nonzero_coefs
    if isinstance(kmax, bool) or not isinstance(kmax, int) or kmax < 1:
        raise ValueError(f"n_nonzero_coefs must be an integer >= 1, got {n_nonzero_coefs!r}")
    if tol is not None and not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol!r}")
    K = problem.n_atoms
    values = problem.new_codes(kmax)
    indices = problem.new_codes(kmax, torch.long)
    n_iter = problem.new_codes(1, torch.long).squeeze(1)
    path = problem.new_codes(kmax, torch.long)
    chunk = chunk_size or max(64, CHUNK_BYTES // (values.element_size() * 3 * K))
    for sl, sub in problem.chunks(chunk, progress):
        values[sl], indices[sl], n_iter[sl], path[sl] = _mp_chunk(sub, kmax, tol, positive,
                                                                  stop_on_repeat)
    return SolverResult(SparseCodes(values, indices, K), n_iter, path if return_path else None)


def _mp_chunk(prob: LeastSquares, kmax: int, tol: float | None, positive: bool,
              stop_on_repeat: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Matching pursuit for one chunk (see :func:`mp`). The state of the rows still picking
    atoms is kept compact (row-aligned with ``rho``: the per-step updates are scatters along
    the slots, not fancy indexing into the outputs); when half of them have stopped, the
    stopped rows are written out and the working set shrinks."""
    G = prob.gram
    rho = prob.cov.clone()  # residual correlations
    n, K = rho.shape
    dev, dt = rho.device, rho.dtype
    norms2 = torch.diagonal(G).clamp(min=torch.finfo(dt).tiny)
    # unit-norm atoms (an SAE's decoder) select on rho itself: one (N, K) pass less per step
    unit = bool(((norms2 - 1).abs() <= 16 * torch.finfo(dt).eps).all())
    inv_norm = None if unit else norms2.rsqrt()
    out = (torch.zeros(n, kmax, dtype=dt, device=dev),  # values
           torch.zeros(n, kmax, dtype=torch.long, device=dev),  # atoms
           torch.zeros(n, dtype=torch.long, device=dev),  # steps taken
           torch.full((n, kmax), -1, dtype=torch.long, device=dev))  # path
    vals, idx, steps, path = (t.clone() for t in out)
    count = torch.zeros(n, dtype=torch.long, device=dev)
    rows = torch.arange(n, device=dev)
    resid = None if tol is None else prob.sq_norms.clone()
    live = torch.ones(n, dtype=torch.bool, device=dev) if tol is None else resid > tol
    slots = torch.arange(kmax, device=dev)
    scratch = torch.empty_like(rho)

    def write_out(sel: Tensor) -> None:
        for dst, src in zip(out, (vals, idx, steps, path), strict=True):
            dst[rows[sel]] = src[sel]

    for t in range(kmax):
        if not bool(live.any()):
            break
        if int(live.sum()) <= 0.5 * rows.numel():
            write_out(~live)
            rows, rho, vals, idx, steps, path, count = (
                a[live] for a in (rows, rho, vals, idx, steps, path, count))
            resid = resid[live] if resid is not None else None
            live = live[live]
        score = rho if inv_norm is None else rho * inv_norm
        best, j = row_max(score if positive else score.abs())
        ok = live & (best > 0)
        v = torch.where(ok, rho.gather(1, j[:, None]).squeeze(1) / norms2[j], 0.0)
        rows_of_G = torch.index_select(G, 0, j, out=scratch[: j.numel()])  # no fresh pages
        rho.addcmul_(v[:, None], rows_of_G, value=-1)
        hit = (idx == j[:, None]) & (slots[None, :] < count[:, None])
        repeat = hit.any(dim=1)
        slot = torch.where(repeat, hit.int().argmax(dim=1), count.clamp(max=kmax - 1))[:, None]
        vals.scatter_add_(1, slot, v[:, None])
        idx.scatter_(1, slot, torch.where(ok, j, idx.gather(1, slot).squeeze(1))[:, None])
        count += (ok & ~repeat).long()
        steps += ok.long()
        path[:, t] = torch.where(ok, j, -1)
        live = ok & ~(repeat & stop_on_repeat)
        if resid is not None:
            resid = resid - v * v * norms2[j]
            live &= resid > tol
    write_out(torch.ones_like(live))
    return out


def omp(
    problem: LeastSquares,
    *,
    n_nonzero_coefs: int | None = None,
    tol: float | None = None,
    selection: str = "omp",
    chunk_size: int | None = None,
    progress: bool = False,
) -> SolverResult:
    """Batched Orthogonal Matching Pursuit in the Gram domain.

    Picks, for every row at once, the atom most correlated with the residual, then updates the
    residual correlations through an incremental Gram-Schmidt (Cholesky) factor of the selected
    atoms, so no per-row least-squares problem is ever formed. Stops a row after
    ``n_nonzero_coefs`` atoms, when its squared residual norm is ``<= tol``, or when the next atom
    is linearly dependent on the selected ones (whichever comes first). Returns
    :class:`SparseCodes`; ``n_iter`` is the number of atoms selected per row.

    ``selection="omp"``: the atom most correlated with the residual; the same rule and result as
    scikit-learn's ``orthogonal_mp_gram`` (which, unlike this function, selects one atom even when
    ``||x||^2 <= tol`` already). ``selection="ormp"``: order-recursive matching pursuit (also called
    orthogonal least squares; what SPAMS' ``omp`` does): the atom whose addition most reduces the
    residual after re-projection, i.e. the largest ``alpha_j^2 / ||d_j^perp||^2`` with ``d_j^perp``
    the part of atom ``j`` orthogonal to the selected ones. Slightly more work per step, lower
    residuals at equal sparsity.
    """
    if n_nonzero_coefs is None and tol is None:
        raise ValueError("omp needs n_nonzero_coefs or tol")
    if selection not in ("omp", "ormp"):
        raise ValueError(f"selection must be 'omp' or 'ormp', got {selection!r}")
    K = problem.n_atoms
    kmax = problem.max_support if n_nonzero_coefs is None else int(n_nonzero_coefs)
    if kmax < 1 or kmax > K:
        raise ValueError(f"n_nonzero_coefs must be in [1, n_atoms={K}], got {n_nonzero_coefs}")
    if tol is not None and not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol!r}")
    values = problem.new_codes(kmax)
    indices = problem.new_codes(kmax, torch.long)
    n_iter = problem.new_codes(1, torch.long).squeeze(1)
    if values.device.type == "cpu" and numba_available():
        # one signal at a time in compiled code: a chunk only holds its correlations
        run, chunk = _omp_compiled, _default_chunk(K, values.element_size(), per_row=1)
    else:  # ~20 MB working sets measured fastest on CPU caches (2048 rows x 256 atoms, f32)
        per_row = values.element_size() * (min(kmax, 8) + 2) * K
        run, chunk = _omp_chunk, max(64, OMP_CHUNK_BYTES // per_row)
    for sl, sub in problem.chunks(chunk_size or chunk, progress):
        values[sl], indices[sl], n_iter[sl] = run(sub, kmax, tol, selection == "ormp")
    return SolverResult(SparseCodes(values, indices, K), n_iter)


def _omp_compiled(prob: LeastSquares, kmax: int, tol: float | None, ormp: bool = False):
    """:func:`_omp_chunk`'s steps for one signal at a time, compiled and parallel over signals
    (:func:`sparsecode.core.kernels.cpu_solvers.omp_gram`; CPU tensors)."""
    dt = prob.cov.dtype
    arrays = [t.detach().contiguous().numpy() for t in (prob.gram.to(dt), prob.cov)]
    sq = (prob.sq_norms.to(dt).contiguous().numpy() if tol is not None
          else np.zeros(prob.n_rows, dtype=arrays[1].dtype))
    vals, idx, count = omp_gram(arrays[0], arrays[1], sq, kmax, tol, ormp)
    return torch.from_numpy(vals), torch.from_numpy(idx), torch.from_numpy(count)


def _omp_chunk(prob: LeastSquares, kmax: int, tol: float | None, ormp: bool = False):
    """OMP for one chunk, batched in torch (any device); see :func:`omp`.

    With ``q_1..q_n`` the Gram-Schmidt basis of the selected atoms, only ``u_i = D q_i`` (the
    correlations of every atom with ``q_i``) is stored. Selecting atom ``j`` gives
    ``L[n, i] = u_i[j]``, ``L[n, n]^2 = G[j, j] - sum_i u_i[j]^2`` (Cholesky of ``G_SS``),
    ``u_n = (G[j] - sum_i L[n, i] u_i) / L[n, n]``, ``<q_n, x> = alpha[j] / L[n, n]`` and the
    residual correlations update as ``alpha -= <q_n, x> u_n``. Codes solve ``L^T z = c``.
    An atom already selected has (numerically) zero residual correlation and ``L[n, n] = 0``,
    so the linear-dependence test also stops rows that would pick one twice.

    For ORMP, ``perp[j] = G[j, j] - sum_i u_i[j]^2 = ||d_j^perp||^2`` is kept up to date too.

    Storage for ``u`` and ``L`` starts narrow and doubles on demand (with a tolerance most rows
    stop long before ``kmax``); finished rows are dropped from the working set in batches.
    """
    G = prob.gram
    n, K = prob.n_rows, prob.n_atoms
    cov = prob.cov
    dev, dt = cov.device, cov.dtype
    diag = torch.diagonal(G)
    eps, tiny = torch.finfo(dt).eps, torch.finfo(dt).tiny
    width = min(kmax, 8)
    L = torch.eye(width, dtype=dt, device=dev).repeat(n, 1, 1)
    c = torch.zeros(n, width, dtype=dt, device=dev)
    idx = torch.zeros(n, width, dtype=torch.long, device=dev)
    count = torch.zeros(n, dtype=torch.long, device=dev)
    # working set: rows still selecting atoms (compacted when half of them have finished)
    rows = torch.arange(n, device=dev)
    if tol is None:
        alpha, resid = cov.clone(), None  # residual correlations, squared residual norms
    else:  # rows already within tolerance select nothing
        rows = (prob.sq_norms > tol).nonzero().squeeze(1)
        alpha, resid = cov[rows], prob.sq_norms[rows]
    U = torch.empty(rows.numel(), width, K, dtype=dt, device=dev)
    score = torch.empty(rows.numel(), K, dtype=dt, device=dev)
    perp = diag.expand(rows.numel(), K).clone() if ormp else None
    live = torch.ones(rows.numel(), dtype=torch.bool, device=dev)
    n_live = int(live.sum())
    for step in range(kmax):
        if n_live == 0:
            break
        if n_live <= 0.5 * rows.numel():
            keep = live
            rows, alpha, U, live = rows[keep], alpha[keep], U[keep], live[keep]
            perp = perp[keep] if ormp else None
            resid = resid[keep] if resid is not None else None
        if step == width:
            U, L, c, idx = _omp_grow(U, L, c, idx, min(kmax, 2 * width))
            width = L.shape[1]
        j = _omp_select(alpha, perp, score[: rows.numel()], diag)
        a_j = alpha.gather(1, j[:, None]).squeeze(1)
        w, proj, norm2 = _omp_orthogonalise(G, U, j, step, diag)
        ok = live & (norm2 > 1e2 * eps * diag[j]) & (a_j * a_j > tiny)
        lnn = torch.sqrt(torch.where(ok, norm2, 1.0))
        cn = torch.where(ok, a_j / lnn, 0.0)
        u = w.div_(lnn[:, None])
        alpha.addcmul_(cn[:, None], u, value=-1)
        U[:, step] = u
        if ormp:
            perp.addcmul_(u, u, value=-1)
        live = ok
        if resid is not None:
            resid = resid - cn * cn
            live = live & (resid > tol)
        r_ok = rows[ok]
        if proj is not None:
            L[r_ok, step, :step] = proj[ok]
        L[r_ok, step, step] = lnn[ok]
        c[r_ok, step] = cn[ok]
        idx[r_ok, step] = j[ok]
        count[r_ok] += 1
        n_live = int(live.sum())
    z = torch.linalg.solve_triangular(L.transpose(1, 2), c.unsqueeze(-1), upper=True).squeeze(-1)
    pad = kmax - width
    return F.pad(z, (0, pad)), F.pad(idx, (0, pad)), count


def _omp_grow(U: Tensor, L: Tensor, c: Tensor, idx: Tensor, new: int):
    """The per-row storage widened to ``new`` selected atoms (``L`` padded with identity)."""
    width = L.shape[1]
    U = F.pad(U, (0, 0, 0, new - width))
    L = F.pad(L, (0, new - width, 0, new - width))
    L[:, torch.arange(width, new), torch.arange(width, new)] = 1.0
    return U, L, F.pad(c, (0, new - width)), F.pad(idx, (0, new - width))


def _omp_select(alpha: Tensor, perp: Tensor | None, score: Tensor, diag: Tensor) -> Tensor:
    """Atom chosen per row: largest ``|alpha|`` (OMP) or ``alpha^2 / ||d^perp||^2`` (ORMP;
    selected or dependent atoms have ``perp ~ 0``). ``score`` is scratch space."""
    if perp is None:
        return row_max(torch.abs(alpha, out=score))[1]
    eps, tiny = torch.finfo(alpha.dtype).eps, torch.finfo(alpha.dtype).tiny
    torch.mul(alpha, alpha, out=score).div_(perp.clamp(min=tiny))
    score.masked_fill_(perp <= 1e2 * eps * diag, -1.0)
    return row_max(score)[1]


def _omp_orthogonalise(G: Tensor, U: Tensor, j: Tensor, step: int, diag: Tensor):
    """``(w, proj, norm2)`` for the chosen atoms ``j``: ``w = G[j] - sum_i proj_i u_i`` (the
    correlations of every atom with the new atom's part orthogonal to the selected ones),
    ``proj_i = u_i[j]`` and ``norm2 = G[j, j] - ||proj||^2``."""
    w = G.index_select(0, j)
    if not step:
        return w, None, diag[j].clone()
    m = j.numel()
    proj = U[:, :step].gather(2, j.view(m, 1, 1).expand(m, step, 1)).squeeze(2)
    if step <= 2:  # tiny batched matmuls are slow; two axpys are not
        for i in range(step):
            w.addcmul_(proj[:, i : i + 1], U[:, i], value=-1)
    else:
        w = torch.baddbmm(w.unsqueeze(1), proj.unsqueeze(1), U[:, :step], alpha=-1).squeeze(1)
    return w, proj, diag[j] - (proj * proj).sum(dim=1)


def support_lstsq(
    problem: LeastSquares,
    support: Tensor,
    *,
    init: Tensor | None = None,
    ridge: float = 0.0,
    max_iter: int = 200,
    tol: float = 1e-6,
) -> SolverResult:
    """Least squares restricted to a fixed support per row (the "debias" step after a support
    is chosen): ``min_z 0.5 ||x - z D||^2 + 0.5 ridge ||z||^2`` with ``z_j = 0`` off
    ``support`` (a boolean ``(N, K)`` mask).

    Batched conjugate gradient on the masked normal equations ``(G_SS + ridge I) z_S = c_S``:
    every iteration is one ``(N, K) @ (K, K)`` product for all rows, whatever their supports.
    ``init`` (zero off the support) warm-starts it. A row stops when its residual norm is
    ``<= tol * ||c_S||``; ``n_iter`` counts iterations per row.

    >>> import torch
    >>> G = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    >>> c = torch.tensor([[3.0, 3.0]], dtype=torch.float64)
    >>> keep = torch.tensor([[True, False]])
    >>> support_lstsq(LeastSquares.from_gram(G, c), keep).codes
    tensor([[1.5000, 0.0000]], dtype=torch.float64)
    """
    _check_iter(max_iter, tol)
    if not ridge >= 0:
        raise ValueError(f"ridge must be >= 0, got {ridge!r}")
    G, C = problem.gram, problem.cov
    if support.shape != C.shape:
        raise ValueError(f"support has shape {tuple(support.shape)}, expected {tuple(C.shape)}")
    m = support.to(C.dtype)
    z = torch.zeros_like(C) if init is None else init.to(C) * m

    def apply(p: Tensor) -> Tensor:
        return (p @ G + ridge * p) * m

    r = C * m - apply(z)
    p = r.clone()
    rr = (r * r).sum(dim=1)
    stop = (tol * torch.linalg.vector_norm(C * m, dim=1)) ** 2
    n_iter = torch.zeros(C.shape[0], dtype=torch.long, device=C.device)
    live = rr > stop
    tiny = torch.finfo(C.dtype).tiny
    for _ in range(max_iter):
        if not bool(live.any()):
            break
        Ap = apply(p)
        a = torch.where(live, rr / (p * Ap).sum(dim=1).clamp(min=tiny), 0.0)
        z.addcmul_(a[:, None], p)
        r.addcmul_(a[:, None], Ap, value=-1)
        rr_new = (r * r).sum(dim=1)
        n_iter += live.long()
        p = r + (rr_new / rr.clamp(min=tiny))[:, None] * p
        rr = rr_new
        live = live & (rr > stop)
    return SolverResult(z, n_iter)


class MatchingPursuit:
    """Matching pursuit as an encoder step: the activation of a matching-pursuit SAE (Costa et
    al. 2025, "From Flat to Hierarchical: Extracting Sparse Representations with Matching
    Pursuit"; SAELens' ``MatchingPursuitSAE``). The rows of ``W_enc`` are the atoms (tied: the
    SAE's decoder rows); at most ``k`` steps, positive selection, a token stops once its
    residual norm is at most ``residual_threshold`` (when > 0) or after picking an atom again.

    :meth:`encode` picks the atoms with :func:`mp` (no gradient) and recomputes the values along
    the picks with autograd, ``v_t = relu(<r_t, d_t>) / ||d_t||^2`` (the norm held constant:
    1 for the unit-norm atoms of an SAE, where this is SAELens' gradient), ``r_{t+1} = r_t -
    v_t d_t``, so gradients reach ``x``, ``b_dec`` and the picked atoms through the unrolled
    steps (no ``(N, n_atoms)`` gradient). Pairs come grouped by row and sorted by atom, a
    repeated atom's values summed. ``b_enc`` is not used (an MP-SAE has no encoder bias).

    >>> import torch
    >>> op = MatchingPursuit(k=2)
    >>> rows, cols, vals = op.encode(torch.tensor([[3.0, 1.0, 0.0]]), torch.eye(3), None)
    >>> cols.tolist(), vals.tolist()
    ([0, 1], [3.0, 1.0])
    """

    bounded = True

    def __init__(self, k: int, residual_threshold: float = 0.0, positive: bool = True,
                 stop_on_repeat: bool = True):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        if not residual_threshold >= 0:
            raise ValueError(f"residual_threshold must be >= 0, got {residual_threshold!r}")
        self.k = k
        self.residual_threshold = float(residual_threshold)
        self.positive = bool(positive)
        self.stop_on_repeat = bool(stop_on_repeat)

    def __repr__(self) -> str:
        return (f"MatchingPursuit(k={self.k}, residual_threshold={self.residual_threshold}, "
                f"positive={self.positive}, stop_on_repeat={self.stop_on_repeat})")

    def picks(self, xc: Tensor, W: Tensor) -> Tensor:
        """``(N, steps)`` atom picked at each step for centred inputs ``xc`` (``-1``: stopped)."""
        thr = self.residual_threshold
        with torch.no_grad():
            prob = LeastSquares.from_data(xc.detach(), W.detach().to(xc.dtype))
            res = mp(prob, n_nonzero_coefs=self.k, tol=thr * thr if thr > 0 else None,
                     positive=self.positive, stop_on_repeat=self.stop_on_repeat,
                     return_path=True)
        steps = int(res.n_iter.max()) if res.n_iter.numel() else 0
        return res.path[:, :steps]

    def encode(self, x: Tensor, W_enc: Tensor, b_enc: Tensor | None, b_dec: Tensor | None = None,
               *, matmul_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``(rows, cols, values)`` of the pursuit's code of a 2-D ``x`` (see the class)."""
        xc = x if b_dec is None else x - b_dec.to(x.dtype)
        path = self.picks(xc, W_enc)
        N, K = xc.shape[0], W_enc.shape[0]
        live = path >= 0
        picks = path.clamp(min=0)
        # (N, steps, d) in one gather; index_select's backward is index_add (20x faster on CPU
        # than the serial index_put of W_enc[picks])
        D = W_enc.index_select(0, picks.reshape(-1)).unflatten(0, picks.shape)
        # 1 / ||d_t||^2, a constant (1 for unit atoms, where this is SAELens' gradient)
        inv_norm2 = (W_enc.detach().pow(2).sum(dim=1).clamp_min(1e-30).reciprocal()[picks]
                     * live.to(W_enc.dtype))
        r, values = xc.to(W_enc.dtype), []
        # unbind: its backward stacks the steps' gradients once (a slice D[:, t] would fill a
        # zeroed (N, steps, d) gradient per step)
        for d, w in zip(D.unbind(1), inv_norm2.unbind(1), strict=True):
            c = torch.linalg.vecdot(r, d)
            v = (c.relu() if self.positive else c) * w
            r = r - v[:, None] * d
            values.append(v)
        if not values:
            empty = torch.empty(0, dtype=torch.long, device=x.device)
            return empty, empty, W_enc.new_empty(0)
        V, keep = torch.stack(values, dim=1), live
        keys = (torch.arange(N, device=x.device)[:, None] * K + path)[keep]
        uniq, inv = torch.unique(keys, sorted=True, return_inverse=True)
        vals = V.new_zeros(uniq.numel()).index_add(0, inv, V[keep])
        return uniq // K, uniq % K, vals

    def project_pairs(self, pre: Tensor, cols: Tensor) -> Tensor:
        return pre


class OrthogonalPursuit:
    """OMP, ORMP or non-negative OMP as an encoder step (forward only): the activation of a
    dictionary learned online with that pursuit coding its batches (``sae train --arch
    online_dl --pursuit nnomp``). The rows of ``W_enc`` are the atoms, normalised for the solver
    and the codes rescaled back; at most ``k`` atoms, or until the residual norm is at most
    ``residual_threshold`` (when > 0). The values are least-squares refits on the picked atoms,
    so there is no gradient through them (the online learner needs none).

    >>> import torch
    >>> op = OrthogonalPursuit(k=2)
    >>> rows, cols, vals = op.encode(torch.tensor([[3.0, 1.0, 0.0]]), 2 * torch.eye(3), None)
    >>> cols.tolist(), vals.tolist()
    ([0, 1], [1.5, 0.5])
    """

    bounded = True
    SELECTIONS = ("omp", "ormp", "nnomp")

    def __init__(self, k: int, residual_threshold: float = 0.0, selection: str = "omp"):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        if not residual_threshold >= 0:
            raise ValueError(f"residual_threshold must be >= 0, got {residual_threshold!r}")
        if selection not in self.SELECTIONS:
            raise ValueError(f"selection must be one of {self.SELECTIONS}, got {selection!r}")
        self.k, self.residual_threshold, self.selection = k, float(residual_threshold), selection

    def __repr__(self) -> str:
        return (f"OrthogonalPursuit(k={self.k}, residual_threshold={self.residual_threshold}, "
                f"selection={self.selection!r})")

    def solve(self, problem: LeastSquares) -> SolverResult:
        """The pursuit on ``problem`` (unit atoms): :func:`omp` or :func:`nnomp`."""
        thr = self.residual_threshold
        tol = thr * thr if thr > 0 else None
        if self.selection == "nnomp":
            return nnomp(problem, n_nonzero_coefs=self.k, tol=tol)
        return omp(problem, n_nonzero_coefs=self.k, tol=tol, selection=self.selection)

    @torch.no_grad()
    def encode(self, x: Tensor, W_enc: Tensor, b_enc: Tensor | None, b_dec: Tensor | None = None,
               *, matmul_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``(rows, cols, values)`` of the pursuit's code of a 2-D ``x`` (see the class)."""
        W = W_enc.detach()
        norms = W.norm(dim=1).clamp_min(1e-12)
        D = W / norms[:, None]
        xc = x.detach() if b_dec is None else x.detach() - b_dec.detach().to(x.dtype)
        codes = self.solve(LeastSquares.from_data(xc.to(D.dtype), D)).codes
        return codes.pairs(norms)

    def project_pairs(self, pre: Tensor, cols: Tensor) -> Tensor:
        return pre


def nnomp(
    problem: LeastSquares,
    *,
    n_nonzero_coefs: int | None = None,
    tol: float | None = None,
    max_iter: int = 100,
    chunk_size: int | None = None,
    progress: bool = False,
) -> SolverResult:
    """Batched non-negative orthogonal matching pursuit (Bruckstein, Elad & Zibulevsky 2008).

    Each step adds, for every row at once, the atom with the largest positive correlation with
    the residual, then re-fits all the row's selected codes by non-negative least squares on
    the selected atoms (accelerated projected gradient on the small ``G_SS`` system, warm-started
    from the previous codes, at most ``max_iter`` iterations, stopped at a KKT residual of
    ``1e-7`` relative). A row stops after ``n_nonzero_coefs`` atoms, when its squared residual
    norm is ``<= tol`` or when no atom correlates positively with the residual. Returns
    :class:`SparseCodes` (some codes may be 0: NNLS can switch a selected atom off) and the
    atoms selected per row.

    >>> import torch
    >>> D = torch.eye(3, dtype=torch.float64)
    >>> X = torch.tensor([[3.0, -1.0, 0.5]], dtype=torch.float64)
    >>> nnomp(LeastSquares.from_data(X, D), n_nonzero_coefs=3).codes.to_dense()
    tensor([[3.0000, 0.0000, 0.5000]], dtype=torch.float64)
    """
    if n_nonzero_coefs is None and tol is None:
        raise ValueError("nnomp needs n_nonzero_coefs or tol")
    kmax = problem.max_support if n_nonzero_coefs is None else n_nonzero_coefs
    if isinstance(kmax, bool) or not isinstance(kmax, int) or not 1 <= kmax <= problem.n_atoms:
        raise ValueError(f"n_nonzero_coefs must be in [1, n_atoms={problem.n_atoms}], got "
                         f"{n_nonzero_coefs!r}")
    if tol is not None and not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol!r}")
    _check_iter(max_iter, 0.0)
    K = problem.n_atoms
    values = problem.new_codes(kmax)
    indices = problem.new_codes(kmax, torch.long)
    n_iter = problem.new_codes(1, torch.long).squeeze(1)
    chunk = chunk_size or max(64, CHUNK_BYTES // (values.element_size() * (2 * K + kmax * kmax)))
    for sl, sub in problem.chunks(chunk, progress):
        values[sl], indices[sl], n_iter[sl] = _nnomp_chunk(sub, kmax, tol, max_iter)
    return SolverResult(SparseCodes(values, indices, K), n_iter)


def _nnomp_chunk(prob: LeastSquares, kmax: int, tol: float | None, max_iter: int):
    G, C = prob.gram, prob.cov
    n, K = C.shape
    dev, dt = C.device, C.dtype
    idx = torch.zeros(n, kmax, dtype=torch.long, device=dev)
    z = torch.zeros(n, kmax, dtype=dt, device=dev)
    count = torch.zeros(n, dtype=torch.long, device=dev)
    live = torch.ones(n, dtype=torch.bool, device=dev)
    if tol is not None:
        live &= prob.sq_norms > tol
    for s in range(kmax):
        if not bool(live.any()):
            break
        # residual correlations c - z_S G[S, :] (the selected atoms masked out)
        rho = C - torch.bmm(z[:, None, :s], G[idx[:, :s]]).squeeze(1) if s else C.clone()
        rho.scatter_(1, idx[:, :s], -torch.inf)
        best, j = row_max(rho)
        add = live & (best > 0)
        idx[:, s] = torch.where(add, j, idx[:, s])
        count += add.long()
        live = add
        S = idx[:, : s + 1]
        on = torch.arange(s + 1, device=dev)[None, :] < count[:, None]
        G_SS = torch.where(on[:, :, None] & on[:, None, :], G[S[:, :, None], S[:, None, :]], 0.0)
        c_S = torch.where(on, C.gather(1, S), 0.0)
        z[:, : s + 1] = _nnls(G_SS, c_S, z[:, : s + 1], max_iter)
        if tol is not None:  # ||x - z D||^2 = ||x||^2 - 2 z.c + z G z
            zs = z[:, : s + 1]
            sq = prob.sq_norms - 2 * (zs * c_S).sum(1) + (zs[:, None, :] @ G_SS @ zs[:, :, None]
                                                           ).reshape(-1)
            live &= sq > tol
    return z, idx, count


def _nnls(G: Tensor, c: Tensor, z: Tensor, max_iter: int) -> Tensor:
    """``argmin_{z >= 0} 0.5 z G z - c.z`` per row (small batched systems), by FISTA with a
    projection onto ``z >= 0``, step ``1 / L`` with ``L`` the row's Gershgorin bound."""
    L = G.abs().sum(dim=2).amax(dim=1).clamp_min(torch.finfo(G.dtype).tiny)[:, None]
    z = z.clamp(min=0)
    y, t = z, 1.0
    scale = c.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(G.dtype).tiny)
    for _ in range(max_iter):
        grad = (G @ y[:, :, None]).squeeze(2) - c
        z_new = (y - grad / L).clamp(min=0)
        t_new = 0.5 * (1 + (1 + 4 * t * t) ** 0.5)
        y = z_new + ((t - 1) / t_new) * (z_new - z)
        z, t = z_new, t_new
        g = (G @ z[:, :, None]).squeeze(2) - c  # KKT: g >= 0, g = 0 where z > 0
        kkt = torch.where(z > 0, g.abs(), (-g).clamp(min=0)).amax(dim=1, keepdim=True)
        if bool((kkt <= 1e-7 * scale).all()):
            break
    return z
