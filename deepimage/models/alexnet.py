"""AlexNet (Krizhevsky et al., 2012) as a single-tower network.

Five convolutions (96, 256, 384, 384, 256 channels) and three fully-connected layers (4096,
4096, classes), ReLU everywhere but the output, local response normalisation after the first
two convolutions, overlapping 3x3/2 max-pools after conv1, conv2 and conv5, and dropout 0.5 on
the outputs of the first two fully-connected layers. Padding follows torchvision, so a 224 input
gives a 256x6x6 feature map (62.4M parameters for 1000 classes). Pools round up as in the
original Caffe model, which leaves 224 unchanged and keeps small inputs (56, 64) from
collapsing to an empty map.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .classifier import ImageClassifier
from .common import conv_out, fc_head, init_weights, resolve_dropout, scale_width
from .registry import register_model

CONV_CHANNELS = (96, 256, 384, 384, 256)
FC_WIDTH = 4096
# (kernel, stride, padding) of the convolutions; pools are 3x3, stride 2.
_CONVS = ((11, 4, 2), (5, 1, 2), (3, 1, 1), (3, 1, 1), (3, 1, 1))
_POOL_AFTER = (0, 1, 4)
_LRN_AFTER = (0, 1)


def feature_size(image_size: int) -> int:
    """Side of AlexNet's final feature map for a square input of ``image_size`` (0 if empty)."""
    k = image_size
    for i, (kernel, stride, padding) in enumerate(_CONVS):
        k = conv_out(k, kernel, stride, padding)
        if i in _POOL_AFTER:
            k = conv_out(k, 3, 2, ceil=True)
    return k


MIN_IMAGE_SIZE = next(s for s in range(1, 256) if all(feature_size(t) > 0 for t in range(s, 256)))
"""Smallest input side that AlexNet's stride-4 stem and three pools reduce to a non-empty map."""


def make_features(width: float = 1.0) -> nn.Sequential:
    """Convolutional trunk: conv-ReLU(-LRN)(-maxpool) x 5."""
    layers: list[nn.Module] = []
    in_channels = 3
    for i, ((kernel, stride, padding), channels) in enumerate(zip(_CONVS, CONV_CHANNELS)):
        out_channels = scale_width(channels, width)
        layers.append(nn.Conv2d(in_channels, out_channels, kernel, stride, padding))
        layers.append(nn.ReLU(inplace=True))
        if i in _LRN_AFTER:
            layers.append(nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0))
        if i in _POOL_AFTER:
            layers.append(nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True))
        in_channels = out_channels
    return nn.Sequential(*layers)


@register_model("alexnet")
def alexnet(
    num_classes: int,
    *,
    image_size: int = 224,
    width: float = 1.0,
    dropout: float | None = None,
    **kwargs: Any,
) -> ImageClassifier:
    """AlexNet for ``image_size`` inputs (at least :data:`MIN_IMAGE_SIZE`).

    The feature shape is computed analytically, so construction costs no forward pass.
    ``width`` scales the convolution channels and the fully-connected width.
    """
    if kwargs:
        raise TypeError(f"alexnet got unexpected options: {', '.join(sorted(kwargs))}")
    k = feature_size(image_size)
    if image_size < MIN_IMAGE_SIZE or k < 1:
        raise ValueError(f"alexnet needs image_size >= {MIN_IMAGE_SIZE}, got {image_size}")
    channels = scale_width(CONV_CHANNELS[-1], width)
    classifier = fc_head(
        channels * k * k, scale_width(FC_WIDTH, width), num_classes, resolve_dropout(dropout)
    )
    model = ImageClassifier(
        make_features(width),
        classifier,
        name="alexnet",
        num_classes=num_classes,
        image_size=image_size,
        feature_shape=(channels, k, k),
    )
    init_weights(model)
    return model
