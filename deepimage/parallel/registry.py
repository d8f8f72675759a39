"""The gradient-sync strategies by name: ``--sync`` takes its choices from :data:`SYNCS`.

Each entry is a strategy class; :func:`build_strategy` is how every caller (the training run,
hybrid parallelism's conv trunk, the benchmarks) gets one, and the class answers what a
strategy can do before one is built (e.g. :attr:`~SyncStrategy.supports_fp16_scaler`).
"""

from __future__ import annotations

import torch
from torch import nn

from deepimage.parallel.base import SyncStrategy
from deepimage.parallel.butterfly import Butterfly
from deepimage.parallel.ddp import DDPStrategy
from deepimage.parallel.lazy import LazyUpdate

SYNCS: dict[str, type[SyncStrategy]] = {
    "ddp": DDPStrategy,
    "butterfly": Butterfly,
    "lazy": LazyUpdate,
}


def sync_class(name: str) -> type[SyncStrategy]:
    """The strategy class registered as ``name``."""
    if name not in SYNCS:
        raise ValueError(f"unknown sync strategy {name!r}; known: {', '.join(SYNCS)}")
    return SYNCS[name]


def build_strategy(
    name: str, model: nn.Module, optimizer: torch.optim.Optimizer, *, bucket_mb: float = 25.0
) -> SyncStrategy:
    """The named strategy (``ddp``, ``butterfly`` or ``lazy``) for ``model``."""
    return sync_class(name).create(model, optimizer, bucket_mb=bucket_mb)
