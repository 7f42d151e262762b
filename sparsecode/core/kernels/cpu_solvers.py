"""Compiled CPU loops of the greedy pursuits and the Lasso homotopy (numba), parallel over
signals.

On a CPU the batched torch OMP of :mod:`sparsecode.core.pursuit` is bound by memory traffic and
per-op overhead on ``(rows x atoms)`` arrays; SPAMS (C++, OpenMP) codes one signal at a time
with its working set in cache. :func:`omp_gram` runs the very steps of
:func:`sparsecode.core.pursuit._omp_chunk` for one signal at a time, in compiled code, signals
spread over the CPU threads (``numba.prange``): select the atom (largest ``|alpha|``, or ORMP's
largest ``alpha^2 / ||d^perp||^2``), extend the Gram-Schmidt basis ``u_n = (G[j] - sum_i
L[n, i] u_i) / L[n, n]``, update the residual correlations, stop on ``k`` atoms, the tolerance or
linear dependence, then solve ``L^T z = c``. Used when numba imports and the problem is on the
CPU; ``SPARSECODE_DISABLE_NUMBA=1`` forces the torch path (both are tested for the same codes).
:func:`lars_gram` does the same for :func:`sparsecode.core.lars._lars_chunk`: each signal
follows its own homotopy path (entries, Lasso exits, the end at ``alpha``) with rank-one updates
of ``G_AA^{-1}``, so a batch no longer waits for its slowest row. :func:`bcd_pass` is the
block-coordinate dictionary step of :func:`sparsecode.core.dictionary.update_dictionary`, atom
by atom, with ``A D`` kept up to date by a rank-one update per atom instead of a product per atom.
"""

from __future__ import annotations

import os

import numpy as np

__all__ = ["bcd_pass", "lars_gram", "numba_available", "omp_gram"]

try:  # numba is a dependency, but the torch path stays complete without it
    import numba

    _HAVE_NUMBA = True
except ImportError:  # pragma: no cover - exercised only where numba is missing
    _HAVE_NUMBA = False


def numba_available() -> bool:
    """Whether the compiled CPU loops are used (numba imports, not disabled)."""
    return _HAVE_NUMBA and os.environ.get("SPARSECODE_DISABLE_NUMBA", "") in ("", "0")


#: Signals per parallel task: each task allocates its working arrays once.
BLOCK = 64


def _omp_rows(G, cov, sq_norms, kmax, tol, use_tol, ormp, eps, tiny, vals, idx,
              count):  # pragma: no cover
    n, K = cov.shape
    diag = np.empty(K, dtype=cov.dtype)
    for t in range(K):
        diag[t] = G[t, t]
    n_blocks = (n + BLOCK - 1) // BLOCK
    for b in numba.prange(n_blocks):
        alpha = np.empty(K, dtype=cov.dtype)
        perp = np.empty(K, dtype=cov.dtype)
        U = np.empty((kmax, K), dtype=cov.dtype)
        L = np.zeros((kmax, kmax), dtype=cov.dtype)
        c = np.zeros(kmax, dtype=cov.dtype)
        sel = np.zeros(kmax, dtype=np.int64)
        for r in range(b * BLOCK, min(n, (b + 1) * BLOCK)):
            resid = sq_norms[r]
            cnt = 0
            if not (use_tol and resid <= tol):
                for t in range(K):
                    alpha[t] = cov[r, t]
                    perp[t] = diag[t]
                for step in range(kmax):
                    j = 0
                    best = -1.0
                    for t in range(K):  # first maximum on ties, as sparsecode.core.select.row_max
                        if ormp:
                            p = perp[t]
                            s = alpha[t] * alpha[t] / max(p, tiny) if p > 1e2 * eps * diag[t] \
                                else -1.0
                        else:
                            s = abs(alpha[t])
                        if s > best:
                            best = s
                            j = t
                    a_j = alpha[j]
                    norm2 = diag[j]
                    for i in range(step):
                        norm2 -= U[i, j] * U[i, j]
                    if not (norm2 > 1e2 * eps * diag[j] and a_j * a_j > tiny):
                        break
                    lnn = np.sqrt(norm2)
                    cn = a_j / lnn
                    for i in range(step):
                        L[step, i] = U[i, j]
                    for t in range(K):  # contiguous rows: vectorised loops
                        U[step, t] = G[j, t]
                    for i in range(step):
                        li = L[step, i]
                        for t in range(K):
                            U[step, t] -= li * U[i, t]
                    for t in range(K):
                        w = U[step, t] / lnn
                        U[step, t] = w
                        alpha[t] -= cn * w
                        if ormp:
                            perp[t] -= w * w
                    L[step, step] = lnn
                    c[step] = cn
                    sel[step] = j
                    cnt += 1
                    if use_tol:
                        resid -= cn * cn
                        if not resid > tol:
                            break
            for i in range(cnt - 1, -1, -1):  # L^T z = c, L lower triangular
                z = c[i]
                for m in range(i + 1, cnt):
                    z -= L[m, i] * vals[r, m]
                vals[r, i] = z / L[i, i]
                idx[r, i] = sel[i]
            for i in range(cnt, kmax):
                vals[r, i] = 0.0
                idx[r, i] = 0
            count[r] = cnt


