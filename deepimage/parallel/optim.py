"""Optimizers: the paper's SGD with momentum and weight decay (default), or AdamW.

A small factory keyed by the config's ``optimizer``. The butterfly and lazy strategies apply
SGD's arithmetic to their own parameter shards, so they accept SGD only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from deepimage.config import TrainConfig


def _sgd(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        params,
        lr=cfg.effective_lr(),
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        foreach=True,
    )


def _adamw(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        params, lr=cfg.effective_lr(), weight_decay=cfg.weight_decay, foreach=True
    )


OPTIMIZERS: dict[str, Callable[[list[torch.nn.Parameter], TrainConfig], torch.optim.Optimizer]]
OPTIMIZERS = {"sgd": _sgd, "adamw": _adamw}


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The configured optimizer over every trainable parameter of ``model``."""
    params = [p for p in model.parameters() if p.requires_grad]
    return OPTIMIZERS[cfg.optimizer](params, cfg)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
