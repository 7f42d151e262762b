"""Which token positions a dictionary trains and is evaluated on: the massive-activation filter.

Some language models write a few positions of enormous norm into the residual stream (attention
sinks: position 0, and about 0.02% of the others in SmolLM2-135M at ~70x the median norm). They
carry most of the variance, so left in they decide both the training signal and the FVU.
:class:`MassiveFilter` is the one definition used by every activation source, the spliced
evaluation (:mod:`sae.metrics`) and the feature browser (docs/metrics.md):

* position 0 of every context is dropped (``drop_bos``; the BOS token that
  :func:`sparsecode.text.pack_tokens` puts there, an attention sink either way);
* a position is dropped when its activation norm exceeds ``factor`` times the *reference median*
  norm at any hook point; the medians are fitted once, on the first rows the filter sees, and
  are part of its state (so a resumed run filters exactly as the original one).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

#: Default factor: positions whose norm exceeds this many times the median norm are dropped
#: (SmolLM2's rare attention-sink positions reach ~70x the median).
MASSIVE_FACTOR = 10.0


def massive_mask(
    x: Tensor, factor: float = MASSIVE_FACTOR, median: float | Tensor | None = None
) -> Tensor:
    """The keep mask of :func:`drop_massive`: ``norm(row) <= factor * median`` per row.

    >>> x = torch.ones(3, 2); x[0] *= 50
    >>> massive_mask(x).tolist()
    [False, True, True]
    """
    if not factor > 0:
        raise ValueError(f"factor must be > 0, got {factor}")
    norms = x.float().norm(dim=-1)
    ref = norms.median() if median is None else torch.as_tensor(median, dtype=norms.dtype)
    return norms <= factor * ref.to(norms.device)


def drop_massive(
    x: Tensor, factor: float = MASSIVE_FACTOR, median: float | Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Rows of ``x`` whose L2 norm is at most ``factor`` times the median row norm.

    ``median`` fixes the reference norm (e.g. measured once on a first batch) so that filtering
    does not depend on batch composition; by default it is the median of ``x``'s own row norms.
    Returns ``(kept_rows, keep_mask)``.

    >>> x = torch.ones(5, 4); x[2] *= 1000
    >>> kept, mask = drop_massive(x)
    >>> kept.shape, mask.tolist()
    (torch.Size([4, 4]), [True, True, False, True, True])
    """
    mask = massive_mask(x, factor, median)
    return x[mask], mask


class MassiveFilter:
    """Drops massive-norm positions (relative to medians fitted on the first rows seen) and,
    for ``(contexts, positions, d)`` activations, position 0 (see the module docstring).
    ``factor=None`` keeps every position but BOS.

    >>> f = MassiveFilter(10.0)
    >>> x = torch.ones(6, 2); x[4] *= 100
    >>> f.keep({"h": x}).tolist(), f.medians
    ([True, True, True, True, False, True], {'h': 1.4142135381698608})
    >>> acts = torch.ones(2, 3, 2); acts[1, 2] *= 100
    >>> f.keep_positions({"h": acts}).tolist()  # BOS, and one massive position, dropped
    [[False, True, True], [False, True, False]]
    """

    def __init__(self, factor: float | None = MASSIVE_FACTOR, *, drop_bos: bool = True):
        if factor is not None and not factor > 0:
            raise ValueError(f"massive_factor must be > 0 (or None), got {factor}")
        self.factor = None if factor is None else float(factor)
        self.drop_bos = bool(drop_bos)
        #: Reference median row norm per hook point (None until fitted).
        self.medians: dict[str, float] | None = None

    def fit(self, rows: Mapping[str, Tensor]) -> None:
        """Fit the reference medians on ``rows`` (2-D per hook point) unless already fitted."""
        if self.factor is None or self.medians is not None:
            return
        medians = {hp: float(t.float().norm(dim=-1).median()) for hp, t in rows.items()}
        zero = [hp for hp, m in medians.items() if m == 0]
        if zero:
            n = next(iter(rows.values())).shape[0]
            raise ValueError(
                f"the median row norm of the first {n} rows is 0 at {zero}: massive_factor "
                "cannot filter relative to it"
            )
        self.medians = medians

    def keep(self, rows: Mapping[str, Tensor]) -> Tensor | None:
        """Rows (aligned across hook points) below the cut at every hook point, as a bool mask;
        None without a factor. Fits the medians first if needed."""
        if self.factor is None:
            return None
        self.fit(rows)
        assert self.medians is not None
        mask = None
        for hp, t in rows.items():
            m = massive_mask(t, self.factor, self.medians[hp])
            mask = m if mask is None else mask & m.to(mask.device)
        return mask

    def keep_positions(self, acts: Mapping[str, Tensor]) -> Tensor:
        """``(contexts, positions)`` mask of ``(contexts, positions, d)`` activations: BOS and
        massive positions dropped (medians fitted on the non-BOS positions if needed)."""
        first = next(iter(acts.values()))
        keep = torch.ones(first.shape[:-1], dtype=torch.bool, device=first.device)
        if self.drop_bos:
            keep[:, 0] = False
        if self.factor is not None:
            flat = keep.reshape(-1)
            rows = {hp: a.reshape(-1, a.shape[-1]) for hp, a in acts.items()}
            self.fit({hp: r[flat] for hp, r in rows.items()})
            keep &= self.keep(rows).view(keep.shape)
        return keep

    def state_dict(self) -> dict:
        return {"factor": self.factor, "medians": self.medians}

    def load_state_dict(self, state: dict) -> None:
        if state.get("factor") != self.factor:
            raise ValueError(f"the state's massive factor {state.get('factor')!r} is not this "
                             f"filter's {self.factor!r}")
        med = state.get("medians")
        self.medians = None if med is None else {hp: float(m) for hp, m in med.items()}
