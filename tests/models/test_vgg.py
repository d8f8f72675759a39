"""The paper's VGG-style models: layer layout, widths, sizes and parameter counts."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import nn

from deepimage.models import get_model
from deepimage.models.common import KeyedDropout
from deepimage.models.vgg import cfgs, make_layers

from .helpers import build, count, make_input, n_params


@pytest.mark.parametrize(("name", "convs"), [("vgg16_deepimage", 13), ("vgg19_deepimage", 16)])
def test_weight_layer_counts(name: str, convs: int) -> None:
    model = build(name, 10, image_size=32, width=1 / 16)
    assert count(model.features, nn.Conv2d) == convs
    assert count(model.features, nn.Linear) == 0
    assert count(model.classifier, nn.Linear) == 3
    assert count(model, (nn.Conv2d, nn.Linear)) == convs + 3
    # ReLU after every weight layer but the last
    assert count(model, nn.ReLU) == convs + 2


@pytest.mark.parametrize("name", ["vgg16_deepimage", "vgg19_deepimage"])
def test_layer_hyperparameters(name: str) -> None:
    model = build(name, 10, image_size=64, width=1 / 16)
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert all(
        c.kernel_size == (3, 3) and c.padding == (1, 1) and c.stride == (1, 1) for c in convs
    )
    pools = [m for m in model.features if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 5 and all(p.kernel_size == 2 and p.stride == 2 for p in pools)
    head = list(model.classifier)
    kinds = [type(m) for m in head]
    assert kinds == [
        nn.Flatten,
        nn.Linear,
        nn.ReLU,
        KeyedDropout,
        nn.Linear,
        nn.ReLU,
        KeyedDropout,
        nn.Linear,
    ]
    assert head[3].p == head[6].p == 0.5


def test_width_scales_convs_and_fc() -> None:
    model = build("vgg16_deepimage", 10, image_size=64, width=1 / 16)
    widths = [m.out_channels for m in model.features if isinstance(m, nn.Conv2d)]
    expected = [v // 16 for v in cfgs["D"] if v != "M"]
    assert widths == expected
    fc1, fc2, fc3 = (m for m in model.classifier if isinstance(m, nn.Linear))
    assert fc1.in_features == 32 * 2 * 2 and fc1.out_features == 256
    assert (fc2.in_features, fc2.out_features) == (256, 256)
    assert (fc3.in_features, fc3.out_features) == (256, 10)
    assert model.feature_shape == (32, 2, 2)


def test_width_never_drops_below_one_channel() -> None:
    layers = make_layers(cfgs["D"], width=1e-4)
    assert {m.out_channels for m in layers if isinstance(m, nn.Conv2d)} == {1}


def test_tiny_vgg_is_tiny_and_runs() -> None:
    model = build("vgg16_deepimage", 10, image_size=32, width=1 / 16).eval()
    assert n_params(model) < 200_000
    with torch.no_grad():
        assert model(make_input(32)).shape == (2, 10)


@pytest.mark.parametrize("size", [32, 64, 96, 224])
def test_feature_map_is_image_size_over_32(size: int) -> None:
    with torch.device("meta"):
        model = get_model("vgg19_deepimage", 5, image_size=size, width=1 / 16)
        out = model.features(torch.empty(1, 3, size, size))
    assert tuple(out.shape[1:]) == model.feature_shape == (32, size // 32, size // 32)
    assert model.classifier[1].in_features == math.prod(model.feature_shape)


@pytest.mark.parametrize("size", [31, 48, 100, 16])
def test_image_size_must_be_multiple_of_32(size: int) -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        get_model("vgg16_deepimage", 10, image_size=size, width=1 / 16)


def test_batch_norm_option() -> None:
    model = build("vgg19_deepimage", 10, image_size=32, width=1 / 16, batch_norm=True)
    assert count(model, nn.BatchNorm2d) == 16
    assert count(build("vgg19_deepimage", 10, image_size=32, width=1 / 16), nn.BatchNorm2d) == 0


@pytest.mark.parametrize(
    ("name", "tv_name", "expected"),
    [("vgg16_deepimage", "vgg16", 138_357_544), ("vgg19_deepimage", "vgg19", 143_667_240)],
)
def test_full_size_parameter_count_matches_torchvision(
    name: str, tv_name: str, expected: int
) -> None:
    with torch.device("meta"):
        ours = get_model(name, 1000, image_size=224)
        theirs = torchvision.models.get_model(tv_name, weights=None)
    assert n_params(ours) == n_params(theirs) == expected
    assert ours.feature_shape == (512, 7, 7)
    ours_shapes = [tuple(p.shape) for p in ours.parameters()]
    assert ours_shapes == [tuple(p.shape) for p in theirs.parameters()]


def test_torchvision_style_initialisation() -> None:
    model = build("vgg16_deepimage", 10, image_size=32, width=1 / 4)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            assert torch.count_nonzero(m.bias) == 0
            fan_out = m.out_channels * 9
            std = math.sqrt(2.0 / fan_out)
            assert m.weight.std().item() == pytest.approx(std, rel=0.15)
        elif isinstance(m, nn.Linear):
            assert torch.count_nonzero(m.bias) == 0
            assert m.weight.std().item() == pytest.approx(0.01, rel=0.1)
