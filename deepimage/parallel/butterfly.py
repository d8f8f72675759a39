"""Butterfly synchronization (paper 3.1, Figure 1): reduce-scatter, sharded update, all-gather.

The trainable parameters are grouped, in layer order, into buckets of about ``bucket_mb``;
each bucket's flattened gradient is split into N equal parts (zero-padded to a multiple of
N) and rank k owns part k (:attr:`Butterfly.ownership`). After backward:

1. ``reduce_scatter_tensor`` leaves on rank k the sum over ranks of part k;
2. rank k divides by N (the mean over the global batch) and applies the SGD update to its
   part only, so the momentum buffers are sharded N ways (:attr:`Butterfly.momentum`);
3. ``all_gather_into_tensor`` sends every rank the updated parameters of every part.

Each rank sends ``(N-1)/N`` of the gradient in step 1 and ``(N-1)/N`` of the parameters in
step 3: ``2 (N-1)/N`` x gradient bytes per step, a constant as N grows (the paper's
"communication overhead independent of the number of GPUs").

Step 1 overlaps backward, as DDP's buckets do: a post-accumulate-grad hook on every
parameter counts the bucket's finished gradients, and once a bucket is complete (on the last
micro-batch of a step) its reduce-scatter starts while backward goes on with earlier layers.
Buckets are launched in one fixed order on every rank (last bucket first, the order backward
reaches them) so that the collectives pair up; a bucket completed out of turn waits for
the ones before it. :meth:`Butterfly.step` launches what backward did not (parameters
without a gradient), then updates each bucket as its reduction lands, while later buckets
are still being reduced, and starts the all-gather of the updated parts.

Step 3 overlaps the next forward pass: nothing waits for the all-gathers in ``step()``; a
forward pre-hook on each layer waits for its bucket's gather and copies the updated weights
in just before the layer runs, so the last layers' gathers hide behind the first layers'
forward. :meth:`Butterfly.flush` completes them all (before evaluation and checkpoints).

On NCCL steps 1 and 3 are NCCL's own ``reduce_scatter`` and ``all_gather``. On gloo they are
the paper's direct form, point to point (:func:`~deepimage.parallel.collectives.
direct_reduce_scatter`): rank k receives part k from every rank and sends its reduced part
back to every rank, the same ``(N-1)/N`` bytes each way; gloo's own reduce-scatter and
all-gather took 1.7x and 2.4x as long for VGG-16's gradient (``benchmarks/collectives.py``).

Between the CPU processes of one machine the three steps run through shared memory instead
(:class:`~deepimage.parallel.shm.ShmExchange`): each rank writes a bucket's gradient into
its slot in backward; rank k, as soon as every rank has posted the bucket (in backward, in
``step()``, or at the latest in the next forward), sums part k in rank order, applies the
SGD update to its part and writes the updated weights of part k into the shared result,
which every rank copies its weights from before the layer's next forward (the broadcast
back is a read). Nothing goes on a wire.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from deepimage.parallel import dist as pdist
from deepimage.parallel.base import SyncStrategy, ring_bytes, sgd_update_many_
from deepimage.parallel.collectives import (
    all_gather_into,
    direct_all_gather,
    direct_reduce_scatter,
    reduce_scatter_into,
)
from deepimage.parallel.shm import ShmExchange


@dataclass
class Bucket:
    """A run of consecutive parameters flattened together; ``part`` elements per rank."""

    index: int
    params: list[int]  # indices into the strategy's parameter list
    offsets: list[int]  # start of each parameter in the flat bucket
    numel: int  # real elements
    padded: int  # numel rounded up to a multiple of the world size
    part: int  # padded // world

    def owned(self, rank: int) -> tuple[int, int]:
        """[start, stop) of the flat bucket owned (reduced and updated) by ``rank``."""
        return rank * self.part, (rank + 1) * self.part


def make_buckets(sizes: list[int], bucket_elems: int, world: int) -> list[Bucket]:
    """Group consecutive parameters (of ``sizes`` elements) into buckets of about
    ``bucket_elems`` elements; a parameter larger than that gets a bucket of its own."""
    buckets: list[Bucket] = []
    current: list[int] = []
    total = 0

    def close() -> None:
        nonlocal current, total
        if not current:
            return
        offsets, o = [], 0
        for i in current:
            offsets.append(o)
            o += sizes[i]
        padded = -(-total // world) * world
        buckets.append(Bucket(len(buckets), current, offsets, total, padded, padded // world))
        current, total = [], 0

    for i, n in enumerate(sizes):
        if current and total + n > bucket_elems:
            close()
        current.append(i)
        total += n
    close()
    return buckets


class Butterfly(SyncStrategy):
    """Reduce-scatter / sharded SGD / all-gather over layer-ordered buckets."""

    name = "butterfly"

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        bucket_mb: float = 25.0,
        shared_memory: bool | None = None,
    ) -> None:
        """``shared_memory``: None uses it where every rank can (one host, CPU), False never
        (torch.distributed's collectives), True requires it. Collective: every rank must
        build the strategy."""
        super().__init__(model, optimizer)
        sizes = [p.numel() for p in self.params]
        self.buckets = make_buckets(sizes, max(1, int(bucket_mb * 2**20 / 4)), self.world)
        padded = [b.padded for b in self.buckets]
        self.shm = ShmExchange.for_strategy(padded, shared_memory, "butterfly")
        self.momentum: list[torch.Tensor | None] = [None] * len(self.buckets)
        self.device = pdist.comm_device()
        self._buffers: dict[tuple[str, int], torch.Tensor] = {}
        self.direct = self.device.type == "cpu"  # gloo: point-to-point (see the docstring)
        self._bucket_of = {i: b.index for b in self.buckets for i in b.params}
        self._ready = [0] * len(self.buckets)  # gradients accumulated this step, per bucket
        self._inflight: list[tuple[torch.Tensor, torch.Tensor, Any] | None] = [None] * len(
            self.buckets
        )
        self._next = len(self.buckets) - 1  # the next bucket to launch, counting down
        self._sync = True
        self._handles = [
            p.register_post_accumulate_grad_hook(lambda _p, i=i: self._on_grad(i))
            for i, p in enumerate(self.params)
        ]
        self._gathers: list[tuple[torch.Tensor, torch.Tensor, Any] | None] = [None] * len(
            self.buckets
        )  # (gathered flat, sent part, work) while an all-gather is in flight
        index = {id(p): i for i, p in enumerate(self.params)}
        for module in model.modules():
            own = {
                self._bucket_of[index[id(p)]]
                for p in module.parameters(recurse=False)
                if id(p) in index
            }
            if own:
                buckets = sorted(own)
                self._handles.append(
                    module.register_forward_pre_hook(
                        lambda _m, _args, buckets=buckets: self._settle(buckets)
                    )
                )

    @property
    def ownership(self) -> list[dict[str, Any]]:
        """Who owns what: per bucket, its parameters and the [start, stop) of every rank."""
        return [
            {
                "bucket": b.index,
                "params": [self.names[i] for i in b.params],
                "numel": b.numel,
                "padded": b.padded,
                "parts": {r: b.owned(r) for r in range(self.world)},
            }
            for b in self.buckets
        ]

    @property
    def gradient_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.params)

    def _buffer(self, kind: str, bucket: Bucket, *shape: int) -> torch.Tensor:
        """The bucket's persistent ``kind`` buffer: every step writes the same memory (a
        fresh 100 MB buffer costs ~60 ms of page faults on CPU, as much as the exchange).
        Each is free again before its next use: the gradient and reduced part once ``step``
        has waited for the reduction, the parameters once the gather has been settled."""
        key = (kind, bucket.index)
        buf = self._buffers.get(key)
        if buf is None:
            buf = torch.zeros(shape, dtype=torch.float32, device=self.device)
            self._buffers[key] = buf
        return buf

    def _flat(
        self,
        bucket: Bucket,
        grads: bool,
        span: tuple[int, int] | None = None,
        into: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The bucket's gradients (or parameters) flattened into its persistent buffer (or
        ``into``); with ``span`` only the elements in ``[start, stop)`` are written (the rest
        is stale)."""
        flat = (
            into
            if into is not None
            else self._buffer("grad" if grads else "param", bucket, bucket.padded)
        )
        lo, hi = span or (0, bucket.padded)
        flat[max(lo, bucket.numel) : hi].zero_()  # padding
        for i, off in zip(bucket.params, bucket.offsets):
            p = self.params[i]
            a, z = max(lo, off), min(hi, off + p.numel())
            if a >= z:
                continue
            src = p.grad if grads else p.detach()
            if src is None:  # a parameter without gradient this step contributes zeros
                flat[a:z].zero_()
            else:
                flat[a:z].copy_(src.reshape(-1)[a - off : z - off])
        return flat

    @contextlib.contextmanager
    def micro_step(self, last: bool) -> Iterator[None]:
        """Launch reductions from backward only on the last micro-batch of a step."""
        self._sync = last
        try:
            yield
        finally:
            self._sync = True

    # backward: launch each bucket's reduce-scatter as soon as its gradients are complete ----

    def _on_grad(self, i: int) -> None:
        if not self._sync:
            return
        b = self._bucket_of[i]
        self._ready[b] += 1
        if self._ready[b] == len(self.buckets[b].params):
            start = time.perf_counter()
            self._launch_ready()
            self.stats.blocking_s += time.perf_counter() - start

    def _launch_ready(self, everything: bool = False) -> None:
        """Launch, in the fixed order, every bucket whose turn has come (all with
        ``everything``: the end of backward, where unused parameters count as zero)."""
        while self._next >= 0:
            b = self.buckets[self._next]
            if not everything and self._ready[b.index] < len(b.params):
                return
            self._launch(b)
            self._next -= 1

    @torch.no_grad()
    def _launch(self, b: Bucket) -> None:
        if self.shm is not None:
            self._launch_shared(b)
            return
        n = self.world
        grad = self._flat(b, grads=True)
        out = self._buffer("reduced", b, b.part)
        work = None
        if n > 1:
            self.stats.record("reduce_scatter", ring_bytes("rs", grad.numel() * 4, n))
            with pdist.guard("reduce_scatter"):
                if self.direct:
                    received = self._buffer("received", b, n - 1, b.part)
                    tag = 2 * b.index
                    work = direct_reduce_scatter(out, grad, self.rank, n, tag, received)
                else:
                    work = reduce_scatter_into(out, grad, async_op=True)
        else:
            out.copy_(grad)
        self._inflight[b.index] = (grad, out, work)

    def _launch_shared(self, b: Bucket) -> None:
        """Post the bucket's gradient; this rank's part is reduced and updated by
        :meth:`_update_part` whenever every rank has posted (see the module docstring)."""
        self._settle([b.index])  # a layer that skipped its forward: last update first
        slot = self.shm.slot(b.index)
        self._flat(b, grads=True, into=slot)
        hyper = self.hyper  # this step's learning rate, whenever the update runs
        self.shm.post(b.index, lambda part, b=b, hyper=hyper: self._update_part(b, part, hyper))
        self.shm.progress()
        self._inflight[b.index] = (slot, slot, None)
        self._gathers[b.index] = (slot, slot, None)  # settled from the shared result

    def _update_part(self, b: Bucket, part: torch.Tensor, hyper: dict[str, float]) -> None:
        """``part`` holds the mean gradient of this rank's part: apply SGD to the part's
        weights and leave them in ``part`` for every rank to copy."""
        start, stop = b.owned(self.rank)
        flat = self._flat(b, grads=False, span=(start, stop))
        mine = flat[start:stop]
        self.momentum[b.index] = sgd_update_many_(
            [mine], [part], [self.momentum[b.index]], **hyper
        )[0]
        part.copy_(mine)

    @property
    def launched(self) -> int:
        """Buckets whose reduce-scatter has started this step."""
        return sum(entry is not None for entry in self._inflight)

    @torch.no_grad()
    def step(self) -> None:
        hyper = self.hyper
        n = self.world
        if self.shm is not None:
            with self.stats.blocking():
                self._launch_ready(everything=True)  # what backward left (unused parameters)
                self.shm.progress()  # the parts whose gradients are all in: update them now
                self._inflight = [None] * len(self.buckets)
                self._ready = [0] * len(self.buckets)
                self._next = len(self.buckets) - 1
            return
        with self.stats.blocking():
            self._launch_ready(everything=True)  # what backward left (unused parameters)
            inflight, self._inflight = self._inflight, [None] * len(self.buckets)
            self._ready = [0] * len(self.buckets)
            self._next = len(self.buckets) - 1
            for b in reversed(self.buckets):  # in launch order, updating as they land
                _, out, work = inflight[b.index]
                self._settle([b.index])  # a layer that skipped its forward: last update first
                pdist.wait(work, "reduce_scatter")
                if n > 1:
                    out.div_(n)
                start, stop = b.owned(self.rank)
                flat = self._flat(b, grads=False, span=(start, stop))  # the rest: gathered
                mine = flat[start:stop]
                self.momentum[b.index] = sgd_update_many_(
                    [mine], [out], [self.momentum[b.index]], **hyper
                )[0]
                part = mine if self.direct else mine.clone()  # gloo's gather: no aliasing
                work = None
                if n > 1:
                    self.stats.record("all_gather", ring_bytes("ag", flat.numel() * 4, n))
                    with pdist.guard("all_gather"):
                        if self.direct:
                            tag = 2 * b.index + 1
                            work = direct_all_gather(flat, part, self.rank, n, tag=tag)
                        else:
                            work = all_gather_into(flat, part, async_op=True)
                self._gathers[b.index] = (flat, part, work)  # awaited by the next forward

    @torch.no_grad()
    def _settle(self, buckets: list[int]) -> None:
        """Wait for these buckets' all-gathers and copy the updated weights in."""
        for index in buckets:
            pending = self._gathers[index]
            if pending is None:
                continue
            self._gathers[index] = None
            start = time.perf_counter()
            flat, _, work = pending
            if self.shm is not None:
                flat = self.shm.result(index, "shared-memory exchange(butterfly)")
            else:
                pdist.wait(work, "all_gather")
            b = self.buckets[index]
            for i, off in zip(b.params, b.offsets):
                p = self.params[i]
                p.copy_(flat[off : off + p.numel()].view(p.shape))
            self.stats.blocking_s += time.perf_counter() - start

    @property
    def gathers_in_flight(self) -> int:
        """Buckets whose updated weights have not yet been copied in."""
        return sum(g is not None for g in self._gathers)

    def flush(self) -> None:
        self._settle(list(range(len(self.buckets))))
        super().flush()  # batch-norm statistics

    def load_model_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.flush()  # a gather still in flight must not overwrite the loaded weights
        super().load_model_state_dict(state)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.shm = None  # unmapped once its last view is gone

    # full optimizer state, independent of the world size ---------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Gather the sharded momentum into one buffer per parameter (collective)."""
        if self.shm is not None:  # a part's update (and its momentum) may still be pending
            self._settle(list(range(len(self.buckets))))
        if all(m is None for m in self.momentum):
            return self._sgd_state_dict([None] * len(self.params))
        buffers: list[torch.Tensor | None] = [None] * len(self.params)
        for b in self.buckets:
            shard = self.momentum[b.index]
            full = torch.zeros(b.padded, dtype=torch.float32, device=self.device)
            if self.world > 1:
                with pdist.guard("all_gather(optimizer state)"):
                    all_gather_into(full, shard)
            else:
                full.copy_(shard)
            for i, off in zip(b.params, b.offsets):
                p = self.params[i]
                buffers[i] = full[off : off + p.numel()].view(p.shape).to(p.device).clone()
        return self._sgd_state_dict(buffers)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Keep only this rank's part of each full momentum buffer."""
        buffers = self._buffers_from(state)
        for b in self.buckets:
            if any(buffers[i] is None for i in b.params):
                self.momentum[b.index] = None
                continue
            full = torch.zeros(b.padded, dtype=torch.float32, device=self.device)
            for i, off in zip(b.params, b.offsets):
                full[off : off + self.params[i].numel()].copy_(buffers[i].reshape(-1))
            start, stop = b.owned(self.rank)
            self.momentum[b.index] = full[start:stop].clone()
