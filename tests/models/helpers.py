"""Shared helpers for the model tests: seeded construction and inputs."""

from __future__ import annotations

import torch

from deepimage.models import ImageClassifier, get_model


def build(name: str, num_classes: int, seed: int = 0, **kwargs: object) -> ImageClassifier:
    """Build a model with a fixed seed without disturbing the global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_model(name, num_classes, **kwargs)


def make_input(size: int, n: int = 2, seed: int = 0) -> torch.Tensor:
    """Seeded random image batch ``(n, 3, size, size)``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=gen)


def count(model: torch.nn.Module, kind: type | tuple[type, ...]) -> int:
    """Number of submodules of the given type(s)."""
    return sum(isinstance(m, kind) for m in model.modules())


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
