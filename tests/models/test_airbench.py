"""airbench94 and its patch-whitening first layer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deepimage.models import get_model
from deepimage.models.common import WhiteningConv, init_from_data, needs_data_init


def correlated_images(n: int = 64, size: int = 12, seed: int = 0) -> torch.Tensor:
    """Smooth, colour-correlated images: their 2x2 patches are far from white."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 1, size // 2, size // 2, generator=g)
    x = nn.functional.interpolate(base, size=size, mode="bilinear", align_corners=False)
    x = x.repeat(1, 3, 1, 1) + 0.3 * torch.randn(n, 3, size, size, generator=g)
    return x * torch.tensor([1.0, 2.0, 0.5])[None, :, None, None] + 0.2


def test_whitening_outputs_have_identity_second_moment():
    x = correlated_images()
    conv = WhiteningConv(3, kernel_size=2, eps=0.0)
    conv.init_from_data([x])
    with torch.no_grad():
        y = nn.functional.conv2d(x.double(), conv.weight.double())  # bias-free outputs
    half = y[:, : conv.out_channels // 2].permute(0, 2, 3, 1).reshape(-1, 12)
    moment = half.T @ half / len(half)
    torch.testing.assert_close(moment, torch.eye(12, dtype=torch.float64), atol=1e-4, rtol=0)
    # the second half is the negation of the first, the bias zero
    torch.testing.assert_close(conv.weight[12:], -conv.weight[:12])
    assert torch.equal(conv.bias, torch.zeros(24))


def test_whitening_does_not_depend_on_the_batching():
    x = correlated_images(n=60)
    a, b = WhiteningConv(), WhiteningConv()
    a.init_from_data([x])
    b.init_from_data([x[:7], x[7:31], x[31:]])
    torch.testing.assert_close(a.weight, b.weight, rtol=1e-5, atol=1e-6)
    # each filter's largest component is positive: no sign left to chance
    w = a.weight[:12].reshape(12, -1)
    assert (w.gather(1, w.abs().argmax(1, keepdim=True)) > 0).all()


def test_airbench94_shapes_hook_and_frozen_norm_scales():
    model = get_model("airbench94", 10, image_size=32)
    assert needs_data_init(model) and not needs_data_init(get_model("resnet18", 10, width=0.125))
    assert isinstance(model.features[0], WhiteningConv) and model.features[0].out_channels == 24
    before = model.features[0].weight.clone()
    init_from_data(model, [correlated_images(8, 32)])
    assert not torch.equal(before, model.features[0].weight)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 6 and all(not m.weight.requires_grad and m.bias.requires_grad for m in bns)
    widths = [m.out_channels for m in model.modules() if type(m) is nn.Conv2d]
    assert widths == [64, 64, 256, 256, 256, 256]
    with pytest.raises(ValueError, match="one WhiteningConv"):
        init_from_data(get_model("resnet18", 10, width=0.125), [correlated_images(2, 32)])