_omp_compiled = (numba.njit(parallel=True, cache=True, nogil=True)(_omp_rows)
                 if _HAVE_NUMBA else None)


def omp_gram(G: np.ndarray, cov: np.ndarray, sq_norms: np.ndarray, kmax: int,
             tol: float | None, ormp: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(values (n, kmax), indices (n, kmax), counts (n,))`` of OMP (or ORMP) in the Gram
    domain: ``G (K, K)`` the atoms' Gram matrix, ``cov (n, K)`` the correlations of each signal
    with the atoms, ``sq_norms (n,)`` the signals' squared norms (used with ``tol``). Arrays of
    one float dtype (float32 or float64), C-contiguous. Unused slots hold value 0, index 0."""
    n = cov.shape[0]
    vals = np.zeros((n, kmax), dtype=cov.dtype)
    idx = np.zeros((n, kmax), dtype=np.int64)
    count = np.zeros(n, dtype=np.int64)
    info = np.finfo(cov.dtype)
    _omp_compiled(G, cov, sq_norms, kmax, 0.0 if tol is None else float(tol), tol is not None,
                  ormp, float(info.eps), float(info.tiny), vals, idx, count)
    return vals, idx, count


def _lars_add(G, j, cnt, M, d, sA, zA, idx, active, rho, b, u, positive, eps):  # pragma: no cover
    """Append atom ``j`` at slot ``cnt`` (rank-one update of ``M = G_AA^{-1}`` and of the
    direction ``d = M s``); False when ``j`` is linearly dependent on the active set."""
    for i in range(cnt):
        b[i] = G[idx[i], j]
    sigma = G[j, j]
    for i in range(cnt):
        acc = 0.0
        for m in range(cnt):
            acc += M[i, m] * b[m]
        u[i] = acc
        sigma -= b[i] * acc
    if sigma <= 1e3 * eps * G[j, j]:
        return False
    sign = 1.0 if positive or rho[j] > 0 else (-1.0 if rho[j] < 0 else 0.0)
    u[cnt] = -1.0  # v = u - e_cnt
    coef = -sign
    for i in range(cnt):
        coef += u[i] * sA[i]
    coef /= sigma
    for i in range(cnt + 1):
        for m in range(cnt + 1):
            M[i, m] += u[i] * u[m] / sigma
        d[i] += coef * u[i]
    sA[cnt] = sign
    zA[cnt] = 0.0
    idx[cnt] = j
    active[j] = True
    return True


def _lars_drop(p, cnt, M, d, sA, zA, idx, active):  # pragma: no cover
    """Remove active slot ``p``: move it last, downdate ``M``, recompute ``d = M s``."""
    last = cnt - 1
    for i in range(cnt):  # swap rows and columns p <-> last
        M[p, i], M[last, i] = M[last, i], M[p, i]
    for i in range(cnt):
        M[i, p], M[i, last] = M[i, last], M[i, p]
    zA[p], zA[last] = zA[last], zA[p]
    sA[p], sA[last] = sA[last], sA[p]
    idx[p], idx[last] = idx[last], idx[p]
    piv = M[last, last]
    for i in range(last):
        for m in range(last):
            M[i, m] -= M[i, last] * M[last, m] / piv
    for i in range(cnt):
        M[last, i] = 0.0
        M[i, last] = 0.0
    active[idx[last]] = False
    zA[last] = 0.0
    sA[last] = 0.0
    idx[last] = 0
    for i in range(cnt):
        acc = 0.0
        for m in range(last):
            acc += M[i, m] * sA[m]
        d[i] = acc


def _lars_rows(G, cov, alpha, width, cap, k_stop, lasso, positive, max_iter, eps, out,
               steps_out, ok):  # pragma: no cover
    n, K = cov.shape
    inf = np.inf
    n_blocks = (n + BLOCK - 1) // BLOCK
    for blk in numba.prange(n_blocks):
        rho = np.empty(K)
        a = np.empty(K)
        a_gap = np.empty(K)
        active = np.zeros(K, dtype=np.bool_)
        M = np.zeros((width, width))
        d = np.zeros(width)
        sA = np.zeros(width)
        zA = np.zeros(width)
        idx = np.zeros(width, dtype=np.int64)
        b = np.zeros(width)
        u = np.zeros(width + 1)
        for r in range(blk * BLOCK, min(n, (blk + 1) * BLOCK)):
            lam = -1.0
            j0 = 0
            for t in range(K):
                rho[t] = cov[r, t]
                active[t] = False
                v = rho[t] if positive else abs(rho[t])
                if v > lam:
                    lam = v
                    j0 = t
            M[:, :] = 0.0
            d[:] = 0.0
            cnt = 0
            steps = 0
            if lam > alpha and _lars_add(G, j0, 0, M, d, sA, zA, idx, active, rho, b, u,
                                         positive, eps):
                cnt = 1
                while steps < max_iter:
                    for t in range(K):  # a = d G_A, a row of G at a time
                        a[t] = 0.0
                    for i in range(cnt):
                        di = d[i]
                        row = idx[i]
                        for t in range(K):
                            a[t] += di * G[row, t]
                    g_add, j_add = inf, 0
                    if cnt < cap:
                        # branch-free (SIMD) step to each inactive atom's entry, then the min
                        floor = 10 * eps * lam
                        for t in range(K):
                            if positive:
                                sg = 1.0
                            else:
                                x = rho[t] - lam * a[t]
                                sg = 1.0 if x > 0 else (-1.0 if x < 0 else 0.0)
                            den = 1.0 - sg * a[t]
                            g = (lam - sg * rho[t]) / (den if den > eps else eps)
                            a_gap[t] = inf if (active[t] or g <= floor) else g
                        for t in range(K):
                            if a_gap[t] < g_add:
                                g_add, j_add = a_gap[t], t
                    g_drop, p_drop = inf, 0
                    if lasso:
                        for i in range(cnt):
                            if d[i] != 0:
                                g = -zA[i] / d[i]
                                if g > 10 * eps * lam and g < g_drop:
                                    g_drop, p_drop = g, i
                    g_end = lam - alpha
                    gam = min(g_add, g_drop, g_end)
                    for i in range(cnt):
                        zA[i] += gam * d[i]
                    lam -= gam
                    for t in range(K):
                        rho[t] -= gam * a[t]
                    steps += 1
                    if g_end <= min(g_add, g_drop):
                        break
                    if g_drop < g_add:
                        _lars_drop(p_drop, cnt, M, d, sA, zA, idx, active)
                        cnt -= 1
                        continue
                    if k_stop > 0 and cnt >= k_stop:
                        break
                    if not _lars_add(G, j_add, cnt, M, d, sA, zA, idx, active, rho, b, u,
                                     positive, eps):
                        break
                    cnt += 1
            for t in range(K):
                out[r, t] = 0.0
            for i in range(cnt):
                out[r, idx[i]] += zA[i]
            steps_out[r] = steps
            ok[r] = _kkt_row(G, cov, r, out, zA, idx, cnt, alpha, positive, eps, a)


def _kkt_row(G, cov, r, out, zA, idx, cnt, alpha, positive, eps, corr):  # pragma: no cover
    """The Lasso optimality test of :func:`sparsecode.core.lars._kkt_ok` for row ``r``, on its
    residual correlations recomputed from scratch (``corr`` is scratch space)."""
    K = cov.shape[1]
    for t in range(K):
        corr[t] = cov[r, t]
    for i in range(cnt):
        zi = zA[i]
        row = idx[i]
        for t in range(K):
            corr[t] -= zi * G[row, t]
    top = 0.0
    for t in range(K):
        top = max(top, abs(corr[t]))
    slack = 1e3 * eps * (alpha + top)
    for t in range(K):
        z = out[r, t]
        if z != 0:
            sign = 1.0 if z > 0 else -1.0
            if abs(corr[t] - alpha * sign) > slack:
                return False
        elif (corr[t] if positive else abs(corr[t])) > alpha + slack:
            return False
    return True


if _HAVE_NUMBA:
    _jit = numba.njit(cache=True, nogil=True)
    _kkt_row = _jit(_kkt_row)
    _lars_add = _jit(_lars_add)
    _lars_drop = _jit(_lars_drop)
    _lars_compiled = numba.njit(parallel=True, cache=True, nogil=True)(_lars_rows)


def lars_gram(G: np.ndarray, cov: np.ndarray, alpha: float, cap: int, k_stop: int | None,
              lasso: bool, positive: bool, max_iter: int
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(codes (n, K), steps (n,), kkt_ok (n,))`` of the LARS / Lasso homotopy of each signal to
    ``alpha`` (see :func:`sparsecode.core.lars.lars`): ``G (K, K)`` the Gram matrix, ``cov
    (n, K)`` the correlations; ``cap`` bounds the active set (the rank), ``k_stop`` stops LAR at
    that many atoms; ``kkt_ok`` says whether the Lasso optimality conditions hold (the test of
    :func:`sparsecode.core.lars._kkt_ok`, on correlations recomputed per signal). Computed in
    float64 whatever the input dtype (codes returned in it)."""
    G64 = np.ascontiguousarray(G, dtype=np.float64)
    cov64 = np.ascontiguousarray(cov, dtype=np.float64)
    n, K = cov64.shape
    width = cap if k_stop is None else min(cap, k_stop)
    out = np.zeros((n, K))
    steps = np.zeros(n, dtype=np.int64)
    ok = np.zeros(n, dtype=np.bool_)
    _lars_compiled(G64, cov64, float(alpha), width, cap, 0 if k_stop is None else k_stop,
                   lasso, positive, max_iter, float(np.finfo(cov.dtype).eps), out, steps, ok)
    return out.astype(cov.dtype, copy=False), steps, ok


def _bcd_rows(D, A, B, AD, atoms, n_iter, positive):  # pragma: no cover
    K, n = D.shape
    delta = np.empty(n, dtype=D.dtype)
    for _ in range(n_iter):
        for k in atoms:
            akk = A[k, k]
            sq = 0.0
            for f in range(n):
                v = D[k, f] + (B[k, f] - AD[k, f]) / akk
                if positive and v < 0:
                    v = 0.0
                delta[f] = v
                sq += v * v
            scale = 1.0 / max(np.sqrt(sq), 1.0)
            for f in range(n):
                v = delta[f] * scale
                delta[f] = v - D[k, f]
                D[k, f] = v
            for i in range(K):  # AD += A[:, k] delta^T
                aik = A[i, k]
                if aik != 0:
                    for f in range(n):
                        AD[i, f] += aik * delta[f]


if _HAVE_NUMBA:
    _bcd_compiled = numba.njit(cache=True, nogil=True)(_bcd_rows)


def bcd_pass(D: np.ndarray, A: np.ndarray, B: np.ndarray, AD: np.ndarray, atoms: np.ndarray,
             n_iter: int, positive: bool) -> np.ndarray:
    """``n_iter`` block-coordinate passes over ``atoms`` (in order) of the dictionary step
    ``d_k <- P(d_k + (b_k - a_k D) / A_kk)`` (``P``: unit ball, after clipping at 0 if
    ``positive``), in place on ``D (K, n)``; ``A (K, K)`` symmetric, ``B (K, n)``, ``AD = A @ D``
    (updated in place; the caller computes it, with torch's threads rather than numpy's, whose
    idle-spinning BLAS threads would slow torch down). Returns ``D``.

    >>> import numpy as np
    >>> D, A, B = np.eye(2), np.eye(2), np.array([[0.0, 2.0], [3.0, 0.0]])
    >>> bcd_pass(D, A, B, A @ D, np.arange(2), 1, False)  # d_k <- b_k / A_kk, on the unit ball
    array([[0., 1.],
           [1., 0.]])
    """
    _bcd_compiled(D, A, B, AD, atoms, n_iter, positive)
    return D
