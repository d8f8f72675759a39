"""The one place a training run's parallel strategy is chosen: :func:`build_sync`.

``--parallel`` takes its choices from :data:`PARALLELS`: ``data`` replicates the model on
every rank; ``hybrid`` (paper 3.2) first cuts the FC classifier to this rank's rows. Either
way the optimizer is built over what this rank trains, and the ``--sync`` strategy
(:mod:`deepimage.parallel.registry`) exchanges the gradients and applies the update.
:func:`strategy_class` answers what the chosen strategy can do before it is built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from deepimage.config import TrainConfig
from deepimage.parallel.base import SyncStrategy, broadcast_model
from deepimage.parallel.head import HybridHead, shard_classifier
from deepimage.parallel.hybrid import HybridStrategy
from deepimage.parallel.optim import build_optimizer
from deepimage.parallel.registry import build_strategy, sync_class


def _data(cfg: TrainConfig, model: nn.Module) -> SyncStrategy:
    broadcast_model(model)
    optimizer = build_optimizer(model, cfg)
    return build_strategy(cfg.sync, model, optimizer, bucket_mb=cfg.bucket_mb)


def _hybrid(cfg: TrainConfig, model: nn.Module) -> SyncStrategy:
    if not isinstance(model.classifier, HybridHead):
        shard_classifier(model)  # this rank keeps 1/N of every FC layer (paper 3.2)
    # every rank computes the same rows of the FC layers (keyed init, or the same full layer)
    broadcast_model(model.features)
    optimizer = build_optimizer(model, cfg)
    return HybridStrategy(model, optimizer, cfg.sync, bucket_mb=cfg.bucket_mb)


@dataclass(frozen=True)
class ParallelMode:
    """A ``--parallel`` choice: how it builds its strategy, and the class it builds."""

    build: Callable[[TrainConfig, nn.Module], SyncStrategy]
    strategy: Callable[[TrainConfig], type[SyncStrategy]]


PARALLELS: dict[str, ParallelMode] = {
    "data": ParallelMode(_data, lambda cfg: sync_class(cfg.sync)),
    "hybrid": ParallelMode(_hybrid, lambda cfg: HybridStrategy),
}


def _mode(cfg: TrainConfig) -> ParallelMode:
    if cfg.parallel not in PARALLELS:
        raise ValueError(f"unknown parallel mode {cfg.parallel!r}; known: {', '.join(PARALLELS)}")
    return PARALLELS[cfg.parallel]


def strategy_class(cfg: TrainConfig) -> type[SyncStrategy]:
    """The class of the strategy :func:`build_sync` makes for ``cfg``, without building it:
    its attributes say what the run can do (e.g. ``supports_fp16_scaler``)."""
    return _mode(cfg).strategy(cfg)


def build_sync(cfg: TrainConfig, model: nn.Module) -> SyncStrategy:
    """Start every rank from rank 0's weights (hybrid: the replicated trunk), split the model
    as ``cfg.parallel`` says (unless already split), build the optimizer and the ``cfg.sync``
    strategy over it.

    The strategy's ``optimizer`` holds the learning rate, ``wrap()`` is the module to train.
    """
    return _mode(cfg).build(cfg, model)
