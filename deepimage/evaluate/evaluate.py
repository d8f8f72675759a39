"""``deepimage evaluate``: accuracy, per-class results and confusion plots for a trained model."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepimage.data.loader import eval_batches, iterate_batches
from deepimage.data.store import store_for
from deepimage.inference import evaluate_batches, resolve_device
from deepimage.metrics import ClassificationMeter
from deepimage.runs import atomic_write_json, load_model

logger = logging.getLogger(__name__)


def class_labels(meta: dict[str, Any]) -> list[str]:
    """Readable label per class: ``"<id> <name>"`` when a name is known, else the id."""
    names = meta.get("class_names") or {}
    return [f"{c} {names[c]}" if names.get(c) else c for c in meta["classes"]]


def _label_map(data_classes: list[str], model_classes: list[str], data: str) -> np.ndarray:
    unknown = [c for c in data_classes if c not in model_classes]
    if unknown:
        shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise ValueError(f"{data}: classes unknown to the model: {shown}")
    return np.array([model_classes.index(c) for c in data_classes], dtype=np.int64)


def _remap(
    batches: Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], label_map: np.ndarray
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    table = torch.from_numpy(label_map)
    for images, labels, rows in batches:
        yield images, table[labels], rows


def evaluate(
    source: str | Path,
    data: str | Path,
    out: str | Path | None = None,
    *,
    batch_size: int = 64,
    workers: int = 2,
    device: str = "auto",
    precision: str | None = None,
    cache_dir: str | None = None,
    progress: bool = True,
    tta: Sequence[str] = ("center",),
    scales: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Evaluate the model at ``source`` (run folder or weights) on ``data``; write the report.

    ``tta`` combines ``center``, ``dense`` and ``flip`` views; several ``scales`` (source
    resolutions) average their posteriors (multi-scale testing, paper 5.1).
    """
    dev = resolve_device(device)
    model, meta = load_model(source, dev)
    scales = list(scales) if scales else [meta["size"]]
    store = store_for(data, sorted(set(scales)), mode=meta["resize_mode"], cache_dir=cache_dir)
    label_map = _label_map(list(store.classes), meta["classes"], str(data))
    batches = eval_batches(np.arange(len(store)), batch_size)
    num_classes = len(meta["classes"])
    posteriors = []
    for scale in scales:  # multi-scale testing: posteriors averaged over the scales
        meter, probs = evaluate_batches(
            model,
            _remap(iterate_batches(store.path, scale, batches, workers), label_map),
            num_classes,
            meta["crop"],
            meta["mean"],
            meta["std"],
            dev,
            precision or meta.get("precision", "fp32"),
            total=len(batches),
            progress=progress,
            desc=f"evaluate at {scale}",
            tta=tuple(tta),
        )
        posteriors.append(probs)
    if len(scales) > 1:
        meter = ClassificationMeter(num_classes)
        labels = torch.from_numpy(label_map[np.asarray(store.labels)])
        meter.update(torch.from_numpy(np.mean(posteriors, axis=0)), labels)
    results = meter.results()
    metrics = {
        "top1": results["top1"],
        "top5": results["top5"],
        "mean_class_acc": results["mean_class_acc"],
        "n_images": results["n_images"],
        "model": meta["model"],
        "tta": list(tta),
        "scales": scales,
        "data": str(data),
        "skipped": list(store.skipped),
    }
    if out is not None:
        write_report(Path(out), metrics, results, class_labels(meta))
    return metrics


def write_report(
    out: Path, metrics: dict[str, Any], results: dict[str, Any], labels: list[str]
) -> None:
    """metrics.json, per_class.csv, confusion.png and top5_confusion.png in ``out``."""
    from deepimage.evaluate.report import plot_confusion, plot_top5_histogram, write_per_class_csv

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "metrics.json", metrics)
    write_per_class_csv(results["per_class"], labels, out / "per_class.csv")
    plot_confusion(results["confusion"], labels, out / "confusion.png")
    plot_top5_histogram(results["top5_pairs"], labels, out / "top5_confusion.png")
