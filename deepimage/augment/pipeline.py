"""Training augmentation presets behind one call: uint8 batch in, model-ready tensor out.

``build_train_augment`` returns a callable ``(images, rows, epoch) -> x`` where ``images`` is a
``(B, S, S, 3)`` uint8 batch already on the training device, ``rows`` the images' store rows
(their identity for the keyed random draws) and ``x`` the normalised float ``(B, 3, C, C)``
input, channels_last in memory. Every parameter is a pure function of (seed, epoch, row).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from deepimage.augment.crop_flip import apply_crop_flip, sample_crop_flip
from deepimage.data.transforms import center_crop, to_model_input

TrainAugment = Callable[[torch.Tensor, np.ndarray, int], torch.Tensor]


def _crop_flip(
    size: int, crop: int, seed: int, mean: Sequence[float], std: Sequence[float], flip: bool
) -> TrainAugment:
    def augment(images: torch.Tensor, rows: np.ndarray, epoch: int) -> torch.Tensor:
        params = sample_crop_flip(seed, epoch, rows, size, crop, flip=flip)
        return to_model_input(apply_crop_flip(images, params, crop), mean, std)

    return augment


def _none(
    size: int, crop: int, seed: int, mean: Sequence[float], std: Sequence[float]
) -> TrainAugment:
    def augment(images: torch.Tensor, rows: np.ndarray, epoch: int) -> torch.Tensor:
        return to_model_input(center_crop(images, crop), mean, std)

    return augment


PRESETS: dict[str, Callable[..., TrainAugment]] = {
    "crop_flip": lambda size, crop, seed, mean, std, **kw: _crop_flip(
        size, crop, seed, mean, std, flip=True
    ),
    "none": lambda size, crop, seed, mean, std, **kw: _none(size, crop, seed, mean, std),
}


def build_train_augment(
    preset: str,
    *,
    size: int,
    crop: int,
    seed: int,
    mean: Sequence[float],
    std: Sequence[float],
    stats: dict[str, Any] | None = None,
    device: torch.device | None = None,
) -> TrainAugment:
    """The preset's augmentation; ``stats`` are the store's pixel statistics (PCA lighting)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown augmentation preset {preset!r}; known: {', '.join(PRESETS)}")
    return PRESETS[preset](size=size, crop=crop, seed=seed, mean=mean, std=std, stats=stats,
                           device=device)  # fmt: skip
