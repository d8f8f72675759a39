"""The paper's VGG-style models (Deep Image, section 5.1 and Fig. 8).

16 weight layers: 13 3x3 convolutions and 3 fully-connected layers; 19 weight layers: 16
convolutions and 3 fully-connected layers. ReLU after every weight layer but the last, five 2x2
max-pools with stride 2 and dropout 0.5 after the first two fully-connected layers. The
architecture is data (``cfgs`` plus :func:`make_layers`), as in torchvision.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .classifier import ImageClassifier
from .common import fc_head, init_weights, resolve_dropout, scale_width
from .registry import register_model

M = "M"
"""Marker for a 2x2, stride-2 max-pool in a configuration."""

cfgs: dict[str, list[int | str]] = {
    "D": [64, 64, M, 128, 128, M, 256, 256, 256, M, 512, 512, 512, M, 512, 512, 512, M],
    "E": [64, 64, M, 128, 128, M, 256, 256, 256, 256, M, 512, 512, 512, 512, M]
    + [512, 512, 512, 512, M],
}
"""Convolution widths per configuration (``D``: 16 weight layers, ``E``: 19)."""

FC_WIDTH = 4096
STRIDE = 32
"""Total down-sampling of the five max-pools: the feature map is ``image_size // 32``."""


def make_layers(
    cfg: list[int | str], width: float = 1.0, batch_norm: bool = False
) -> nn.Sequential:
    """Build the convolutional trunk: 3x3 same-padding convs (+BN) + ReLU, and 2x2 max-pools."""
    layers: list[nn.Module] = []
    in_channels = 3
    for v in cfg:
        if v == M:
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        out_channels = scale_width(int(v), width)
        layers.append(nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(out_channels))
        layers.append(nn.ReLU(inplace=True))
        in_channels = out_channels
    return nn.Sequential(*layers)


def build_vgg(
    cfg: str,
    num_classes: int,
    *,
    name: str,
    image_size: int = 224,
    width: float = 1.0,
    dropout: float | None = None,
    batch_norm: bool = False,
) -> ImageClassifier:
    """VGG-style classifier for configuration ``cfg`` at ``image_size`` (a multiple of 32).

    The first fully-connected layer sees the whole ``C x k x k`` map (``k = image_size // 32``),
    so it can be converted exactly into a ``k x k`` convolution for dense evaluation.
    """
    if image_size < STRIDE or image_size % STRIDE:
        raise ValueError(
            f"{name} needs image_size to be a positive multiple of 32, got {image_size}"
        )
    features = make_layers(cfgs[cfg], width, batch_norm)
    channels = scale_width(int(next(v for v in reversed(cfgs[cfg]) if v != M)), width)
    k = image_size // STRIDE
    fc = scale_width(FC_WIDTH, width)
    classifier = fc_head(channels * k * k, fc, num_classes, resolve_dropout(dropout))
    model = ImageClassifier(
        features,
        classifier,
        name=name,
        num_classes=num_classes,
        image_size=image_size,
        feature_shape=(channels, k, k),
    )
    init_weights(model)
    return model


@register_model("vgg16_deepimage")
def vgg16_deepimage(num_classes: int, **kwargs: Any) -> ImageClassifier:
    """16 weight layers (13 conv + 3 FC), paper Fig. 8(a). Options: see :func:`build_vgg`."""
    return build_vgg("D", num_classes, name="vgg16_deepimage", **kwargs)


@register_model("vgg19_deepimage")
def vgg19_deepimage(num_classes: int, **kwargs: Any) -> ImageClassifier:
    """19 weight layers (16 conv + 3 FC), paper Fig. 8(b). Options: see :func:`build_vgg`."""
    return build_vgg("E", num_classes, name="vgg19_deepimage", **kwargs)
