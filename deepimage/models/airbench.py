"""airbench94: the small VGG-like CIFAR-10 network of Jordan (arXiv 2404.00498).

A 2 x 2 patch-whitening convolution (weights from the training images, see
:class:`~deepimage.models.common.WhiteningConv`) and GELU, then three blocks of
conv-pool-BN-GELU-conv-BN-GELU (widths 64, 256, 256 times ``width``), a global max pool and a
bias-free linear layer whose logits are scaled by 1/9. Batch-norm layers learn only their
biases (the scales stay 1) with momentum 0.4 in PyTorch's convention (airbench's 0.6); the
recipe trains those biases at a higher learning rate (``norm_bias_lr_scale``). Convolutions
start from PyTorch's default initialisation with an identity (Dirac) in their first
``in_channels`` filters.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .classifier import ImageClassifier
from .common import WhiteningConv, scale_width
from .registry import register_model

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
WIDTHS = (64, 256, 256)
LOGIT_SCALE = 1 / 9


def _conv(cin: int, cout: int) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
    with torch.no_grad():
        nn.init.dirac_(conv.weight[: min(cin, cout)])
    return conv


def _norm(channels: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels, eps=1e-12, momentum=0.4)
    bn.weight.requires_grad_(False)  # scale fixed at 1: only the biases learn
    return bn


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        _conv(cin, cout), nn.MaxPool2d(2), _norm(cout), nn.GELU(),
        _conv(cout, cout), _norm(cout), nn.GELU(),
    )  # fmt: skip


class Scale(nn.Module):
    """Multiply by a constant (airbench's logit scaling)."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = float(factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor

    def extra_repr(self) -> str:
        return f"factor={self.factor:g}"


@register_model("airbench94")
def airbench94(
    num_classes: int,
    *,
    image_size: int = 32,
    width: float = 1.0,
    dropout: float | None = None,
    **kwargs: Any,
) -> ImageClassifier:
    """airbench94 (random init; the whitening layer awaits ``init_from_data``)."""
    if kwargs:
        raise TypeError(f"airbench94 takes no options, got {', '.join(kwargs)}")
    if dropout:
        raise ValueError("airbench94 has no dropout")
    w1, w2, w3 = (scale_width(c, width) for c in WIDTHS)
    whiten = WhiteningConv(3, kernel_size=2)
    features = nn.Sequential(
        whiten, nn.GELU(),
        _block(whiten.out_channels, w1), _block(w1, w2), _block(w2, w3),
        nn.AdaptiveMaxPool2d(1),
    )  # fmt: skip
    classifier = nn.Sequential(
        nn.Flatten(1), nn.Linear(w3, num_classes, bias=False), Scale(LOGIT_SCALE)
    )
    return ImageClassifier(
        features, classifier, name="airbench94", num_classes=num_classes,
        image_size=image_size, mean=CIFAR10_MEAN, std=CIFAR10_STD,
    )  # fmt: skip
