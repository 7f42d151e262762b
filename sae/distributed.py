"""Training past one device with ``torch.distributed``: data parallel and latent-sharded SAEs.

Launch with ``torchrun`` (``torchrun --nproc-per-node 4 -m sae train ...``); every process runs
the same command. The processes form a 2-D :class:`~torch.distributed.device_mesh.DeviceMesh`
``(data, latent)`` of shape ``(world / L, L)`` where ``L`` is ``--latent-shards``:

* along ``data``, each process trains on its own slice of every global batch; gradients are
  averaged by :class:`~torch.nn.parallel.DistributedDataParallel` and the firing statistics
  (dead latents, firing rates, running thresholds) are all-reduced, so every replica holds the
  same SAE after every step;
* along ``latent``, each process holds ``d_sae / L`` latents (encoder columns and decoder rows)
  of a TopK SAE. The top-k is exact: each shard takes its local top-k, the candidates are
  all-gathered, and every shard keeps the global winners that are its own (lowest latent index
  wins ties, as the fused kernel does). The decoded partial sums are all-reduced; AuxK takes
  the same path over the dead latents. Gradients need one all-reduce (``b_dec``'s encoder part).

Checkpoints hold the whole SAE (shards gathered, written by rank 0) in the single-process format,
so a run resumes on any number of processes. Every collective runs under the process group's
timeout (``--dist-timeout``): a rank that dies makes the others fail with an error, never hang,
and :func:`check_consistent` compares the configuration of all ranks before training starts.

See docs/distributed.md for the launch recipes and the memory / throughput model.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from sparsecode.core.kernels import merge_topk, row_pairs, sparse_decode, topk_encode
from sparsecode.core.operators import TopK

from .config import RunConfig
from .models import SAE

#: Default seconds a collective may wait for the other ranks before failing.
DEFAULT_TIMEOUT_S = RunConfig.dist_timeout


@dataclass
class Dist:
    """This process's place in the ``(data, latent)`` mesh."""

    rank: int
    world: int
    data_rank: int
    data_size: int
    latent_rank: int
    latent_size: int
    data_group: Any
    latent_group: Any
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        dist.barrier()


def launched() -> bool:
    """True when this process was started by ``torchrun`` (or another launcher) with >1 ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(
    latent_shards: int = 1,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    device: torch.device | None = None,
) -> Dist:
    """Join the process group started by the launcher and build the ``(data, latent)`` mesh.

    NCCL when CUDA is available (each process takes GPU ``LOCAL_RANK``), gloo otherwise.
    Raises ``ValueError`` if the world size is not a multiple of ``latent_shards``.
    """
    from torch.distributed.device_mesh import init_device_mesh

    if latent_shards < 1:
        raise ValueError(f"latent_shards must be >= 1, got {latent_shards}")
    use_cuda = torch.cuda.is_available() and (device is None or device.type == "cuda")
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    world = dist.get_world_size()
    if world % latent_shards:
        raise ValueError(
            f"{world} processes cannot be split into latent shards of {latent_shards} "
            f"(the world size must be a multiple of --latent-shards)"
        )
    mesh = init_device_mesh(
        device.type, (world // latent_shards, latent_shards), mesh_dim_names=("data", "latent")
    )
    return Dist(
        rank=dist.get_rank(),
        world=world,
        data_rank=mesh.get_local_rank("data"),
        data_size=world // latent_shards,
        latent_rank=mesh.get_local_rank("latent"),
        latent_size=latent_shards,
        data_group=mesh.get_group("data"),
        latent_group=mesh.get_group("latent"),
        device=device,
    )


def shutdown(*, synchronize: bool = True) -> None:
    """Leave the process group (safe to call when none was started).

    ``synchronize`` (a clean exit: training finished, or a stop all ranks agreed on) first meets
    the other ranks at a barrier, so that no rank tears its connections down while another one
    still uses them: a rank that left early was seen to abort in gloo's teardown now and then
    (SIGABRT, "terminate called without an active exception", about 1 run in 100 of the stop
    test under load). After an error pass ``False``: the other ranks may never arrive."""
    if dist.is_initialized():
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


def check_consistent(what: str, obj: dict[str, Any]) -> None:
    """Raise ``ValueError`` on every rank if the ranks' ``obj`` (JSON-like) differ, naming the
    first differing keys and the ranks' values. Call it on every rank with the settings that
    must agree (a rank launched with other arguments would otherwise hang or diverge)."""
    objs: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(objs, obj)
    ref = _flatten(objs[0])
    diffs = []
    for r, o in enumerate(objs[1:], start=1):
        flat = _flatten(o)
        for key in sorted(set(ref) | set(flat)):
            if ref.get(key) != flat.get(key):
                diffs.append(f"{key}: rank 0 has {ref.get(key)!r}, rank {r} has {flat.get(key)!r}")
    if diffs:
        shown = "; ".join(diffs[:5]) + (f" (and {len(diffs) - 5} more)" if len(diffs) > 5 else "")
        raise ValueError(f"the ranks disagree on the {what}: {shown}")


def all_gather_rows(x: Tensor, group: Any = None) -> Tensor:
    """Concatenate (in rank order) tensors whose first dimension may differ across ranks."""
    size = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
    n = dist.get_world_size(group)
    sizes = [torch.zeros_like(size) for _ in range(n)]
    dist.all_gather(sizes, size, group=group)
    top = int(max(s.item() for s in sizes))
    pad = x.new_zeros((top - x.shape[0], *x.shape[1:]))
    parts = [x.new_empty((top, *x.shape[1:])) for _ in range(n)]
    dist.all_gather(parts, torch.cat([x, pad]).contiguous(), group=group)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes, strict=True)])


# ------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------


class RankSlice:
    """This data rank's slice of every global batch of ``source``.

    ``source`` yields global batches of ``B`` rows (its ``batch_size``); rank ``r`` of ``n``
    gets rows ``[r B / n, (r + 1) B / n)``. The stream position is the source's, identical on
    all ranks, which is what makes a checkpoint resumable with another number of ranks.

    >>> import torch
    >>> from sae.data import ArrayActivations
    >>> src = ArrayActivations(torch.arange(16.0).reshape(8, 2), batch_size=4, shuffle=False,
    ...                        epochs=1)
    >>> [b["activations"][:, 0].tolist() for b in RankSlice(src, rank=1, size=2)]
    [[4.0, 6.0], [12.0, 14.0]]
    """

    def __init__(self, source: Any, rank: int, size: int):
        b = int(source.batch_size)
        if b % size:
            raise ValueError(
                f"the global batch size {b} is not divisible by the {size} data-parallel ranks"
            )
        self.source, self.rank, self.size = source, rank, size
        self.batch_size = b // size
        self.hookpoints = source.hookpoints

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        a, b = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        for batch in self.source:
            yield {hp: t[a:b] for hp, t in batch.items()}

    def state_dict(self) -> dict:
        return self.source.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.source.load_state_dict(state)


# ------------------------------------------------------------------------------------------
# latent sharding
# ------------------------------------------------------------------------------------------


class _CopyToGroup(torch.autograd.Function):
    """Identity forward; all-reduce (sum) of the gradient: a replicated tensor used by every
    shard's own computation (``b_dec`` in the encoder)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


