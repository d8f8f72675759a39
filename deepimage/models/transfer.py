"""Transfer learning on a built model (paper 5.3): start from other weights, choose what learns.

* :func:`load_matching` copies every tensor of the source weights whose name and shape match;
  the softmax layer (the last ``Linear``) stays freshly initialised when the classes differ,
  and so does any layer whose shape changed (a first FC layer after a crop change, say);
* :func:`set_trainable` chooses what learns: ``all`` layers, the ``last:K`` weight layers
  (``Conv2d`` and ``Linear``, in the order of the network; the paper's "last three
  fully-connected layers" is ``last:3`` on VGG), or the ``head`` alone (the softmax layer on
  frozen features). Frozen parameters get ``requires_grad = False``, so the optimizer never
  sees them, and frozen batch-norm layers keep their running statistics (they always
  normalise in eval mode).

This module works on models and tensors only; reading a run's weights is the caller's job
(the training loop, :mod:`deepimage.train.loop`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

logger = logging.getLogger(__name__)

NORM_LAYERS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.LayerNorm)


class TrainableError(ValueError):
    """A ``trainable`` value that is malformed or asks for more layers than the model has."""


class SourceWeightsError(ValueError):
    """Source weights that do not fit the model (a tensor is missing)."""


class SourceWeights(NamedTuple):
    """Weights to start from: where they came from, the tensors, their classes and model."""

    name: str
    tensors: dict[str, torch.Tensor]
    classes: list[str]
    model: str


@dataclass
class FinetuneReport:
    """What :func:`prepare_model` changed: replaced layers, trainable and frozen parameters."""

    source: str | None
    trainable: str
    replaced: list[str] = field(default_factory=list)
    trainable_layers: list[str] = field(default_factory=list)
    trainable_params: int = 0
    frozen_params: int = 0

    def lines(self) -> list[str]:
        """Readable lines for the log and the command line."""
        out = []
        if self.source is not None:
            out.append(f"initialised from {self.source}")
        out += [f"replaced {r}" for r in self.replaced] or ["no layer replaced"]
        out.append(f"trainable ({self.trainable}): {', '.join(self.trainable_layers)}")
        total = self.trainable_params + self.frozen_params
        out.append(
            f"parameters: {self.trainable_params:,} trainable, {self.frozen_params:,} frozen "
            f"(of {total:,})"
        )
        return out

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def parse_trainable(text: str) -> tuple[str, int]:
    """``all``, ``head`` or ``last:K`` as (kind, K); a bad value is a :class:`TrainableError`."""
    if text in ("all", "head"):
        return text, 0
    kind, _, k = text.partition(":")
    if kind == "last" and k.isdigit() and int(k) > 0:
        return "last", int(k)
    raise TrainableError(f"config key 'trainable': expected all, head or last:K, got {text!r}")


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The ``Conv2d`` and ``Linear`` layers in network order (registration order)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]


def head_layer(model: nn.Module) -> tuple[str, nn.Linear]:
    """The softmax layer: the last ``Linear`` of the network."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no Linear layer to replace")
    return linears[-1]


def _describe(name: str, module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return f"{name} (Linear {module.in_features} -> {module.out_features})"
    return f"{name} ({type(module).__name__})"


def load_matching(model: nn.Module, source: SourceWeights, new_classes: list[str]) -> list[str]:
    """Copy ``source``'s tensors into ``model`` where names and shapes match; return the
    layers left freshly initialised (the head when the classes differ, changed shapes)."""
    tensors = source.tensors
    head_name, head = head_layer(model)
    keep_head = list(source.classes) == list(new_classes)
    own = model.state_dict()
    skipped_layers: dict[str, str] = {}
    load = {}
    for key, value in own.items():
        layer = key.rpartition(".")[0]
        if not keep_head and layer == head_name:
            skipped_layers[layer] = "new classes"
            continue
        if key not in tensors:
            raise SourceWeightsError(f"{source.name}: no tensor {key} for model {source.model}")
        if tensors[key].shape != value.shape:
            skipped_layers[layer] = f"shape {tuple(tensors[key].shape)} -> {tuple(value.shape)}"
            continue
        load[key] = tensors[key]
    model.load_state_dict(load, strict=False)
    modules = dict(model.named_modules())
    replaced = []
    for layer, why in skipped_layers.items():
        module = modules[layer]
        if layer == head_name and not keep_head:
            old = len(source.classes)
            replaced.append(
                f"{layer} (Linear {head.in_features} -> {old} classes) by Linear "
                f"{head.in_features} -> {head.out_features} ({why})"
            )
        else:
            replaced.append(f"{_describe(layer, module)}: re-initialised ({why})")
    return replaced


def _freeze_norm(module: nn.Module) -> None:
    """A frozen normalisation layer always uses (and keeps) its running statistics."""

    def eval_mode(mod: nn.Module, args: Any) -> None:
        mod.training = False

    module.register_forward_pre_hook(eval_mode)


def set_trainable(model: nn.Module, trainable: str) -> list[str]:
    """Freeze all but the chosen layers; return the names of the trainable ones."""
    kind, k = parse_trainable(trainable)
    if kind == "all":
        for p in model.parameters():
            p.requires_grad_(True)
        return ["all layers"]
    layers = [head_layer(model)] if kind == "head" else weight_layers(model)[-k:]
    if kind == "last" and k > len(weight_layers(model)):
        raise TrainableError(
            f"config key 'trainable': last:{k} but the model has "
            f"{len(weight_layers(model))} weight layers"
        )
    names = [n for n, _ in layers]
    first = names[0]
    order = [n for n, _ in model.named_modules()]
    start = order.index(first)
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in model.named_modules():
        chosen = name in names
        # normalisation layers after the first trainable weight layer learn with it
        follows = isinstance(module, NORM_LAYERS) and order.index(name) > start and kind == "last"
        if chosen or follows:
            for p in module.parameters(recurse=False):
                p.requires_grad_(True)
        elif isinstance(module, NORM_LAYERS):
            _freeze_norm(module)
    return names


def prepare_model(
    model: nn.Module,
    classes: list[str],
    trainable: str = "all",
    source: SourceWeights | None = None,
) -> FinetuneReport:
    """Start a freshly built model from ``source`` and freeze all but ``trainable`` (before
    the optimizer sees its parameters)."""
    report = FinetuneReport(source=source.name if source else None, trainable=trainable)
    if source is not None:
        report.replaced = load_matching(model, source, classes)
    report.trainable_layers = set_trainable(model, trainable)
    report.trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    report.frozen_params = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    for line in report.lines():
        logger.info("fine-tuning: %s", line)
    return report
