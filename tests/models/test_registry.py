"""Registry behaviour and properties every own model must have."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deepimage.models import (
    ImageClassifier,
    UnknownModelError,
    get_model,
    list_models,
    register_model,
)
from deepimage.models import registry as registry_mod
from deepimage.models.airbench import CIFAR10_MEAN, CIFAR10_STD
from deepimage.models.common import IMAGENET_MEAN, IMAGENET_STD

from .helpers import build, make_input

OWN = ["airbench94", "alexnet", "resnet18", "vgg16_deepimage", "vgg19_deepimage"]
# Small, fast configurations of every own model.
SMALL: dict[str, dict] = {
    "airbench94": {"image_size": 32, "width": 1 / 8},
    "alexnet": {"image_size": 64, "width": 1 / 16},
    "resnet18": {"image_size": 32, "width": 1 / 8},
    "vgg16_deepimage": {"image_size": 32, "width": 1 / 16},
    "vgg19_deepimage": {"image_size": 64, "width": 1 / 16},
}


def test_own_models_listed_first_and_sorted() -> None:
    assert list_models(external=False) == OWN
    assert list_models()[: len(OWN)] == OWN
    assert set(SMALL) == set(OWN)


def test_list_models_external_names_and_pattern() -> None:
    names = list_models()
    assert "tv:resnet50" in names and "tv:mobilenet_v3_small" in names
    assert not any(n.startswith("tv:") and ("fasterrcnn" in n or "r3d" in n) for n in names)
    assert list_models("vgg*") == ["vgg16_deepimage", "vgg19_deepimage"]
    assert list_models("tv:resnet1*") == ["tv:resnet101", "tv:resnet152", "tv:resnet18"]


@pytest.mark.parametrize("name", OWN)
def test_forward_shapes_and_split_compose(name: str) -> None:
    cfg = SMALL[name]
    model = build(name, 7, **cfg).eval()
    assert isinstance(model, ImageClassifier)
    assert (model.name, model.num_classes, model.image_size) == (name, 7, cfg["image_size"])
    x = make_input(cfg["image_size"], n=3)
    with torch.no_grad():
        feats = model.features(x)
        logits = model(x)
        composed = model.classifier(feats)
    assert tuple(feats.shape) == (3, *model.feature_shape)
    assert len(model.feature_shape) == 3 and model.feature_shape[1] == model.feature_shape[2]
    assert logits.shape == (3, 7)
    assert torch.equal(logits, composed)
    features, classifier = model.split()
    assert features is model.features and classifier is model.classifier


@pytest.mark.parametrize("name", OWN)
def test_backward_reaches_every_parameter(name: str) -> None:
    cfg = SMALL[name]
    model = build(name, 5, **cfg).train()
    x = make_input(cfg["image_size"], n=4)
    loss = nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    for pname, p in model.named_parameters():
        if not p.requires_grad:  # fixed by design (airbench94's batch-norm scales)
            continue
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("name", OWN)
def test_channels_last_matches_contiguous(name: str) -> None:
    cfg = SMALL[name]
    model = build(name, 4, **cfg).eval()
    x = make_input(cfg["image_size"])
    with torch.no_grad():
        ref = model(x)
        out = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", OWN)
def test_construction_is_deterministic_under_a_seed(name: str) -> None:
    a = build(name, 3, seed=1, **SMALL[name]).state_dict()
    b = build(name, 3, seed=1, **SMALL[name]).state_dict()
    c = build(name, 3, seed=2, **SMALL[name]).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("name", OWN)
def test_normalisation_constants(name: str) -> None:
    model = build(name, 2, **SMALL[name])
    if name == "airbench94":  # CIFAR-10's own statistics
        assert model.mean == CIFAR10_MEAN and model.std == CIFAR10_STD
    else:
        assert model.mean == IMAGENET_MEAN and model.std == IMAGENET_STD
    assert all(isinstance(v, float) for v in (*model.mean, *model.std))


def test_duplicate_registration_rejected() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_model("vgg16_deepimage")(lambda n, **kw: None)
    with pytest.raises(ValueError, match="':'"):
        register_model("tv:mine")


def test_custom_registration_builds_through_get_model(monkeypatch) -> None:
    monkeypatch.setattr(registry_mod, "_REGISTRY", dict(registry_mod._REGISTRY))

    @register_model("tiny_linear")
    def tiny(num_classes: int, *, image_size: int, width: float, dropout, **kw) -> ImageClassifier:
        return ImageClassifier(
            nn.AdaptiveAvgPool2d(1),
            nn.Sequential(nn.Flatten(1), nn.Linear(3, num_classes)),
            name="tiny_linear",
            num_classes=num_classes,
            image_size=image_size,
        )

    model = get_model("tiny_linear", 4, image_size=40)
    assert model.feature_shape == (3, 1, 1)  # probed, not given
    assert "tiny_linear" in list_models(external=False)
    with pytest.raises(ValueError, match="already registered"):
        register_model("tiny_linear")(tiny)


@pytest.mark.parametrize(
    ("name", "suggestion"),
    [
        ("vgg16", "vgg16_deepimage"),
        ("alexnett", "alexnet"),
        ("resnet50", "tv:resnet50"),
        ("tv:resnt50", "tv:resnet50"),
    ],
)
def test_unknown_name_lists_close_matches(name: str, suggestion: str) -> None:
    with pytest.raises(UnknownModelError, match="did you mean") as info:
        get_model(name, 10)
    assert suggestion in str(info.value)
    assert isinstance(info.value, ValueError)


def test_unknown_name_without_matches_still_lists_own_models() -> None:
    with pytest.raises(UnknownModelError) as info:
        get_model("qqqqqq", 10)
    msg = str(info.value)
    assert "did you mean" not in msg
    assert all(n in msg for n in OWN) and "tv:" in msg


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_classes": 0}, "num_classes"),
        ({"num_classes": 3, "width": 0.0}, "width"),
        ({"num_classes": 3, "image_size": 0}, "image_size"),
        ({"num_classes": 3, "dropout": 1.0}, "dropout"),
    ],
)
def test_invalid_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        get_model("vgg16_deepimage", **{"image_size": 32, "width": 1 / 16, **kwargs})


@pytest.mark.parametrize("name", ["alexnet", "vgg16_deepimage", "vgg19_deepimage"])
def test_dropout_ratio_default_and_override(name: str) -> None:
    default = build(name, 3, **SMALL[name])
    assert [m.p for m in default.modules() if isinstance(m, nn.Dropout)] == [0.5, 0.5]
    custom = build(name, 3, dropout=0.2, **SMALL[name])
    assert [m.p for m in custom.modules() if isinstance(m, nn.Dropout)] == [0.2, 0.2]


def test_unknown_option_rejected() -> None:
    with pytest.raises(TypeError, match="bogus"):
        get_model("alexnet", 3, image_size=64, bogus=1)
    with pytest.raises(TypeError, match="bogus"):
        get_model("vgg16_deepimage", 3, image_size=32, bogus=1)
