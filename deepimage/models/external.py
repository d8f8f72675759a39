"""torchvision and timm models wrapped as :class:`ImageClassifier` (always randomly initialised).

Registry names: ``tv:<name>`` for ``torchvision.models`` classification models and
``timm:<name>`` for timm models (when timm is installed); see :func:`get_model`.

Splitting into ``features`` and ``classifier``:

* torchvision families with a known layout (ResNet/ResNeXt/Wide-ResNet, VGG, AlexNet,
  MobileNet v2/v3, EfficientNet, DenseNet, ConvNeXt, RegNet, SqueezeNet, ShuffleNet v2, MNASNet,
  Swin, MaxViT): ``features`` ends at the last feature map ``(C, h, w)``; ``classifier`` holds the
  global pooling and the head.
* other torchvision models (GoogLeNet, Inception v3, ViT): the final linear layer is the
  classifier and ``features`` is the rest of the network, returning pooled ``(C,)`` vectors.
* timm: ``features`` runs ``forward_features`` and ``classifier`` runs ``forward_head`` followed
  by the final layer from ``get_classifier()``. The head's pooling/norm modules stay registered
  under ``features`` (one owner per parameter), so ``classifier.parameters()`` is the final layer.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision import models as tvm

from .classifier import ImageClassifier
from .common import IMAGENET_MEAN, IMAGENET_STD, split_resnet

logger = logging.getLogger(__name__)

TORCHVISION_PREFIX = "tv:"
TIMM_PREFIX = "timm:"

_FORBIDDEN = ("weights", "pretrained", "pretrained_cfg_overlay", "checkpoint_path")


@functools.cache
def torchvision_model_names() -> tuple[str, ...]:
    """Sorted torchvision classification model names (no detection/segmentation/video)."""
    return tuple(sorted(torchvision.models.list_models(module=torchvision.models)))


def timm_available() -> bool:
    """Whether timm can be imported."""
    return importlib.util.find_spec("timm") is not None


@functools.cache
def timm_model_names() -> tuple[str, ...]:
    """Sorted timm model names, empty when timm is not installed."""
    if not timm_available():
        return ()
    import timm

    return tuple(sorted(timm.list_models()))


def _reject_weights(name: str, kwargs: dict[str, Any]) -> None:
    bad = [k for k in _FORBIDDEN if kwargs.get(k)]
    if bad:
        raise ValueError(f"{name}: pretrained weights are not supported here ({', '.join(bad)})")
    for k in _FORBIDDEN:
        kwargs.pop(k, None)


def torchvision_classifier(
    name: str,
    num_classes: int,
    *,
    image_size: int = 224,
    dropout: float | None = None,
    **kwargs: Any,
) -> ImageClassifier:
    """Build torchvision model ``name`` (without weights) and wrap it.

    ``dropout`` is passed on only when given and the model has such an option; ``kwargs`` go to
    the torchvision builder. GoogLeNet/Inception v3 are built without auxiliary heads, and
    ViT/MaxViT for ``image_size`` inputs.
    """
    full = TORCHVISION_PREFIX + name
    _reject_weights(full, kwargs)
    if dropout is not None:
        kwargs["dropout"] = dropout
    if name in ("googlenet", "inception_v3"):
        kwargs.setdefault("aux_logits", False)
        kwargs.setdefault("init_weights", True)
    elif name.startswith("vit_"):
        kwargs.setdefault("image_size", image_size)
    elif name.startswith("maxvit"):
        kwargs.setdefault("input_size", (image_size, image_size))
    try:
        model = tvm.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    except TypeError as exc:
        raise ValueError(f"{full}: unsupported options {sorted(kwargs)}: {exc}") from exc
    return wrap_torchvision(model, name=full, num_classes=num_classes, image_size=image_size)


def wrap_torchvision(
    model: nn.Module, *, name: str, num_classes: int, image_size: int
) -> ImageClassifier:
    """Wrap a built torchvision classifier, reusing (and, for the generic case, modifying) its
    modules; ``forward`` of the result equals the original model's forward."""
    features, classifier = split_torchvision(model)
    try:
        return ImageClassifier(
            features, classifier, name=name, num_classes=num_classes, image_size=image_size
        )
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"{name} cannot take {image_size}x{image_size} inputs: {exc}") from exc


