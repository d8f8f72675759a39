"""Forward passes for evaluation, shared by training's validation, evaluate and predict.

One path from uint8 images to class scores: centre crop, normalise, autocast forward, all
as the run's :class:`~deepimage.runmeta.Preprocess` says. Using it everywhere is what makes
a number printed by ``evaluate`` and a prediction from ``predict`` agree with the validation
accuracy seen during training.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from deepimage.data.transforms import center_crop, to_model_input
from deepimage.metrics import ClassificationMeter
from deepimage.precision import autocast
from deepimage.precision import resolve as resolve_execution
from deepimage.runmeta import Preprocess, RunMeta

logger = logging.getLogger(__name__)


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def inference_execution(
    model: torch.nn.Module,
    meta: RunMeta,
    device: torch.device,
    precision: str | None = None,
    cache_dir: str | Path | None = None,
) -> Preprocess:
    """The run's preprocessing, computed in the fastest correct precision and layout for
    running ``model`` on ``device``.

    ``precision`` None or ``auto`` decides by the hardware (a forward-pass probe where the
    CPU has native bf16), whatever precision the model was trained in: a model trained
    with bf16 on one machine is served in fp32 on a CPU that would only emulate bf16. The
    model is put into the chosen memory layout.
    """
    from deepimage.data.cache import default_cache_dir

    choice = resolve_execution(
        precision or "auto",
        "auto",
        device,
        model,
        f"{meta.model}@{meta.width:g}",
        meta.preprocess.crop,
        Path(cache_dir) if cache_dir else default_cache_dir(),
        train=False,
    )
    if choice.channels_last:
        model.to(memory_format=torch.channels_last)
    logger.info("%s", choice.describe())
    return meta.preprocess.running(choice.precision, choice.channels_last)


def model_input(
    images: torch.Tensor, pre: Preprocess, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The model's input for ``(B, S, S, 3)`` uint8 images: centre crop, normalise, layout."""
    return to_model_input(center_crop(images, pre.crop), pre.mean, pre.std, device,
                          pre.channels_last)  # fmt: skip


def _forward(net: torch.nn.Module, x: torch.Tensor, device: torch.device, precision: str):
    with autocast(device, precision):
        return net(x).float()


@torch.inference_mode()
def logits_for(
    model: torch.nn.Module, images: torch.Tensor, pre: Preprocess, device: torch.device
) -> torch.Tensor:
    """float32 logits for ``(B, S, S, 3)`` uint8 images, centre-cropped to ``pre.crop``."""
    return _forward(model, model_input(images, pre, device), device, pre.precision)


TTA_MODES = ("center", "flip", "dense", "shift")


def shifted_views(x: torch.Tensor, shift: int = 1) -> list[torch.Tensor]:
    """``(B, 3, C, C)`` inputs moved by ``-shift`` and ``+shift`` pixels along both axes, the
    uncovered border filled by reflection (airbench's translated test views)."""
    c = x.shape[-1]
    padded = torch.nn.functional.pad(x, (shift,) * 4, mode="reflect")
    return [padded[:, :, :c, :c], padded[:, :, 2 * shift :, 2 * shift :]]


@torch.inference_mode()
def posteriors_for(
    model: torch.nn.Module,
    images: torch.Tensor,
    pre: Preprocess,
    device: torch.device,
    tta: Sequence[str] = ("center",),
    dense: torch.nn.Module | None = None,
) -> torch.Tensor:
    """Softmax posteriors for ``(B, S, S, 3)`` uint8 images under test-time augmentation.

    ``center``: the centre crop. ``dense``: the whole S x S image through the fully
    convolutional net (``dense``), its score map averaged (paper 5.1). ``flip``: each view
    and its mirror image, posteriors averaged. ``center`` and ``dense`` together average both.
    ``shift`` (multi-crop, airbench): the centre crop counts one half, two crops moved by one
    pixel diagonally either way (reflect-padded, :func:`shifted_views`) a quarter each.
    """
    unknown = set(tta) - set(TTA_MODES)
    if unknown:
        raise ValueError(f"unknown test-time augmentation {sorted(unknown)}; known: {TTA_MODES}")
    views = []
    if "dense" in tta:
        if dense is None:
            raise ValueError("dense evaluation needs the fully convolutional model")
        views.append((dense, to_model_input(images, pre.mean, pre.std, device, pre.channels_last)))
    if "center" in tta or "dense" not in tta:
        views.append((model, model_input(images, pre, device)))
    total = None
    count = 0.0
    for net, x in views:
        crops = [(x, 1.0)]
        if "shift" in tta and net is model:
            crops = [(x, 2.0), *((v, 1.0) for v in shifted_views(x))]
        for crop_view, weight in crops:
            inputs = [crop_view, crop_view.flip(3)] if "flip" in tta else [crop_view]
            for view in inputs:
                probs = torch.softmax(_forward(net, view, device, pre.precision), dim=1) * weight
                total = probs if total is None else total + probs
                count += weight
    return total / count


def evaluate_batches(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    num_classes: int,
    pre: Preprocess,
    device: torch.device,
    total: int | None = None,
    progress: bool = False,
    desc: str = "eval",
    tta: Sequence[str] = ("center",),
) -> tuple[ClassificationMeter, np.ndarray]:
    """Accumulate top-k and confusion statistics; also return the softmax posteriors."""
    was_training = model.training
    model.eval()
    dense = None
    if "dense" in tta:
        from deepimage.models.dense import to_dense

        dense = to_dense(model)
    meter = ClassificationMeter(num_classes)
    probs = []
    for images, labels, _rows in tqdm(
        batches, total=total, disable=not progress, desc=desc, leave=False
    ):
        posteriors = posteriors_for(model, images, pre, device, tta, dense)
        meter.update(posteriors.cpu(), labels)
        probs.append(posteriors.cpu().numpy())
    model.train(was_training)
    posteriors = np.concatenate(probs) if probs else np.zeros((0, num_classes), np.float32)
    return meter, posteriors
