"""Lazy update (paper 3.1): exchange each layer's gradient as soon as backward produces it,
and wait for it only when the next forward pass reaches that layer.

* A post-accumulate-grad hook on every parameter counts the layer's finished gradients; when
  the last one lands (on the last micro-batch of a step) the layer's gradients are flattened
  and an asynchronous all-reduce starts. Nothing waits at the end of backward.
* A forward pre-hook on the layer waits for that exchange and applies the layer's SGD update
  just before the layer runs in the next step, so the exchange of the last layers overlaps
  the forward pass of the first ones, and every exchange overlaps the rest of backward.
* :meth:`LazyUpdate.flush` completes every pending exchange and update: before evaluation,
  checkpoints and the end of training, after which the weights equal synchronous SGD's.

The exchange is one all-reduce per layer (a ring all-reduce is a reduce-scatter followed by
an all-gather: ``2 (N-1)/N`` x gradient bytes per rank, as for butterfly). When every rank is
a CPU process of one machine it goes through shared memory instead
(:class:`~deepimage.parallel.shm.ShmExchange`: the layer's gradient is written once into a
shared slot, each rank sums its part of the layer, in backward as soon as all ranks have
posted, or at the latest when the next forward needs the layer); elsewhere through
torch.distributed. The update is
applied redundantly on every rank from the identical reduced gradient, so the momentum is
replicated rather than sharded: sharding it would put the all-gather of updated weights on
the forward pass's critical path.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from deepimage.parallel import dist as pdist
from deepimage.parallel.base import SyncStrategy, ring_bytes, sgd_update_many_
from deepimage.parallel.shm import ShmExchange


@dataclass
class _Layer:
    module: nn.Module
    params: list[int]  # indices into the strategy's parameter list
    index: int  # the layer's position (its shared-memory exchange)
    ready: int = 0
    pending: Any = None  # (work, flat gradient, lr) while an exchange is in flight
    flat: torch.Tensor | None = None  # the exchange buffer, reused once the update is applied
    handles: list[Any] = field(default_factory=list)


class LazyUpdate(SyncStrategy):
    """Per-layer asynchronous all-reduce started in backward, awaited in the next forward."""

    name = "lazy"

    @classmethod
    def create(
        cls, model: nn.Module, optimizer: torch.optim.Optimizer, *, bucket_mb: float = 25.0
    ) -> SyncStrategy:
        """One exchange per layer: no buckets, ``bucket_mb`` is not used."""
        return cls(model, optimizer)

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        shared_memory: bool | None = None,
    ) -> None:
        """``shared_memory``: None uses it where every rank can (one host, CPU), False never
        (torch.distributed's all-reduce), True requires it. Collective: every rank must
        build the strategy."""
        super().__init__(model, optimizer)
        index = {id(p): i for i, p in enumerate(self.params)}
        self.layers: list[_Layer] = []
        for module in model.modules():
            own = [index[id(p)] for p in module.parameters(recurse=False) if id(p) in index]
            if own:
                self.layers.append(_Layer(module, own, len(self.layers)))
        self.momentum: list[torch.Tensor | None] = [None] * len(self.params)
        self.device = pdist.comm_device()
        self._sync = True
        sizes = [sum(self.params[i].numel() for i in layer.params) for layer in self.layers]
        self.shm = ShmExchange.for_strategy(sizes, shared_memory, "lazy update")
        for layer in self.layers:
            layer.handles.append(
                layer.module.register_forward_pre_hook(
                    lambda _m, _args, layer=layer: self._before_forward(layer)
                )
            )
            for i in layer.params:
                layer.handles.append(
                    self.params[i].register_post_accumulate_grad_hook(
                        lambda _p, layer=layer: self._on_grad(layer)
                    )
                )

    def micro_step(self, last: bool):
        strategy = self

        class _Ctx:
            def __enter__(self) -> None:
                strategy._sync = last

            def __exit__(self, *exc: Any) -> None:
                strategy._sync = True

        return _Ctx()

    # backward: launch ---------------------------------------------------------------------

    def _on_grad(self, layer: _Layer) -> None:
        if not self._sync:
            return
        layer.ready += 1
        if layer.ready == len(layer.params):
            self._launch(layer)

    @torch.no_grad()
    def _launch(self, layer: _Layer) -> None:
        if layer.pending is not None:  # the layer skipped a forward pass: settle it first
            self._apply(layer)
        start = time.perf_counter()
        layer.ready = 0
        if self.shm is not None:
            flat = self.shm.slot(layer.index)
        else:
            if layer.flat is None:  # the layer's own buffer, written every step: no page faults
                n = sum(self.params[i].numel() for i in layer.params)
                layer.flat = torch.empty(n, dtype=torch.float32, device=self.device)
            flat = layer.flat
        offset = 0
        for i in layer.params:
            p = self.params[i]
            segment = flat[offset : offset + p.numel()]
            offset += p.numel()
            if p.grad is None:
                segment.zero_()
            else:
                segment.copy_(p.grad.reshape(-1))
            p.grad = None
        work = None
        if self.shm is not None:  # nothing on a wire: the other ranks read the slot
            self.shm.post(layer.index)
            self.shm.progress()
        elif self.world > 1:
            self.stats.record("all_reduce", ring_bytes("all_reduce", flat.numel() * 4, self.world))
            with pdist.guard("all_reduce(lazy)"):
                work = dist.all_reduce(flat, async_op=True)
        layer.pending = (work, flat, self.hyper)
        self.stats.blocking_s += time.perf_counter() - start

    # forward: wait and apply ----------------------------------------------------------------

    def _before_forward(self, layer: _Layer) -> None:
        if layer.pending is not None:
            self._apply(layer)

    @torch.no_grad()
    def _apply(self, layer: _Layer) -> None:
        start = time.perf_counter()
        work, flat, hyper = layer.pending
        layer.pending = None
        if self.shm is not None:
            flat = self.shm.result(layer.index, "shared-memory exchange(lazy)")
        else:
            pdist.wait(work, "all_reduce(lazy)")
            if self.world > 1:
                flat.div_(self.world)
        params, grads, offset = [], [], 0
        for i in layer.params:
            p = self.params[i]
            params.append(p)
            grads.append(flat[offset : offset + p.numel()].view(p.shape).to(p.device))
            offset += p.numel()
        bufs = sgd_update_many_(params, grads, [self.momentum[i] for i in layer.params], **hyper)
        for i, buf in zip(layer.params, bufs):
            self.momentum[i] = buf
        self.stats.blocking_s += time.perf_counter() - start

    def step(self) -> None:
        """Launch layers whose gradients did not all arrive (unused parameters); never waits."""
        for layer in self.layers:
            if layer.ready or (layer.pending is None and self._has_grad(layer)):
                self._launch(layer)

    def _has_grad(self, layer: _Layer) -> bool:
        return any(self.params[i].grad is not None for i in layer.params)

    def zero_grad(self) -> None:
        for layer in self.layers:
            layer.ready = 0
        super().zero_grad()

    def flush(self) -> None:
        for layer in self.layers:
            if layer.pending is not None:
                self._apply(layer)
        super().flush()  # batch-norm statistics

    def state_dict(self) -> dict[str, Any]:
        self.flush()
        return self._sgd_state_dict(list(self.momentum))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.momentum = self._buffers_from(state)

    def close(self) -> None:
        for layer in self.layers:
            for handle in layer.handles:
                handle.remove()
            layer.handles.clear()
        self.shm = None  # unmapped once its last view is gone
