"""Differentiable collectives of hybrid parallelism: gathers whose backward is a reduce-scatter.

Rows of every rank are all-gathered into the global batch; the gradient of the gathered
tensor is summed over the ranks that used it and scattered back to the rank that produced
the rows. Padding makes unequal row counts fit one collective. Every collective records the
bytes a ring sends (:class:`~deepimage.parallel.base.CommStats`) where it is issued.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from deepimage.parallel import dist as pdist
from deepimage.parallel.base import CommStats, ring_bytes

# torch 2.14 renames the single-tensor collectives; older versions have only the old names
all_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_into = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class DirectWork:
    """The handle of a collective built from point-to-point transfers: :meth:`wait`
    completes every transfer, then the local step that finishes the collective."""

    def __init__(self, works: list[Any], finish: Callable[[], None] | None = None) -> None:
        self.works, self.finish = works, finish

    def wait(self, timeout: Any = None) -> bool:
        for work in self.works:
            work.wait()
        self.works = []
        if self.finish is not None:
            finish, self.finish = self.finish, None
            finish()
        return True


def direct_reduce_scatter(
    out: torch.Tensor,
    flat: torch.Tensor,
    rank: int,
    world: int,
    tag: int,
    received: torch.Tensor | None = None,
) -> DirectWork:
    """The paper's butterfly reduction, asynchronously: part ``j`` of ``flat`` goes to rank
    ``j``, and rank ``rank`` sums the N parts ``rank`` it receives into ``out``.

    Every rank sends ``(N-1)/N`` of ``flat``, as a ring reduce-scatter does, in independent
    transfers; on gloo (CPU) faster than its ``reduce_scatter_tensor``
    (``benchmarks/collectives.py``). The sum runs in rank order, so it is the same on every
    rank and every run. ``received`` is an ``(N-1, part)`` buffer to receive into (a caller
    that exchanges every step keeps one: fresh memory costs a page fault per 4 KiB). ``flat``
    must stay unchanged until :meth:`DirectWork.wait`."""
    part = out.numel()
    chunks = flat.view(world, part)
    if received is None:
        received = torch.empty((world - 1, part), dtype=flat.dtype, device=flat.device)
    works, parts = [], []
    for peer in range(world):
        if peer == rank:
            parts.append(chunks[rank])
            continue
        slot = received[peer if peer < rank else peer - 1]  # no slot for this rank
        works.append(dist.isend(chunks[peer], peer, tag=tag))
        works.append(dist.irecv(slot, peer, tag=tag))
        parts.append(slot)

    def finish() -> None:
        out.copy_(parts[0])
        for r in range(1, world):
            out.add_(parts[r])

    return DirectWork(works, finish)


def direct_all_gather(
    flat: torch.Tensor, mine: torch.Tensor, rank: int, world: int, tag: int
) -> DirectWork:
    """Every rank's ``mine`` into its slot of ``flat`` (``world`` equal parts), by sending
    ``mine`` to every other rank and receiving each of theirs in place: the broadcast back
    of the paper's butterfly, ``(N-1)/N`` of ``flat`` sent per rank."""
    slots = flat.view(world, mine.numel())
    if mine.data_ptr() != slots[rank].data_ptr():
        slots[rank].copy_(mine.reshape(-1))
    works = []
    for peer in range(world):
        if peer != rank:
            works.append(dist.isend(slots[rank], peer, tag=tag))
            works.append(dist.irecv(slots[peer], peer, tag=tag))
    return DirectWork(works)


def gather_rows_raw(x: torch.Tensor, counts: Sequence[int], op: str) -> torch.Tensor:
    """Concatenate every rank's ``x`` (``counts[r]`` rows on rank r) along dimension 0."""
    world, m = len(counts), max(counts)
    device = pdist.comm_device()
    if x.shape[0] == m and x.device == device:  # no padding needed (training batches)
        padded = x.contiguous()
    else:
        padded = torch.zeros((m, *x.shape[1:]), dtype=x.dtype, device=device)
        padded[: x.shape[0]] = x
    out = torch.empty((world * m, *x.shape[1:]), dtype=x.dtype, device=device)
    with pdist.guard(op):
        all_gather_into(out, padded)
    if min(counts) < m:
        out = torch.cat([out[r * m : r * m + c] for r, c in enumerate(counts)])
    return out.to(x.device)


