"""The baseline: PyTorch's DistributedDataParallel, bucketed all-reduce overlapped with backward.

A communication hook (PyTorch's default all-reduce, wrapped) counts the bytes of every bucket,
so the baseline reports the same figures as the paper's strategies.
"""

import contextlib

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from deepimage.parallel import dist as pdist
from deepimage.parallel.base import CommStats, SyncStrategy, ring_bytes


def _counting_allreduce_hook(
    stats: CommStats, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """Average the bucket across ranks (as DDP's default hook) and count its bytes."""
    buffer = bucket.buffer()
    world = dist.get_world_size()
    nbytes = buffer.numel() * buffer.element_size()
    stats.record("all_reduce", ring_bytes("all_reduce", nbytes, world))
    buffer.div_(world)
    work = dist.all_reduce(buffer, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


class DDPStrategy(SyncStrategy):
    """DistributedDataParallel with ``torch.optim.SGD``; a plain optimizer in one process."""

    name = "ddp"
    steps_optimizer = True
    supports_fp16_scaler = True  # step() is optimizer.step(), which a GradScaler can wrap

    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, *, bucket_mb: float = 25.0
    ) -> None:
        super().__init__(model, optimizer)
        self.ddp: DistributedDataParallel | None = None
        if pdist.is_distributed():
            device = next(model.parameters()).device
            self.ddp = DistributedDataParallel(
                model,
                device_ids=[device] if device.type == "cuda" else None,
                bucket_cap_mb=bucket_mb,
            )
            self.ddp.register_comm_hook(self.stats, _counting_allreduce_hook)

    def wrap(self) -> nn.Module:
        return self.ddp if self.ddp is not None else self.model

    def micro_step(self, last: bool) -> contextlib.AbstractContextManager:
        if self.ddp is None or last:
            return contextlib.nullcontext()
        return self.ddp.no_sync()

    def step(self) -> None:
        self.optimizer.step()
