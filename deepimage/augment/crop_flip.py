"""Random crop and horizontal flip on a batch of uint8 images, parameters sampled per image.

The foundation's training augmentation (the ``crop_flip`` preset): sample parameters from the
image's key, then apply them; the parameters are plain tensors that can be replayed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from deepimage.augment.rng import keyed_uniform


@dataclass
class CropFlipParams:
    """Per-image crop origin (top, left) and flip flag; one row per image."""

    top: torch.Tensor  # int64 (B,)
    left: torch.Tensor  # int64 (B,)
    flip: torch.Tensor  # bool (B,)


def sample_crop_flip(
    seed: int, epoch: int, indices: np.ndarray, size: int, crop: int, flip: bool = True
) -> CropFlipParams:
    """Uniform crop origins over all ``(size - crop + 1)^2`` positions, flip with p = 0.5."""
    u = keyed_uniform(seed, epoch, indices, 3, stream=1)
    span = size - crop + 1
    top = np.minimum((u[:, 0] * span).astype(np.int64), span - 1)
    left = np.minimum((u[:, 1] * span).astype(np.int64), span - 1)
    flips = (u[:, 2] < 0.5) if flip else np.zeros(len(u), dtype=bool)
    return CropFlipParams(torch.from_numpy(top), torch.from_numpy(left), torch.from_numpy(flips))


def apply_crop_flip(images: torch.Tensor, params: CropFlipParams, crop: int) -> torch.Tensor:
    """Crop ``(B, S, S, C)`` uint8 images to ``(B, crop, crop, C)`` and flip where asked."""
    b = images.shape[0]
    device = images.device
    rows = params.top.to(device)[:, None] + torch.arange(crop, device=device)[None, :]
    cols = params.left.to(device)[:, None] + torch.arange(crop, device=device)[None, :]
    reversed_cols = cols.flip(1)
    cols = torch.where(params.flip.to(device)[:, None], reversed_cols, cols)
    batch = torch.arange(b, device=device)[:, None, None]
    return images[batch, rows[:, :, None], cols[:, None, :]]
