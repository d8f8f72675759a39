"""Lookahead as airbench uses it: every ``every`` steps the weights move to an exponential
moving average of themselves, ``ema <- ema + (1 - decay) (w - ema); w <- ema``.

The decay grows over the run as ``decay * (step / total)^3``: near 0 early (the weights lead),
up to ``decay`` (airbench: 0.95^5) at the end. After the last step the weights become the
average. Every floating-point tensor of the state dict takes part (batch-norm statistics
too); the average is part of the checkpoint, so a resumed run continues exactly.
"""

from __future__ import annotations

import torch
from torch import nn


class Lookahead:
    """The slow weights of ``model`` and their update rule."""

    def __init__(self, model: nn.Module, every: int, decay: float, total_steps: int) -> None:
        if every < 1 or total_steps < 1:
            raise ValueError(f"lookahead needs every >= 1 and total_steps >= 1, got {every}")
        self.model, self.every, self.decay, self.total = model, every, decay, total_steps
        self.ema: dict[str, torch.Tensor] = {}
        self.reset()

    def reset(self) -> None:
        """Start the average at the current weights (after a data-dependent init)."""
        self.ema = {k: v.detach().clone() for k, v in self._floats().items()}

    def _floats(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.model.state_dict().items() if v.is_floating_point()}

    def decay_at(self, step: int) -> float:
        return self.decay * (min(step, self.total) / self.total) ** 3

    @torch.no_grad()
    def update(self, decay: float) -> None:
        """Pull the average toward the weights by ``1 - decay``; the weights take its value."""
        for key, w in self._floats().items():
            ema = self.ema[key]
            ema.lerp_(w, 1.0 - decay)
            w.copy_(ema)

    def after_step(self, step: int) -> None:
        """Call after optimizer step number ``step`` (1-based): the periodic update, and the
        weights set to the average after the run's last step."""
        if step % self.every == 0:
            self.update(self.decay_at(step))
        if step == self.total:
            self.update(1.0)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.ema)

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.ema) - set(state)
        if missing:
            raise KeyError(f"lookahead state lacks {sorted(missing)[:3]}")
        for key, ema in self.ema.items():
            ema.copy_(state[key])
