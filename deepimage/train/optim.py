"""The optimizer of the paper's recipe: SGD with momentum and weight decay."""

from __future__ import annotations

import torch

from deepimage.config import TrainConfig


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD, momentum 0.9 and weight decay 5e-4 by default, on every trainable parameter."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(
        params,
        lr=cfg.effective_lr(),
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        foreach=True,
    )


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
