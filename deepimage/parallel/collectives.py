"""Differentiable collectives of hybrid parallelism: gathers whose backward is a reduce-scatter.

Rows of every rank are all-gathered into the global batch; the gradient of the gathered
tensor is summed over the ranks that used it and scattered back to the rank that produced
the rows. Padding makes unequal row counts fit one collective. Every collective records the
bytes a ring sends (:class:`~deepimage.parallel.base.CommStats`) where it is issued.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from deepimage.parallel import dist as pdist
from deepimage.parallel.base import CommStats, ring_bytes

# torch 2.14 renames the single-tensor collectives; older versions have only the old names
all_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_into = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


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
