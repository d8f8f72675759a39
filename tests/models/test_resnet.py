"""ResNet-18: equivalence with torchvision's model and the width option."""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from deepimage.models import get_model

from .helpers import build, count, make_input, n_params


def _to_torchvision_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        part, _, rest = key.partition(".")
        if part == "features":
            out[rest] = value
        else:
            out["fc." + rest.partition(".")[2]] = value
    return out


def test_same_weights_give_torchvision_outputs() -> None:
    ours = build("resnet18", 10, image_size=64).eval()
    reference = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    reference.load_state_dict(_to_torchvision_keys(ours.state_dict()), strict=True)
    x = make_input(64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), rtol=1e-5, atol=1e-5)
    assert ours.feature_shape == (512, 2, 2)


def test_full_size_parameter_count() -> None:
    with torch.device("meta"):
        model = get_model("resnet18", 1000)
    assert n_params(model) == 11_689_512
    assert model.feature_shape == (512, 7, 7)


def test_width_keeps_structure_and_names() -> None:
    full = build("resnet18", 10, image_size=32)
    small = build("resnet18", 10, image_size=32, width=1 / 8)
    assert full.state_dict().keys() == small.state_dict().keys()
    assert small.feature_shape == (64, 1, 1)
    assert n_params(small) < n_params(full) / 40
    assert small.features.conv1.out_channels == 8


def test_dropout_option_adds_dropout_before_fc() -> None:
    assert count(build("resnet18", 3, image_size=32, width=1 / 8), nn.Dropout) == 0
    model = build("resnet18", 3, image_size=32, width=1 / 8, dropout=0.3)
    assert isinstance(model.classifier[-2], nn.Dropout) and model.classifier[-2].p == 0.3
