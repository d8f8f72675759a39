"""Model registry and the common :class:`ImageClassifier` wrapper.

Names understood by :func:`get_model`:

* deepimage's own models, registered with :func:`register_model`: ``vgg16_deepimage``,
  ``vgg19_deepimage``, ``alexnet``, ``resnet18``;
* ``tv:<name>``: any torchvision classification model, e.g. ``tv:resnet50``,
  ``tv:mobilenet_v3_small`` (always randomly initialised);
* ``timm:<name>``: any timm model when timm is installed, e.g. ``timm:convnext_nano``.

Unprefixed names are only ever deepimage's own models, so a name always means one thing; an
unknown name raises :class:`UnknownModelError` listing close matches (``resnet50`` suggests
``tv:resnet50``).
"""

from __future__ import annotations

import difflib
import fnmatch
import logging
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .common import IMAGENET_MEAN, IMAGENET_STD

logger = logging.getLogger(__name__)

TORCHVISION_PREFIX = "tv:"
TIMM_PREFIX = "timm:"

ModelBuilder = Callable[..., "ImageClassifier"]
_REGISTRY: dict[str, ModelBuilder] = {}


class UnknownModelError(ValueError):
    """Raised by :func:`get_model` for a name that is neither registered nor external."""


class ImageClassifier(nn.Module):
    """An image classifier split into a feature extractor and a classifier head.

    ``forward(x) == classifier(features(x))``. The split lets training and evaluation code treat
    the convolutional trunk and the head separately (dense evaluation, fine-tuning, feature dumps).

    Attributes:
        name: registry name the model was built from.
        num_classes: number of output logits.
        image_size: input side length the model was built for.
        feature_shape: shape of one sample's ``features`` output at ``image_size``, ``(C, k, k)``
            for convolutional trunks (other layouts for models whose trunk does not end in a
            feature map, e.g. pooled ``(C,)`` or tokens ``(N, C)``).
        mean, std: per-channel RGB normalisation constants (0..1 pixel scale) for preprocessing.
    """

    def __init__(
        self,
        features: nn.Module,
        classifier: nn.Module,
        *,
        name: str,
        num_classes: int,
        image_size: int,
        feature_shape: Sequence[int] | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        self.features = features
        self.classifier = classifier
        self.name = name
        self.num_classes = int(num_classes)
        self.image_size = int(image_size)
        self.mean: tuple[float, ...] = tuple(float(v) for v in mean)
        self.std: tuple[float, ...] = tuple(float(v) for v in std)
        if feature_shape is None:
            feature_shape = probe_feature_shape(features, image_size)
        self.feature_shape: tuple[int, ...] = tuple(int(v) for v in feature_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def split(self) -> tuple[nn.Module, nn.Module]:
        """Return ``(features, classifier)``; composing them gives :meth:`forward`."""
        return self.features, self.classifier

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, num_classes={self.num_classes}, image_size={self.image_size}, "
            f"feature_shape={self.feature_shape}"
        )


def probe_feature_shape(features: nn.Module, image_size: int) -> tuple[int, ...]:
    """Shape of one sample's ``features`` output for a square RGB input of ``image_size``.

    Runs the module on the meta device (no memory, no compute) with meta stand-ins for its
    parameters and buffers; falls back to a real batch-of-one forward (on the parameters'
    device) for modules with operations the meta device cannot run. The module's train/eval
    mode is restored.
    """
    from torch.func import functional_call

    was_training = features.training
    features.eval()
    try:
        try:
            state = {
                name: torch.empty_like(t, device="meta")
                for name, t in (*features.named_parameters(), *features.named_buffers())
            }
            x = torch.empty(2, 3, image_size, image_size, device="meta")
            with torch.no_grad():
                out = functional_call(features, state, (x,), strict=False)
        except (RuntimeError, NotImplementedError, TypeError) as exc:
            logger.debug("meta probe failed (%s); probing with a real forward", exc)
            param = next(features.parameters(), None)
            device = param.device if param is not None else torch.device("cpu")
            x = torch.zeros(1, 3, image_size, image_size, device=device)
            with torch.no_grad():
                out = features(x)
    finally:
        features.train(was_training)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"features must return a tensor, got {type(out).__name__}")
    return tuple(out.shape[1:])


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator registering a builder ``fn(num_classes, *, image_size, width, dropout, **kw)``.

    Names must be new, unprefixed and without ``:`` (the prefixes belong to external models).
    """
    if not name or ":" in name:
        raise ValueError(f"invalid model name {name!r}: must be non-empty and contain no ':'")

    def decorator(fn: ModelBuilder) -> ModelBuilder:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return decorator


def list_models(pattern: str | None = None, *, external: bool = True) -> list[str]:
    """Names accepted by :func:`get_model`: own models first, then ``tv:`` and ``timm:`` ones.

    Args:
        pattern: optional shell-style filter, e.g. ``"tv:resnet*"``.
        external: include torchvision and (if installed) timm models.
    """
    names = sorted(_REGISTRY)
    if external:
        from . import external as ext

        names += [TORCHVISION_PREFIX + n for n in ext.torchvision_model_names()]
        names += [TIMM_PREFIX + n for n in ext.timm_model_names()]
    if pattern is not None:
        names = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
    return names


def get_model(
    name: str,
    num_classes: int,
    *,
    image_size: int = 224,
    width: float = 1.0,
    dropout: float | None = None,
    **kwargs: object,
) -> ImageClassifier:
    """Build a randomly initialised model by name (see the module docstring for names).

    Args:
        num_classes: number of output classes.
        image_size: square input side the model is built for (sets ``feature_shape``; VGG needs
            a multiple of 32).
        width: multiplier for channel and fully-connected widths of deepimage's own models
            (e.g. ``1/16`` for tiny test nets); external models accept only ``1.0``.
        dropout: dropout ratio of the classifier; ``None`` keeps the model's default
            (0.5 for deepimage's own models, the library default for external ones).
        kwargs: extra model-specific options (e.g. ``batch_norm=True`` for VGG), passed on to
            torchvision/timm constructors for external models.

    Raises:
        UnknownModelError: for an unknown name, listing close matches.
        ValueError: for invalid sizes or options.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    if width <= 0:
        raise ValueError(f"width must be > 0, got {width}")
    if name in _REGISTRY:
        model = _REGISTRY[name](
            num_classes, image_size=image_size, width=width, dropout=dropout, **kwargs
        )
    elif name.startswith((TORCHVISION_PREFIX, TIMM_PREFIX)):
        from . import external as ext

        prefix, _, bare = name.partition(":")
        if width != 1.0:
            raise ValueError(f"{name}: width multipliers apply to deepimage's own models only")
        if prefix + ":" == TORCHVISION_PREFIX:
            if bare not in ext.torchvision_model_names():
                raise _unknown(name)
            model = ext.torchvision_classifier(
                bare, num_classes, image_size=image_size, dropout=dropout, **kwargs
            )
        else:
            if not ext.timm_available():
                raise ImportError(f"{name}: timm is not installed (pip install 'deepimage[timm]')")
            if bare not in ext.timm_model_names():
                raise _unknown(name)
            model = ext.timm_classifier(
                bare, num_classes, image_size=image_size, dropout=dropout, **kwargs
            )
    else:
        raise _unknown(name)
    logger.debug(
        "built %s: %d classes, image size %d, feature shape %s, %d parameters",
        name,
        num_classes,
        image_size,
        model.feature_shape,
        sum(p.numel() for p in model.parameters()),
    )
    return model


def _unknown(name: str) -> UnknownModelError:
    """Error for an unknown name, suggesting close matches (also ignoring the prefix)."""
    candidates: dict[str, str] = {}
    for full in list_models():
        candidates.setdefault(full, full)
        candidates.setdefault(full.partition(":")[2] or full, full)
    own = sorted(n for n in _REGISTRY if name in n or n in name)
    own += difflib.get_close_matches(name, list(_REGISTRY), n=4, cutoff=0.5)
    keys = difflib.get_close_matches(name, candidates, n=8, cutoff=0.6)
    bare = name.partition(":")[2]
    if bare:
        keys += difflib.get_close_matches(bare, candidates, n=8, cutoff=0.6)
    matches = list(dict.fromkeys([*own, *(candidates[k] for k in keys)]))[:6]
    hint = f"; did you mean: {', '.join(matches)}?" if matches else ""
    return UnknownModelError(
        f"unknown model {name!r}{hint} (own models: {', '.join(sorted(_REGISTRY))}; "
        f"external: '{TORCHVISION_PREFIX}<torchvision name>', '{TIMM_PREFIX}<timm name>')"
    )