class _ReduceFromGroup(torch.autograd.Function):
    """All-reduce (sum) forward; identity backward: partial sums over the shards feeding a loss
    that every shard computes identically (the decoded reconstruction)."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, g):
        return g, None


def _global_topk(
    values: Tensor, indices: Tensor, k: int, group: Any
) -> tuple[Tensor, Tensor]:
    """The k largest of all shards' candidates ``(N, c)`` per row (gathered, then the core's
    :func:`~sparsecode.core.kernels.merge_topk`: the lowest index wins ties). Returns ``(N, k)``
    values and global indices."""
    n = dist.get_world_size(group)
    vs = [torch.empty_like(values) for _ in range(n)]
    ix = [torch.empty_like(indices) for _ in range(n)]
    dist.all_gather(vs, values.contiguous(), group=group)
    dist.all_gather(ix, indices.contiguous(), group=group)
    return merge_topk(torch.cat(vs, dim=1), torch.cat(ix, dim=1), k)


#: Dimension along which each latent-indexed parameter / buffer is split.
SHARD_DIMS = {"W_enc": 1, "W_dec": 0, "b_enc": 0, "threshold": 0, "tokens_since_fired": 0,
              "fire_rate": 0}


class LatentShards:
    """The collective of a latent-sharded SAE (the one-process version is
    :class:`sae.models.OneProcess`): this process holds latents ``[offset, offset + d_sae / L)``
    of ``L`` shards in ``group``.

    Training gives the same losses and (sharded) gradients as the unsharded SAE on the same
    batch: the top-k is the shards' local top-k merged exactly (lowest latent index wins ties),
    decoded partial sums are all-reduced, and ``b_dec``'s encoder gradient is summed over the
    shards. Inference and saving go through :meth:`gather` (all shards must call it).
    """

    local = False

    def __init__(self, group: Any, d_sae: int, device: torch.device):
        n = dist.get_world_size(group)
        if d_sae % n:
            raise ValueError(f"d_sae={d_sae} is not divisible by {n} latent shards")
        self.group = group
        self.device = device
        self.n_shards = n
        self.d_local = d_sae // n
        self.offset = dist.get_rank(group) * self.d_local

    def shard(self, sae: SAE) -> SAE:
        """This process's part of ``sae`` (a new SAE holding its latents, built on the meta
        device and given the slices, so no throwaway initialisation is computed)."""
        if type(sae.activation) is not TopK or sae.arch.prefixes:
            raise ValueError(
                f"latent sharding supports the topk architecture, not {sae.architecture!r} "
                "(train it data-parallel only)"
            )
        with torch.device("meta"):
            part = SAE(sae.cfg, n_latents=self.d_local)
        part.load_state_dict(
            {k: self.part(k, v.detach()).clone() for k, v in sae.state_dict().items()},
            assign=True)
        part.collective = self
        return part

    # ------------------------------------------------------------------ whole <-> shard
    def whole(self, name: str, t: Tensor) -> Tensor:
        dim = SHARD_DIMS.get(name)
        if dim is None:
            return t
        parts = [torch.empty_like(t) for _ in range(self.n_shards)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)

    def part(self, name: str, t: Tensor) -> Tensor:
        dim = SHARD_DIMS.get(name)
        if dim is None:
            return t
        return t.narrow(dim, self.offset, self.d_local)

    def gather(self, sae: SAE) -> SAE:
        """The whole SAE (a new module, on every shard, from the gathered tensors)."""
        with torch.device("meta"):
            full = SAE(sae.cfg)
        full.load_state_dict({k: self.whole(k, v.detach()) for k, v in sae.state_dict().items()},
                             assign=True)
        return full

    # ------------------------------------------------------------------ training
    def share(self, t: Tensor) -> Tensor:
        return _CopyToGroup.apply(t, self.group)

    def total(self, n: int) -> int:
        count = torch.tensor([n], device=self.device)
        dist.all_reduce(count, group=self.group)
        return int(count)

    def decode(self, vals, rows, cols, W_dec, n_rows, groups=None) -> Tensor:
        partial = sparse_decode(vals, rows, cols, W_dec, n_rows, groups=groups)
        return _ReduceFromGroup.apply(partial, self.group)

    def encode(self, op, x, W_rows, b_enc, b_dec, matmul_dtype):
        """The exact global top-k: local candidates (values carry the sparse backward, through
        the shared ``b_dec``), the winners that are this shard's."""
        return self._topk(x, W_rows, b_enc, self.share(b_dec), op.k, matmul_dtype)

    def topk(self, x, W_rows, b_enc, b_dec, k, matmul_dtype, latents=None):
        with torch.no_grad():
            return self._topk(x, W_rows, b_enc, b_dec, k, matmul_dtype, latents)

    def _topk(self, x, W_rows, b_enc, b_dec, k, matmul_dtype, latents=None):
        """Local top-k of the rows of ``W_rows`` (``latents``: this shard's latent of each
        row), gathered, global winners kept: ``(rows, row indices, values)`` of this shard's
        winning pairs, grouped by row."""
        N, n = x.shape[0], W_rows.shape[0]
        if n:
            v, idx = topk_encode(x, W_rows, b_enc, b_dec, min(k, n), matmul_dtype=matmul_dtype)
        else:  # no candidates here: take part in the gather with none
            v = x.new_empty((N, 0))
            idx = torch.empty((N, 0), dtype=torch.long, device=x.device)
        ids = (idx if latents is None else latents[idx]) + self.offset
        cand_v, cand_i = v.detach().float(), ids
        if v.shape[1] < k:  # fewer local candidates than k
            fill = k - v.shape[1]
            cand_v = torch.cat([cand_v, cand_v.new_full((N, fill), -torch.inf)], dim=1)
            cand_i = torch.cat([cand_i, cand_i.new_full((N, fill), -1)], dim=1)
        with torch.no_grad():
            win_v, win_i = _global_topk(cand_v, cand_i, k, self.group)
            win_i = torch.where(win_v > 0, win_i, torch.full_like(win_i, -1))
            mine = (ids.unsqueeze(2) == win_i.unsqueeze(1)).any(dim=2) & (v.detach() > 0)
        return row_pairs(v, idx, keep=mine)

    def clip_grad_norm_(self, sae: SAE, max_norm: float) -> Tensor:
        """Clip by the norm of the whole SAE's gradient (shards' squares summed, the replicated
        ``b_dec`` and ``W_skip`` counted once)."""
        sharded = [p.grad for n, p in sae.named_parameters() if n in SHARD_DIMS
                   and p.grad is not None]
        sq = torch.stack([g.float().pow(2).sum() for g in sharded]).sum().reshape(1)
        dist.all_reduce(sq, group=self.group)
        for n, p in sae.named_parameters():
            if n not in SHARD_DIMS and p.grad is not None:
                sq = sq + p.grad.float().pow(2).sum()
        norm = sq.sqrt()[0]
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for p in sae.parameters():
            if p.grad is not None:
                p.grad.mul_(coef.to(p.grad.dtype))
        return norm


class _TrainingStep(nn.Module):
    """``forward`` = the SAE's ``training_forward`` (what DDP wraps)."""

    def __init__(self, sae: SAE):
        super().__init__()
        self.sae = sae

    def forward(self, x: Tensor, y: Tensor | None = None, **kwargs: Any):
        return self.sae.training_forward(x, y, **kwargs)


def data_parallel(sae: SAE, d: Dist) -> nn.Module:
    """Wrap ``sae`` for data-parallel training: DDP over the data group (gradients averaged
    during the backward; parameters broadcast from the group's first rank now), firing
    statistics reduced over the same group. Call the result like ``sae.training_forward``."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    sae.stats_group = d.data_group
    return DDP(
        _TrainingStep(sae),
        process_group=d.data_group,
        forward_sync_buffers=False,
        device_ids=[d.device.index] if d.device.type == "cuda" else None,
    )
