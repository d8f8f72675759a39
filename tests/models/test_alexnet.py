"""AlexNet: layer layout, feature-map arithmetic and parameter counts."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from deepimage.models import get_model
from deepimage.models.alexnet import MIN_IMAGE_SIZE, feature_size
from deepimage.models.common import KeyedDropout

from .helpers import build, count, make_input, n_params


def test_layer_layout() -> None:
    model = build("alexnet", 10, image_size=224, width=1 / 16)
    assert count(model.features, nn.Conv2d) == 5
    assert count(model.classifier, nn.Linear) == 3
    kinds = [type(m).__name__ for m in model.features]
    assert kinds == [
        "Conv2d", "ReLU", "LocalResponseNorm", "MaxPool2d",
        "Conv2d", "ReLU", "LocalResponseNorm", "MaxPool2d",
        "Conv2d", "ReLU", "Conv2d", "ReLU", "Conv2d", "ReLU", "MaxPool2d",
    ]  # fmt: skip
    for lrn in (m for m in model.features if isinstance(m, nn.LocalResponseNorm)):
        assert (lrn.size, lrn.alpha, lrn.beta, lrn.k) == (5, 1e-4, 0.75, 2.0)
    for pool in (m for m in model.features if isinstance(m, nn.MaxPool2d)):
        assert (pool.kernel_size, pool.stride) == (3, 2)  # overlapping
    kinds = [type(m) for m in model.classifier]
    assert kinds == [
        nn.Flatten, nn.Linear, nn.ReLU, KeyedDropout, nn.Linear, nn.ReLU, KeyedDropout, nn.Linear,
    ]  # fmt: skip
    assert [m.p for m in model.classifier if isinstance(m, nn.Dropout)] == [0.5, 0.5]


def test_full_size_feature_map_and_parameters() -> None:
    with torch.device("meta"):
        model = get_model("alexnet", 1000, image_size=224)
        feats = model.features(torch.empty(1, 3, 224, 224))
        reference = torchvision.models.alexnet(weights=None)
    assert model.feature_shape == tuple(feats.shape[1:]) == (256, 6, 6)
    channels = [m.out_channels for m in model.features if isinstance(m, nn.Conv2d)]
    assert channels == [96, 256, 384, 384, 256]
    # single-tower paper model: 62.4M parameters
    assert n_params(model) == 62_378_344
    # the fully-connected part is identical to torchvision's
    assert n_params(model.classifier) == n_params(reference.classifier) == 58_631_144
    with torch.device("meta"):
        tv_feats = reference.features(torch.empty(1, 3, 224, 224))
    assert tv_feats.shape[1:] == feats.shape[1:]


@pytest.mark.parametrize("size", [56, 64])
def test_small_inputs_work(size: int) -> None:
    model = build("alexnet", 6, image_size=size, width=1 / 16).eval()
    assert model.feature_shape[1] >= 1
    with torch.no_grad():
        feats = model.features(make_input(size))
        assert model.classifier(feats).shape == (2, 6)
    assert tuple(feats.shape[1:]) == model.feature_shape


def test_analytic_feature_size_matches_forward() -> None:
    with torch.device("meta"):
        trunk = get_model("alexnet", 2, image_size=224, width=1 / 16).features
        for size in range(MIN_IMAGE_SIZE, 300):
            out = trunk(torch.empty(1, 3, size, size))
            assert out.shape[-1] == feature_size(size), size
    # and on real tensors, for a few sizes
    trunk = build("alexnet", 2, image_size=224, width=1 / 16).features
    for size in (MIN_IMAGE_SIZE, 67, 99, 227):
        with torch.no_grad():
            assert trunk(make_input(size, n=1)).shape[-1] == feature_size(size)


def test_too_small_input_is_rejected_clearly() -> None:
    assert feature_size(MIN_IMAGE_SIZE - 1) == 0
    with pytest.raises(ValueError, match=f">= {MIN_IMAGE_SIZE}"):
        get_model("alexnet", 10, image_size=32)


def test_width_scales_convs_and_fc() -> None:
    model = build("alexnet", 10, image_size=64, width=0.25)
    channels = [m.out_channels for m in model.features if isinstance(m, nn.Conv2d)]
    assert channels == [24, 64, 96, 96, 64]
    assert model.classifier[1].out_features == 1024
    assert model.classifier[1].in_features == 64 * 1 * 1
