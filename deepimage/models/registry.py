"""Model registry: deepimage's own models by name, and torchvision/timm models by prefix.

Names understood by :func:`get_model`:

* deepimage's own models, registered with :func:`register_model`: ``vgg16_deepimage``,
  ``vgg19_deepimage``, ``alexnet``, ``resnet18``, ``airbench94``;
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
from collections.abc import Callable

from . import external as ext
from .classifier import ImageClassifier
from .external import TIMM_PREFIX, TORCHVISION_PREFIX

logger = logging.getLogger(__name__)

ModelBuilder = Callable[..., ImageClassifier]
_REGISTRY: dict[str, ModelBuilder] = {}


class UnknownModelError(ValueError):
    """Raised by :func:`get_model` for a name that is neither registered nor external."""


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
