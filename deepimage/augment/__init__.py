"""The paper's augmentations (section 4.1, Table 1): sample parameters, then apply them.

``build_train_augment(preset, ...)`` is what training calls; :class:`AugmentConfig` holds every
probability and range; :mod:`~deepimage.augment.ops` the pure functions; ``table`` Table 1.
"""

from deepimage.augment.params import AugmentConfig, AugmentParams, sample_params
from deepimage.augment.pipeline import PRESETS, Augment, build_train_augment

__all__ = [
    "PRESETS",
    "Augment",
    "AugmentConfig",
    "AugmentParams",
    "build_train_augment",
    "sample_params",
]
