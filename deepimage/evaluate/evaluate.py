"""``deepimage evaluate``: accuracy, per-class results and confusion plots for a trained model.

Also ensembles (members' softmax posteriors averaged) and robustness under corruptions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepimage.allocator import retain_freed_memory
from deepimage.data.cache import store_for
from deepimage.data.loader import eval_batches, iterate_batches
from deepimage.ensemble import expand_sources, load_members
from deepimage.evaluate.corrupt import SEVERITIES, summarise
from deepimage.evaluate.corrupt import corrupt as corrupt_images
from deepimage.files import atomic_write_json
from deepimage.inference import evaluate_batches, inference_execution, resolve_device
from deepimage.metrics import ClassificationMeter
from deepimage.runs import RunMeta, load_model

logger = logging.getLogger(__name__)

ImageTransform = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``(images, rows) -> images``: a change applied to each batch of uint8 source images."""


def _label_map(data_classes: list[str], model_classes: list[str], data: str) -> np.ndarray:
    unknown = [c for c in data_classes if c not in model_classes]
    if unknown:
        shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise ValueError(f"{data}: classes unknown to the model: {shown}")
    return np.array([model_classes.index(c) for c in data_classes], dtype=np.int64)


def _remap(
    batches: Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    label_map: np.ndarray,
    transform: ImageTransform | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    table = torch.from_numpy(label_map)
    for images, labels, rows in batches:
        if transform is not None:
            images = transform(images, rows)
        yield images, table[labels], rows


def _results(posteriors: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, Any]:
    meter = ClassificationMeter(num_classes)
    meter.update(torch.from_numpy(posteriors), torch.from_numpy(labels))
    return meter.results()


def _load(
    source: str | Path | Sequence[str | Path], dev: torch.device
) -> tuple[list[tuple[torch.nn.Module, RunMeta]], list[Path], bool]:
    """The model(s) at ``source``; whether they form an ensemble (a manifest or several)."""
    sources = [source] if isinstance(source, str | Path) else list(source)
    paths = expand_sources(sources)
    if len(paths) == 1 and paths[0] == Path(sources[0]):
        return [load_model(paths[0], dev)], paths, False
    return load_members(paths, dev), paths, True


class Evaluation:
    """The model(s) at ``source`` and the images of ``data``, ready for passes over them.

    ``source`` is a run folder or weights file, or an ensemble: a manifest (or its folder)
    or several runs. Every member sees the images at its own source size (or at each of
    ``scales``); :meth:`posteriors` averages over scales, then over members.
    """

    def __init__(
        self,
        source: str | Path | Sequence[str | Path],
        data: str | Path,
        *,
        batch_size: int = 64,
        workers: int = 2,
        device: str = "auto",
        precision: str | None = None,
        cache_dir: str | None = None,
        progress: bool = True,
        tta: Sequence[str] | None = None,
        scales: Sequence[int] | None = None,
    ) -> None:
        self.device = resolve_device(device)
        self.members, self.paths, self.is_ensemble = _load(source, self.device)
        self.meta = self.members[0][1]
        modes = {m.preprocess.resize_mode for _, m in self.members}
        if len(modes) > 1:
            raise ValueError(f"{self.paths[0]}: members resize differently ({sorted(modes)})")
        self.scales = list(scales) if scales else None
        self.member_scales = [self.scales or [m.preprocess.size] for _, m in self.members]
        sizes = sorted({s for ss in self.member_scales for s in ss})
        self.store = store_for(
            data,
            sizes,
            mode=self.meta.preprocess.resize_mode,
            cache_dir=cache_dir,
            progress=progress,
        )
        self.label_map = _label_map(list(self.store.classes), list(self.meta.classes), str(data))
        self.labels = self.label_map[np.asarray(self.store.labels)]
        self.num_classes = self.meta.num_classes
        self.batches = eval_batches(np.arange(len(self.store)), batch_size)
        self.workers, self.progress = workers, progress
        self.preprocess = [  # each member's, run in this machine's precision and layout
            inference_execution(model, meta, self.device, precision, cache_dir)
            for model, meta in self.members
        ]
        self.tta = tuple(tta) if tta else None  # None: each member's recorded views

    def member_tta(self, index: int) -> tuple[str, ...]:
        """The test-time views of a member: as asked, else as its run recorded (centre)."""
        return self.tta or self.members[index][1].tta

    def member_posteriors(self, index: int, transform: ImageTransform | None = None) -> np.ndarray:
        """``(N, classes)`` softmax posteriors of one member, averaged over its scales."""
        model, _ = self.members[index]
        posteriors = []
        for scale in self.member_scales[index]:
            batches = iterate_batches(self.store.path, scale, self.batches, self.workers)
            _, probs = evaluate_batches(
                model,
                _remap(batches, self.label_map, transform),
                self.num_classes,
                self.preprocess[index],
                self.device,
                total=len(self.batches),
                progress=self.progress,
                desc=f"member {index + 1} at {scale}"
                if self.is_ensemble
                else f"evaluate at {scale}",
                tta=self.member_tta(index),
            )
            posteriors.append(probs)
        return posteriors[0] if len(posteriors) == 1 else np.mean(posteriors, axis=0)

    def posteriors(
        self, transform: ImageTransform | None = None
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """The combined posteriors (mean over members) and each member's."""
        each = [self.member_posteriors(i, transform) for i in range(len(self.members))]
        return (each[0] if len(each) == 1 else np.mean(each, axis=0)), each

    def results(self, posteriors: np.ndarray) -> dict[str, Any]:
        """Top-k, per-class and confusion statistics of ``posteriors`` against the labels."""
        return _results(posteriors, self.labels, self.num_classes)


def evaluate(
    source: str | Path | Sequence[str | Path],
    data: str | Path,
    out: str | Path | None = None,
    *,
    batch_size: int = 64,
    workers: int = 2,
    device: str = "auto",
    precision: str | None = None,
    cache_dir: str | None = None,
    progress: bool = True,
    tta: Sequence[str] | None = None,
    scales: Sequence[int] | None = None,
    corruptions: Sequence[str] | None = None,
    severities: Sequence[int] = SEVERITIES,
    corrupt_seed: int = 0,
) -> dict[str, Any]:
    """Evaluate the model at ``source`` (run folder or weights) on ``data``; write the report.

    ``tta`` combines ``center``, ``dense``, ``flip`` and ``shift`` views; ``None`` applies
    the views the run recorded (its config's ``tta``; centre crop for older runs). Several
    ``scales`` (source resolutions) average their posteriors (multi-scale testing, paper 5.1).

    ``source`` may also be an ensemble manifest (or its folder) or several runs: each
    member is evaluated at its own source size (or at ``scales``) and the ensemble averages
    the members' softmax posteriors (paper 5.2); ``metrics["members"]`` lists each member.

    ``corruptions`` (names of :data:`deepimage.evaluate.corrupt.CORRUPTIONS`) add the
    accuracy under each corruption at each of ``severities`` and their mean
    (``metrics["corruptions"]``, paper 5.5).
    """
    retain_freed_memory()  # every batch allocates the same activations
    ev = Evaluation(source, data, batch_size=batch_size, workers=workers, device=device,
                    precision=precision, cache_dir=cache_dir, progress=progress, tta=tta,
                    scales=scales)  # fmt: skip
    posteriors, each = ev.posteriors()
    results = ev.results(posteriors)
    metrics = {
        "top1": results["top1"],
        "top5": results["top5"],
        "mean_class_acc": results["mean_class_acc"],
        "n_images": results["n_images"],
        "model": "ensemble" if ev.is_ensemble else ev.meta.model,
        "tta": list(ev.member_tta(0)),
        "scales": ev.member_scales[0] if ev.scales or not ev.is_ensemble else None,
        "data": str(data),
        "skipped": list(ev.store.skipped),
    }
    if ev.is_ensemble:  # None scales: each member at its own size
        metrics["members"] = []
        for i, (path, (_, m), probs) in enumerate(zip(ev.paths, ev.members, each, strict=True)):
            r = ev.results(probs)
            metrics["members"].append({
                "source": str(path), "model": m.model, "size": m.preprocess.size,
                "crop": m.preprocess.crop,
                "scales": ev.member_scales[i], "top1": r["top1"], "top5": r["top5"],
                "mean_class_acc": r["mean_class_acc"],
            })  # fmt: skip
    if corruptions:
        metrics["corruptions"] = robustness(
            ev, list(corruptions), list(severities), corrupt_seed, results["top1"]
        )
    if out is not None:
        write_report(Path(out), metrics, results, ev.meta.labels())
    return metrics


def robustness(
    ev: Evaluation, names: list[str], severities: list[int], seed: int, clean: float
) -> dict[str, Any]:
    """Top-1 under each corruption and severity (ImageNet-C manner), with their means."""
    table: dict[str, dict[int, float]] = {}
    for name in names:
        table[name] = {}
        for severity in severities:

            def transform(images, rows, name=name, severity=severity):
                return corrupt_images(images, rows, name, severity, seed)

            posteriors, _ = ev.posteriors(transform)
            table[name][severity] = ev.results(posteriors)["top1"]
            logger.info("%s at severity %d: top-1 %.4f", name, severity, table[name][severity])
    return summarise(clean, table, severities)


def write_report(
    out: Path, metrics: dict[str, Any], results: dict[str, Any], labels: list[str]
) -> None:
    """metrics.json, per_class.csv, confusion.png and top5_confusion.png in ``out``."""
    from deepimage.report import plot_confusion, plot_top5_histogram, write_per_class_csv

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "metrics.json", metrics)
    write_per_class_csv(results["per_class"], labels, out / "per_class.csv")
    plot_confusion(results["confusion"], labels, out / "confusion.png")
    plot_top5_histogram(results["top5_pairs"], labels, out / "top5_confusion.png")


def format_members(metrics: dict[str, Any]) -> str:
    """Every member and the ensemble side by side, as aligned text."""
    rows = [(Path(m["source"]).name, m["model"], str(m["size"]), m["top1"], m["top5"])
            for m in metrics["members"]]  # fmt: skip
    rows.append(("ensemble", "", "", metrics["top1"], metrics["top5"]))
    width = max(len(r[0]) for r in rows) + 2
    lines = [f"{'member':<{width}}{'model':<18}{'size':>6}{'top-1':>9}{'top-5':>9}"]
    for name, model, size, top1, top5 in rows:
        lines.append(f"{name:<{width}}{model:<18}{size:>6}{100 * top1:>8.2f}%{100 * top5:>8.2f}%")
    return "\n".join(lines)
