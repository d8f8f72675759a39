"""Deterministic image-tensor steps shared by training, evaluation, predict and serve.

One implementation of centre cropping and of the uint8 -> normalised float conversion, so
that every path feeds the network identically.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def center_crop(images: torch.Tensor, crop: int) -> torch.Tensor:
    """Centre ``crop x crop`` window of ``(B, H, W, C)`` images (a view, no copy)."""
    h, w = images.shape[1:3]
    if crop > h or crop > w:
        raise ValueError(f"crop {crop} is larger than the images ({h}x{w})")
    top, left = (h - crop) // 2, (w - crop) // 2
    return images[:, top : top + crop, left : left + crop]


def to_model_input(
    images: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device | str | None = None,
    channels_last: bool = True,
) -> torch.Tensor:
    """``(B, H, W, 3)`` uint8 -> normalised float32 ``(B, 3, H, W)``.

    The NHWC source becomes an NCHW tensor whose memory is already channels_last, so no
    transpose copy is needed when the model runs channels_last.
    """
    if device is not None:
        images = images.to(device, non_blocking=True)
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], device=images.device)
    shift = torch.tensor([-m / s for m, s in zip(mean, std)], device=images.device)
    x = torch.addcmul(shift, images.float(), scale)  # (B, H, W, 3)
    x = x.permute(0, 3, 1, 2)
    if not channels_last:
        x = x.contiguous()
    return x
