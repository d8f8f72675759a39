"""Fully convolutional (dense) evaluation: FC layers turned into convolutions (OverFeat).

Paper 5.1: "a transformed network with only convolutional layers is used to test images and
the class scores from the feature map of the last layer are averaged". The first FC layer,
which reads a ``C x k x k`` feature map, becomes a ``k x k`` convolution with the same
weights; later FC layers become 1x1 convolutions. On an image of exactly the training crop
size the score map is 1x1 and equals the original logits; on a larger image the network
slides over every crop position at once and the score map is averaged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def _conv_like(linear: nn.Linear, in_channels: int, kernel: tuple[int, int]) -> nn.Conv2d:
    conv = nn.Conv2d(in_channels, linear.out_features, kernel, bias=linear.bias is not None)
    conv = conv.to(device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(linear.weight.reshape(linear.out_features, in_channels, *kernel))
        if linear.bias is not None:
            conv.bias.copy_(linear.bias)
    return conv


def fc_to_conv(classifier: nn.Module, feature_shape: Sequence[int]) -> nn.Sequential:
    """A convolutional head computing ``classifier`` at every position of a feature map.

    Handles the heads of this package: ``Flatten, Linear, ReLU, Dropout, ...`` (VGG, AlexNet)
    and ``AdaptiveAvgPool2d(1), Flatten, [Dropout,] Linear`` (ResNet). For the latter the
    pooling is dropped and the Linear applied per position: averaging the resulting score map
    gives the same logits, since a linear map commutes with the mean.
    """
    if len(feature_shape) != 3:
        raise ValueError(f"dense evaluation needs a (C, h, w) feature map, got {feature_shape}")
    channels, height, width = (int(v) for v in feature_shape)
    layers: list[nn.Module] = []
    spatial = True  # the next Linear still sees the (C, h, w) map
    for module in classifier.children() if isinstance(classifier, nn.Sequential) else [classifier]:
        if isinstance(module, nn.Flatten):
            continue
        if isinstance(module, nn.AdaptiveAvgPool2d):
            height = width = 1  # pool after the head instead: the score map is averaged
            continue
        if isinstance(module, nn.Linear):
            kernel = (height, width) if spatial else (1, 1)
            layers.append(_conv_like(module, channels, kernel))
            channels, spatial = module.out_features, False
        elif isinstance(module, nn.ReLU | nn.Dropout | nn.Identity):
            layers.append(module)
        else:
            raise ValueError(f"cannot make {type(module).__name__} in the classifier convolutional")
    return nn.Sequential(*layers)


class DenseClassifier(nn.Module):
    """The fully convolutional form of an ``ImageClassifier``, sharing its features."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.features = model.features
        self.head = fc_to_conv(model.classifier, model.feature_shape)

    def score_map(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores at every position: ``(B, classes, h, w)``."""
        return self.head(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits averaged over the score map (paper 5.1)."""
        return self.score_map(x).mean(dim=(2, 3))


def to_dense(model: nn.Module) -> DenseClassifier:
    """Fully convolutional copy of ``model`` for dense evaluation (eval mode, same device)."""
    return DenseClassifier(model).eval()
