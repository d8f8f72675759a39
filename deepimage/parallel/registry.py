"""The gradient-sync strategies by name: ``--sync`` takes its choices from :data:`SYNCS`.

Each entry builds a strategy over a model and its optimizer; :func:`build_strategy` is how
every caller (the training run, hybrid parallelism's conv trunk, the benchmarks) gets one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from deepimage.parallel.base import SyncStrategy
from deepimage.parallel.butterfly import Butterfly
from deepimage.parallel.ddp import DDPStrategy
from deepimage.parallel.lazy import LazyUpdate

SyncFactory = Callable[[nn.Module, torch.optim.Optimizer, float], SyncStrategy]
"""``factory(model, optimizer, bucket_mb)``: a strategy for ``model``."""

SYNCS: dict[str, SyncFactory] = {
    "ddp": lambda model, optimizer, bucket_mb: DDPStrategy(model, optimizer, bucket_mb=bucket_mb),
    "butterfly": lambda model, optimizer, bucket_mb: Butterfly(
        model, optimizer, bucket_mb=bucket_mb
    ),
    "lazy": lambda model, optimizer, bucket_mb: LazyUpdate(model, optimizer),
}


def build_strategy(
    name: str, model: nn.Module, optimizer: torch.optim.Optimizer, *, bucket_mb: float = 25.0
) -> SyncStrategy:
    """The named strategy (``ddp``, ``butterfly`` or ``lazy``) for ``model``."""
    if name not in SYNCS:
        raise ValueError(f"unknown sync strategy {name!r}; known: {', '.join(SYNCS)}")
    return SYNCS[name](model, optimizer, bucket_mb)
