"""Learning-rate schedules: the paper's divide-by-10-on-plateau, steps, exponential, warm-up,
and ``linear``: airbench's triangle, a warm-up to ``lr`` then a straight line down to
``min_lr`` at the last step of the run.

A schedule maps (epoch, step within epoch) to a learning rate; the plateau schedule also
watches validation accuracy at each epoch's end. Its state is a small JSON-able dict, saved
in every checkpoint so a resumed run continues on the same curve.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from deepimage.config import TrainConfig

logger = logging.getLogger(__name__)

# decay factor at an epoch, for the schedules that need no feedback
_DECAYS: dict[str, Callable[[TrainConfig, int], float]] = {
    "constant": lambda cfg, epoch: 1.0,
    "plateau": lambda cfg, epoch: 1.0,  # its decays live in the state, not in the epoch
    "step": lambda cfg, epoch: cfg.gamma ** sum(epoch >= m for m in cfg.milestones),
    "exp": lambda cfg, epoch: cfg.gamma**epoch,
    "linear": lambda cfg, epoch: 1.0,  # its decay is per step (LRSchedule.lr_at)
}


class LRSchedule:
    """Learning rate for each optimizer step; ``end_epoch`` feeds validation accuracy back."""

    def __init__(self, cfg: TrainConfig, steps_per_epoch: int) -> None:
        self.cfg = cfg
        self.base_lr = cfg.effective_lr()
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.warmup_steps = round(cfg.warmup_epochs * self.steps_per_epoch)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        self.plateau_scale = 1.0
        self.best: float | None = None
        self.bad_epochs = 0

    def lr_at(self, epoch: int, step_in_epoch: int) -> float:
        lr = self.base_lr * _DECAYS[self.cfg.schedule](self.cfg, epoch) * self.plateau_scale
        global_step = epoch * self.steps_per_epoch + step_in_epoch
        if global_step < self.warmup_steps:
            start = self.cfg.warmup_start
            return lr * (start + (1 - start) * (global_step + 1) / self.warmup_steps)
        if self.cfg.schedule == "linear":  # lr at the warm-up's end, min_lr at the last step
            span = max(1, self.total_steps - 1 - self.warmup_steps)
            done = min(1.0, (global_step - self.warmup_steps) / span)
            return lr + (self.cfg.min_lr - lr) * done
        return max(lr, self.cfg.min_lr)

    def end_epoch(self, epoch: int, accuracy: float | None) -> None:
        """Divide by 1/gamma when ``accuracy`` has not improved for ``patience`` epochs."""
        if self.cfg.schedule != "plateau" or accuracy is None:
            return
        if self.best is None or accuracy > self.best + 1e-9:
            self.best, self.bad_epochs = accuracy, 0
            return
        self.bad_epochs += 1
        if self.bad_epochs > self.cfg.patience:
            self.plateau_scale *= self.cfg.gamma
            self.bad_epochs = 0
            logger.info(
                "epoch %d: accuracy stopped improving (best %.4f); learning rate now %.3g",
                epoch + 1,
                self.best,
                self.lr_at(epoch + 1, 0),
            )

    def state_dict(self) -> dict[str, Any]:
        return {"plateau_scale": self.plateau_scale, "best": self.best, "bad": self.bad_epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.plateau_scale = float(state["plateau_scale"])
        self.best = state["best"]
        self.bad_epochs = int(state["bad"])
