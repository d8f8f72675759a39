"""Image classification models: deepimage's own (VGG-style, AlexNet, ResNet-18, airbench94)
and wrapped torchvision/timm models, all built by name through :func:`get_model`."""

from . import airbench as _airbench  # noqa: F401  (registers "airbench94")
from . import alexnet as _alexnet  # noqa: F401  (registers "alexnet")
from . import resnet as _resnet  # noqa: F401  (registers "resnet18")
from . import vgg as _vgg  # noqa: F401  (registers the VGG models)
from .classifier import ImageClassifier
from .registry import (
    UnknownModelError,
    get_model,
    list_models,
    register_model,
)

__all__ = ["ImageClassifier", "UnknownModelError", "get_model", "list_models", "register_model"]
