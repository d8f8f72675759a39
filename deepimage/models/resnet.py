"""ResNet-18 from torchvision, split into a convolutional trunk and a pooled linear head."""

from __future__ import annotations

from typing import Any

import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, conv1x1

from .classifier import ImageClassifier
from .common import scale_width, split_resnet
from .registry import register_model


def _scaled_resnet18(num_classes: int, width: float) -> nn.Module:
    """ResNet-18 with every stage's channels scaled by ``width``, built from torchvision's
    ``BasicBlock`` with torchvision's module names and initialisation."""
    model = nn.Module()
    stem = scale_width(64, width)
    model.conv1 = nn.Conv2d(3, stem, kernel_size=7, stride=2, padding=3, bias=False)
    model.bn1 = nn.BatchNorm2d(stem)
    model.relu = nn.ReLU(inplace=True)
    model.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
    in_planes = stem
    for i in range(4):
        planes = scale_width(64 * 2**i, width)
        stride = 1 if i == 0 else 2
        downsample = None
        if stride != 1 or in_planes != planes:
            downsample = nn.Sequential(conv1x1(in_planes, planes, stride), nn.BatchNorm2d(planes))
        blocks = [BasicBlock(in_planes, planes, stride, downsample), BasicBlock(planes, planes)]
        setattr(model, f"layer{i + 1}", nn.Sequential(*blocks))
        in_planes = planes
    model.fc = nn.Linear(in_planes, num_classes)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model


@register_model("resnet18")
def resnet18(
    num_classes: int,
    *,
    image_size: int = 224,
    width: float = 1.0,
    dropout: float | None = None,
    **kwargs: Any,
) -> ImageClassifier:
    """torchvision's ResNet-18 (random init). ``width`` != 1 scales every stage's channels
    (same module names and init); ``dropout`` (default none) adds dropout before ``fc``;
    ``kwargs`` go to torchvision's ``ResNet`` (e.g. ``zero_init_residual=True``)."""
    if width == 1.0:
        model = torchvision.models.resnet18(weights=None, num_classes=num_classes, **kwargs)
    elif kwargs:
        raise TypeError(f"resnet18 with width != 1 takes no options, got {', '.join(kwargs)}")
    else:
        model = _scaled_resnet18(num_classes, width)
    p = 0.0 if dropout is None else float(dropout)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    features, classifier = split_resnet(model, p)
    return ImageClassifier(
        features, classifier, name="resnet18", num_classes=num_classes, image_size=image_size
    )
