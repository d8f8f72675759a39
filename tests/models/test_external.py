"""Wrapped torchvision and timm models."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from deepimage.models import ImageClassifier, UnknownModelError, get_model, list_models
from deepimage.models.external import split_timm, timm_available, wrap_torchvision

from .helpers import build, make_input, n_params

# One small model per family, with a size it accepts.
TORCHVISION_CASES = [
    ("mobilenet_v3_small", 64),
    ("squeezenet1_1", 64),
    ("shufflenet_v2_x0_5", 64),
    ("mnasnet0_5", 64),
    ("regnet_x_400mf", 64),
    ("googlenet", 64),
]


@pytest.mark.parametrize(("name", "size"), TORCHVISION_CASES)
def test_torchvision_split_matches_original_forward(name: str, size: int) -> None:
    kwargs = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        original = torchvision.models.get_model(name, weights=None, num_classes=5, **kwargs)
    wrapped = wrap_torchvision(
        copy.deepcopy(original), name=f"tv:{name}", num_classes=5, image_size=size
    )
    original.eval()
    wrapped.eval()
    x = make_input(size)
    with torch.no_grad():
        expected = original(x)
        feats = wrapped.features(x)
        torch.testing.assert_close(wrapped.classifier(feats), expected, rtol=1e-5, atol=1e-5)
    assert tuple(feats.shape[1:]) == wrapped.feature_shape
    assert n_params(wrapped) == n_params(original)


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("tv:convnext_tiny", (768, 2, 2)),
        ("tv:densenet121", (1024, 2, 2)),
        ("tv:efficientnet_b0", (1280, 2, 2)),
        ("tv:swin_t", (768, 2, 2)),
        ("tv:vgg11_bn", (512, 2, 2)),
        ("tv:wide_resnet50_2", (2048, 2, 2)),
        ("tv:vit_b_16", (768,)),
    ],
)
def test_torchvision_families_on_meta_device(name: str, shape: tuple[int, ...]) -> None:
    with torch.device("meta"):
        model = get_model(name, 9, image_size=64)
        logits = model.classifier(model.features(torch.empty(2, 3, 64, 64)))
    assert model.feature_shape == shape
    assert logits.shape == (2, 9)


def test_get_model_torchvision_by_name() -> None:
    model = build("tv:mobilenet_v3_small", 4, image_size=64).train()
    assert isinstance(model, ImageClassifier) and model.name == "tv:mobilenet_v3_small"
    assert model.feature_shape == (576, 2, 2)
    out = model(make_input(64))
    out.sum().backward()
    assert out.shape == (2, 4)
    assert all(p.grad is not None for p in model.parameters())


def test_torchvision_dropout_passed_only_when_given() -> None:
    default = build("tv:mobilenet_v3_small", 4, image_size=64)
    assert [m.p for m in default.modules() if isinstance(m, nn.Dropout)] == [0.2]
    custom = build("tv:mobilenet_v3_small", 4, image_size=64, dropout=0.4)
    assert [m.p for m in custom.modules() if isinstance(m, nn.Dropout)] == [0.4]


def test_external_rejects_weights_width_and_bad_sizes() -> None:
    with pytest.raises(ValueError, match="pretrained"):
        get_model("tv:resnet18", 3, weights="DEFAULT")
    with pytest.raises(ValueError, match="width"):
        get_model("tv:resnet18", 3, width=0.5)
    with pytest.raises(ValueError, match="32x32"):
        get_model("tv:inception_v3", 3, image_size=32)
    with pytest.raises(UnknownModelError, match="tv:resnet50"):
        get_model("tv:resnet5O", 3)


timm_only = pytest.mark.skipif(not timm_available(), reason="timm not installed")


@timm_only
def test_timm_names_listed() -> None:
    names = list_models("timm:*")
    assert "timm:resnet18" in names and "timm:vit_tiny_patch16_224" in names


@timm_only
def test_timm_convnet_split_matches_original() -> None:
    import timm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        original = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=6)
    features, classifier = split_timm(copy.deepcopy(original))
    model = ImageClassifier(
        features, classifier, name="timm:mobilenetv3_small_050", num_classes=6, image_size=64
    )
    original.eval()
    model.eval()
    x = make_input(64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x), rtol=1e-5, atol=1e-5)
    # the classifier owns exactly the final layer; no parameter has two owners
    assert n_params(model.classifier) == n_params(original.get_classifier())
    assert n_params(model) == n_params(original)
    ptrs = [t.data_ptr() for t in model.state_dict().values() if t.numel()]
    assert len(ptrs) == len(set(ptrs))


@timm_only
def test_timm_vit_by_name_at_small_size() -> None:
    model = build("timm:vit_tiny_patch16_224", 3, image_size=32)
    assert model.feature_shape == (5, 192)  # class token + 2x2 patches
    assert model.mean == (0.5, 0.5, 0.5) and model.std == (0.5, 0.5, 0.5)
    out = model(make_input(32))
    assert out.shape == (2, 3)
    out.sum().backward()
    clone = copy.deepcopy(model)
    assert clone.classifier[0]._model is clone.features.model
    with torch.no_grad():
        model.eval()
        clone.eval()
        torch.testing.assert_close(clone(make_input(32)), model(make_input(32)))


@timm_only
def test_timm_pretrained_rejected() -> None:
    with pytest.raises(ValueError, match="pretrained"):
        get_model("timm:resnet18", 3, pretrained=True)
