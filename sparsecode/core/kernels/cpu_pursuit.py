"""Compiled CPU loops for the greedy pursuits (numba), parallel over signals.

On a CPU the batched torch OMP of :mod:`sparsecode.core.pursuit` is bound by memory traffic and
per-op overhead on ``(rows x atoms)`` arrays; SPAMS (C++, OpenMP) codes one signal at a time
with its working set in cache. :func:`omp_gram` runs the very steps of
:func:`sparsecode.core.pursuit._omp_chunk` for one signal at a time, in compiled code, signals
spread over the CPU threads (``numba.prange``): select the atom (largest ``|alpha|``, or ORMP's
largest ``alpha^2 / ||d^perp||^2``), extend the Gram-Schmidt basis ``u_n = (G[j] - sum_i
L[n, i] u_i) / L[n, n]``, update the residual correlations, stop on ``k`` atoms, the tolerance or
linear dependence, then solve ``L^T z = c``. Used when numba imports and the problem is on the
CPU; ``SPARSECODE_DISABLE_NUMBA=1`` forces the torch path (both are tested for the same codes).
"""

from __future__ import annotations

import os

import numpy as np

__all__ = ["numba_available", "omp_gram"]

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
                    for t in range(K):
                        w = G[j, t]
                        for i in range(step):
                            w -= L[step, i] * U[i, t]
                        w /= lnn
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