def split_torchvision(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """``(features, classifier)`` for a torchvision classification model (see module doc)."""
    flat = nn.Flatten(1)

    def gap() -> nn.Module:
        return nn.AdaptiveAvgPool2d(1)

    if isinstance(model, tvm.ResNet):
        return split_resnet(model)
    if isinstance(model, tvm.VGG | tvm.AlexNet | tvm.MobileNetV3 | tvm.EfficientNet):
        return model.features, nn.Sequential(model.avgpool, flat, *model.classifier)
    if isinstance(model, tvm.MobileNetV2):
        return model.features, nn.Sequential(gap(), flat, *model.classifier)
    if isinstance(model, tvm.DenseNet):
        return (
            nn.Sequential(model.features, nn.ReLU(inplace=True)),
            nn.Sequential(gap(), flat, model.classifier),
        )
    if isinstance(model, tvm.ConvNeXt):
        return model.features, nn.Sequential(model.avgpool, *model.classifier)
    if isinstance(model, tvm.RegNet):
        return nn.Sequential(model.stem, model.trunk_output), nn.Sequential(
            model.avgpool, flat, model.fc
        )
    if isinstance(model, tvm.SqueezeNet):
        return model.features, nn.Sequential(*model.classifier, flat)
    if isinstance(model, tvm.ShuffleNetV2):
        trunk = [model.conv1, model.maxpool, model.stage2, model.stage3, model.stage4, model.conv5]
        return nn.Sequential(*trunk), nn.Sequential(gap(), flat, model.fc)
    if isinstance(model, tvm.MNASNet):
        return model.layers, nn.Sequential(gap(), flat, model.classifier)
    if isinstance(model, tvm.SwinTransformer):
        return (
            nn.Sequential(model.features, model.norm, model.permute),
            nn.Sequential(model.avgpool, model.flatten, model.head),
        )
    if isinstance(model, tvm.MaxVit):
        return nn.Sequential(model.stem, *model.blocks), model.classifier
    return _split_last_linear(model)


def _split_last_linear(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """Generic split: replace the final ``Linear`` (``fc``, ``head``, ``heads`` or ``classifier``,
    possibly the last entry of a ``Sequential``) with ``Identity``. Valid for models whose forward
    ends with that layer."""
    for attr in ("fc", "head", "heads", "classifier"):
        parent = model
        module = getattr(model, attr, None)
        key: str | int = attr
        if isinstance(module, nn.Sequential) and len(module) and isinstance(module[-1], nn.Linear):
            parent, key, module = module, len(module) - 1, module[-1]
        if isinstance(module, nn.Linear):
            if isinstance(key, int):
                parent[key] = nn.Identity()
            else:
                setattr(parent, key, nn.Identity())
            return model, nn.Sequential(module)
    raise ValueError(f"cannot split {type(model).__name__} into features and classifier")


class _TimmFeatures(nn.Module):
    """Runs a timm model's ``forward_features``; owns the model's parameters."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)


class _TimmPool(nn.Module):
    """Runs a timm model's ``forward_head`` (pooling, norm, dropout) with the final layer removed.

    The model is referenced, not registered, so its parameters have a single owner
    (``features``); deep copies and ``.to()`` follow the owner.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "_model", model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._model.forward_head(x)


def timm_classifier(
    name: str,
    num_classes: int,
    *,
    image_size: int = 224,
    dropout: float | None = None,
    **kwargs: Any,
) -> ImageClassifier:
    """Build timm model ``name`` with ``pretrained=False`` and wrap it.

    ``dropout`` maps to timm's ``drop_rate`` when given; models with a fixed input size (ViTs)
    are built for ``image_size``; mean/std come from the model's ``pretrained_cfg``.
    """
    import timm

    full = TIMM_PREFIX + name
    _reject_weights(full, kwargs)
    if dropout is not None:
        kwargs.setdefault("drop_rate", dropout)
    cfg = timm.get_pretrained_cfg(name)
    if cfg is not None and cfg.fixed_input_size and "img_size" not in kwargs:
        kwargs["img_size"] = image_size
    try:
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    except TypeError as exc:
        raise ValueError(f"{full}: unsupported options {sorted(kwargs)}: {exc}") from exc
    features, classifier = split_timm(model)
    pcfg = getattr(model, "pretrained_cfg", None) or {}
    try:
        return ImageClassifier(
            features,
            classifier,
            name=full,
            num_classes=num_classes,
            image_size=image_size,
            mean=pcfg.get("mean", IMAGENET_MEAN),
            std=pcfg.get("std", IMAGENET_STD),
        )
    except (RuntimeError, ValueError, AssertionError) as exc:
        raise ValueError(f"{full} cannot take {image_size}x{image_size} inputs: {exc}") from exc


def split_timm(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """``(features, classifier)`` for a timm model; the final layer is moved to ``classifier``
    when it is a single module, else ``classifier`` is the whole ``forward_head``."""
    final = model.get_classifier()
    path = None
    if isinstance(final, nn.Module) and not isinstance(final, nn.Identity):
        path = next((n for n, m in model.named_modules() if m is final and n), None)
    if path is None:
        logger.warning("%s: final layer not found; classifier is the whole head", type(model))
        return _TimmFeatures(model), _TimmPool(model)
    parent_name, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, nn.Identity())
    return _TimmFeatures(model), nn.Sequential(_TimmPool(model), final)
