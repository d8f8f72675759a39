"""The common :class:`ImageClassifier` wrapper: a feature extractor and a classifier head."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from .common import IMAGENET_MEAN, IMAGENET_STD

logger = logging.getLogger(__name__)


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