def reduce_scatter_rows_raw(
    g: torch.Tensor, counts: Sequence[int], rank: int, op: str
) -> torch.Tensor:
    """Sum ``g`` (all ranks' rows) over ranks; return this rank's ``counts[rank]`` rows."""
    world, m = len(counts), max(counts)
    device = pdist.comm_device()
    if min(counts) == m and g.device == device:
        padded = g.contiguous()
    else:
        padded = torch.zeros((world * m, *g.shape[1:]), dtype=g.dtype, device=device)
        lo = 0
        for r, c in enumerate(counts):
            padded[r * m : r * m + c] = g[lo : lo + c]
            lo += c
    out = torch.empty((m, *g.shape[1:]), dtype=g.dtype, device=device)
    with pdist.guard(op):
        reduce_scatter_into(out, padded)
    return out[: counts[rank]].to(g.device)


class _GatherRows(torch.autograd.Function):
    """All-gather along rows; backward: reduce-scatter of the gradient back to its owners."""

    @staticmethod
    def forward(ctx, x, counts, rank, stats):  # type: ignore[override]
        ctx.counts, ctx.rank, ctx.stats = counts, rank, stats
        world, m = len(counts), max(counts)
        row = _row_bytes(x)
        stats.record("all_gather", ring_bytes("all_gather", world * m * row, world))
        with stats.blocking():
            return gather_rows_raw(x, counts, "all_gather(hybrid activations)")

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        counts, world = ctx.counts, len(ctx.counts)
        row = _row_bytes(g)
        ctx.stats.record("reduce_scatter", ring_bytes("rs", world * max(counts) * row, world))
        with ctx.stats.blocking():
            out = reduce_scatter_rows_raw(
                g.contiguous(), counts, ctx.rank, "reduce_scatter(hybrid gradients)"
            )
        return out, None, None, None


def _row_bytes(x: torch.Tensor) -> int:
    n = 1
    for s in x.shape[1:]:
        n *= s
    return n * x.element_size()


def gather_rows(
    x: torch.Tensor, counts: Sequence[int], rank: int, stats: CommStats
) -> torch.Tensor:
    """Every rank's rows of ``x`` (the global batch), differentiably; identity on one rank."""
    if len(counts) == 1:
        return x
    return _GatherRows.apply(x.contiguous(), list(counts), rank, stats)


def gather_columns(
    x: torch.Tensor, widths: Sequence[int], rank: int, stats: CommStats
) -> torch.Tensor:
    """Concatenate every rank's column slice of ``x`` ([B, widths[r]]) into [B, sum(widths)]."""
    if len(widths) == 1:
        return x
    return gather_rows(x.t(), widths, rank, stats).t()


class RowShards:
    """A tensor cut by rows over the ranks (rank r holds ``widths[r]`` rows), to be written by
    rank 0 one rank's rows at a time (:func:`deepimage.runs.save_state` streams it).

    No rank ever holds the whole tensor: :meth:`chunks` yields, on rank 0, rank 0's rows and
    then each other rank's rows received point to point into a buffer of that rank's size; on
    the other ranks it yields nothing and sends this rank's rows when their turn comes. Every
    rank must iterate it, in the same order as the other tensors sharded this way.
    """

    def __init__(self, local: torch.Tensor, widths: Sequence[int], rank: int) -> None:
        self.local, self.widths, self.rank = local.detach(), list(widths), rank
        self.shape = torch.Size([sum(self.widths), *local.shape[1:]])
        self.dtype = local.dtype

    def chunks(self):
        """The rows of every rank in order (on rank 0); collective."""
        if len(self.widths) == 1:
            yield self.local
            return
        device = pdist.comm_device()
        for src, rows in enumerate(self.widths):
            if rows == 0:
                continue
            if src == 0:
                if self.rank == 0:
                    yield self.local
            elif self.rank == 0:
                buf = torch.empty((rows, *self.shape[1:]), dtype=self.dtype, device=device)
                with pdist.guard(f"recv(hybrid rows of rank {src})"):
                    dist.recv(buf, src=src)
                yield buf
            elif self.rank == src:
                with pdist.guard("send(hybrid rows to rank 0)"):
                    dist.send(self.local.to(device).contiguous(), dst=0)
