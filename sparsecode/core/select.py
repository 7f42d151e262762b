"""Top-k selections with one tie rule, shared by the projection operators and the fused encoders.

Tie rule: among equal values the entry with the lowest index is selected first (per row: the
lowest atom; batch-wide: the lowest ``(row, atom)`` in row-major order; per atom over the rows:
the lowest row). bf16 pre-activations have only 8 significant bits, so equal values at the cut
are common; with one rule the dense operators, the fused encoders (Triton or torch) and the
latent-sharded SAE select the same support, and a run repeats exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: extra values taken by the per-row top-k so that ties at the cut resolve without a row scan
_TIE_WINDOW = 8


def _canonical(vals: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    """Sort each row by value descending, equal values by index ascending."""
    idx, o = idx.sort(dim=1)
    vals = vals.gather(1, o)
    vals, o = vals.sort(dim=1, descending=True, stable=True)
    return vals, idx.gather(1, o)


def _full_tie_rows(pre: Tensor, vals: Tensor, idx: Tensor, k: int) -> Tensor:
    """Indices of the top-k of rows whose ties at the k-th value ``t`` go beyond the window:
    the entries above ``t`` plus the lowest-index entries equal to ``t`` (one row scan)."""
    tt = vals[:, k - 1 : k]
    er, ec = (pre == tt).nonzero(as_tuple=True)  # sorted by row, then atom
    gt = vals[:, :k] > tt
    need = k - gt.sum(dim=1)
    counts = torch.bincount(er, minlength=pre.shape[0])
    rank = torch.arange(er.numel(), device=pre.device) - (torch.cumsum(counts, 0) - counts)[er]
    pick = rank < need[er]
    gr, gc = gt.nonzero(as_tuple=True)
    r_all = torch.cat([gr, er[pick]])
    c_all = torch.cat([idx[:, :k][gr, gc], ec[pick]])
    return c_all[r_all.argsort(stable=True)].reshape(-1, k)


def topk_rows(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-``k`` of each row of a 2-D ``pre`` with the tie rule (lowest index first), sorted
    canonically (value descending, equal values by index ascending); ``k <= pre.shape[1]``.

    It takes ``k + 8`` values per row and sorts that window canonically; when the window's last
    value is below the k-th value every tie at the cut is inside the window, so the first ``k``
    are exact. Rows with more ties than that (rare, even in bf16) are resolved by a row scan.

    >>> import torch
    >>> v, i = topk_rows(torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0]]), 2)
    >>> v.tolist(), i.tolist()
    ([[3.0, 3.0]], [[1, 2]])
    """
    n = pre.shape[1]
    w = min(n, k + _TIE_WINDOW)
    top = pre.topk(w, dim=1, sorted=True)
    vals, idx = _canonical(top.values, top.indices)
    if k == 0 or pre.shape[0] == 0:
        return vals[:, :k], idx[:, :k]
    if w < n:
        bad = (top.values[:, w - 1] == top.values[:, k - 1]).nonzero(as_tuple=True)[0]
        if bad.numel():
            idx = idx.clone()
            idx[bad, :k] = _full_tie_rows(pre[bad], vals[bad], idx[bad], k)
            vals = vals.clone()
            vals[bad, :k] = pre[bad].gather(1, idx[bad, :k])
    return vals[:, :k], idx[:, :k]


def merge_topk(values: Tensor, indices: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` largest of each row's candidate ``(value, index)`` pairs under the tie rule
    (lowest index first), sorted canonically: how per-slice top-k results (e.g. of latent
    shards on several processes) combine into the exact top-k of the whole row.

    >>> import torch
    >>> v, i = merge_topk(torch.tensor([[3.0, 1.0, 3.0, 2.0]]), torch.tensor([[7, 0, 2, 5]]), 2)
    >>> v.tolist(), i.tolist()
    ([[3.0, 3.0]], [[2, 7]])
    """
    vals, idx = _canonical(values, indices)
    return vals[:, :k], idx[:, :k]


def top_budget(key: Tensor, budget: int, order: Tensor | None = None) -> Tensor:
    """Positions (unsorted) of the ``budget`` largest entries of a 1-D ``key``; among entries
    equal to the cut value the ones with the smallest ``order`` win (default: the position,
    i.e. the lowest index first). The batch-wide selection of batch top-k.

    >>> import torch
    >>> top_budget(torch.tensor([1.0, 2.0, 2.0, 0.5, 2.0]), 2).sort().values.tolist()
    [1, 2]
    >>> top_budget(torch.tensor([1.0, 2.0, 2.0]), 1, order=torch.tensor([5, 9, 3])).tolist()
    [2]
    """
    n = key.numel()
    budget = max(0, min(int(budget), n))
    if budget == n:
        return torch.arange(n, device=key.device)
    if budget == 0:
        return torch.empty(0, dtype=torch.long, device=key.device)
    t = key.topk(budget, sorted=False).values.min()
    above = (key > t).nonzero().squeeze(1)
    at = (key == t).nonzero().squeeze(1)
    need = budget - above.numel()
    if at.numel() > need:
        at = at[:need] if order is None else at[order[at].topk(need, largest=False).indices]
    return torch.cat([above, at])
