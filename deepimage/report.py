"""Evaluation reports: confusion heat maps, top-5 histograms, training curves and per-class CSV.

All plots use matplotlib's non-interactive Agg backend, so they work on headless machines.
Files are written to a temporary name and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import LinearSegmentedColormap, LogNorm, Normalize  # noqa: E402
from matplotlib.ticker import MaxNLocator, PercentFormatter  # noqa: E402

from deepimage.files import atomic_write  # noqa: E402

__all__ = ["plot_confusion", "plot_curves", "plot_top5_histogram", "write_per_class_csv"]

logger = logging.getLogger(__name__)

MAX_TICK_LABELS = 30  # above this many classes, axis tick labels are hidden
MAX_ANNOTATED = 15  # up to this many classes, cells show their counts
MAX_CELLS = 250  # larger matrices are drawn in blocks of classes, summed
_LABEL_CHARS = 28

# dark-to-bright green, as in density plots of large confusion matrices
_DENSITY_CMAP = LinearSegmentedColormap.from_list(
    "deepimage_density", ["#00140a", "#005a2b", "#1fa64a", "#9dff6a", "#f4ffe0"]
)


def _as_matrix(m: Any) -> np.ndarray:
    """A square 2-D numpy array from a tensor, array or nested list."""
    if hasattr(m, "detach"):
        m = m.detach().cpu().numpy()
    arr = np.asarray(m)
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1]:
        raise ValueError(f"expected a square matrix, got shape {arr.shape}")
    return arr


def _tick_labels(labels: Sequence[str] | None, n: int) -> list[str]:
    if labels is None:
        return [str(i) for i in range(n)]
    if len(labels) != n:
        raise ValueError(f"{len(labels)} labels for {n} classes")
    out = []
    for lab in labels:
        s = str(lab)
        out.append(s if len(s) <= _LABEL_CHARS else s[: _LABEL_CHARS - 1] + "…")
    return out


def _block_sum(m: np.ndarray) -> tuple[np.ndarray, int]:
    """Sum f x f blocks of a large matrix so it has at most MAX_CELLS rows (like datashader's
    aggregation: sparse counts stay visible instead of being lost when the image is scaled)."""
    n = m.shape[0]
    f = max(1, math.ceil(n / MAX_CELLS))
    if f == 1:
        return m, 1
    padded = np.zeros((math.ceil(n / f) * f,) * 2, dtype=m.dtype)
    padded[:n, :n] = m
    b = padded.shape[0] // f
    return padded.reshape(b, f, b, f).sum(axis=(1, 3)), f


def _matrix_figsize(n: int) -> tuple[float, float]:
    side = min(20.0, max(6.0, 3.0 + 0.32 * n)) if n <= MAX_TICK_LABELS else 10.0
    return side + 1.5, side


def _save(fig: plt.Figure, path: str | Path) -> Path:
    """Save a figure as PNG atomically and close it."""
    path = Path(path)
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight"))
    finally:
        plt.close(fig)
    logger.debug("wrote %s", path)
    return path


def _imshow_args(n: int, f: int) -> dict[str, Any]:
    """Pixel-exact cells; with f x f blocks, the extent keeps axes in class-index units."""
    edge = -0.5 + (math.ceil(n / f) * f if f > 1 else n)
    return {"interpolation": "nearest", "extent": (-0.5, edge, edge, -0.5), "aspect": "equal"}


def _blocks(f: int) -> str:
    return f" (cells sum {f}x{f} classes)" if f > 1 else ""


def _matrix_axes(ax: plt.Axes, labels: list[str], n: int) -> None:
    if n <= MAX_TICK_LABELS:
        ax.set_xticks(range(n), labels, rotation=90, fontsize=8)
        ax.set_yticks(range(n), labels, fontsize=8)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")


def plot_confusion(
    confusion: Any,
    labels: Sequence[str] | None,
    path: str | Path,
    title: str = "Top-1 confusion matrix (rows normalised)",
) -> Path:
    """Heat map of the row-normalised top-1 confusion matrix (rows = true, cols = predicted).

    Each row shows where the images of one true class went; cells hold the raw counts when
    there are at most 15 classes. Tick labels are hidden above 30 classes.
    """
    counts = _as_matrix(confusion).astype(np.int64)
    n = counts.shape[0]
    names = _tick_labels(labels, n)
    blocks, f = _block_sum(counts)
    totals = blocks.sum(axis=1, keepdims=True)
    norm = np.divide(blocks, totals, out=np.zeros(blocks.shape), where=totals > 0)

    fig, ax = plt.subplots(figsize=_matrix_figsize(n))
    im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0, **_imshow_args(n, f))
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    _matrix_axes(ax, names, n)
    if n <= MAX_ANNOTATED:
        for i in range(n):
            for j in range(n):
                if counts[i, j]:
                    colour = "white" if norm[i, j] > 0.5 else "black"
                    ax.text(
                        j, i, str(counts[i, j]), ha="center", va="center", fontsize=8, color=colour
                    )
    acc = np.trace(counts) / max(int(counts.sum()), 1)
    ax.set_title(f"{title}\n{int(counts.sum())} images, top-1 accuracy {acc:.1%}{_blocks(f)}")
    return _save(fig, path)


def plot_top5_histogram(
    top5_pairs: Any,
    labels: Sequence[str] | None,
    path: str | Path,
    title: str = "Top-5 predictions per true class",
) -> Path:
    """2-D histogram of (true class, predicted class) over all top-5 predictions of each image.

    A bright diagonal means the true class is usually among the top 5; off-diagonal clusters
    show which classes the model finds similar. A log colour scale is used when counts span
    more than a factor of 20, so rare confusions stay visible next to the diagonal.
    """
    pairs = _as_matrix(top5_pairs).astype(np.int64)
    n = pairs.shape[0]
    names = _tick_labels(labels, n)
    blocks, f = _block_sum(pairs)
    vmax = max(int(blocks.max()), 1)
    positive = blocks[blocks > 0]
    use_log = positive.size > 0 and vmax / int(positive.min()) > 20
    data = np.ma.masked_equal(blocks, 0).astype(float)
    norm = LogNorm(vmin=1, vmax=vmax) if use_log else Normalize(vmin=0, vmax=vmax)
    cmap = _DENSITY_CMAP.with_extremes(bad="#000000")

    fig, ax = plt.subplots(figsize=_matrix_figsize(n))
    im = ax.imshow(data, cmap=cmap, norm=norm, **_imshow_args(n, f))
    scale = "log scale" if use_log else "linear scale"
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label=f"count ({scale})")
    _matrix_axes(ax, names, n)
    total = int(pairs.sum())
    on_diag = int(np.trace(pairs))
    ax.set_title(f"{title}\n{total} (true, predicted) pairs, {on_diag} on the diagonal{_blocks(f)}")
    return _save(fig, path)


def _epoch(i: int, row: Mapping[str, Any]) -> float:
    """The row's epoch, or its 1-based position when it has none."""
    epoch = row.get("epoch")
    return float(epoch) if epoch is not None else float(i + 1)


def _series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for i, row in enumerate(rows):
        value = row.get(key)
        if value is None:
            continue
        value = float(value)
        if math.isnan(value):
            continue
        xs.append(_epoch(i, row))
        ys.append(value)
    return xs, ys


_ACC_SERIES = (
    ("train_top5", "train top-5", "tab:blue", "-"),
    ("val_top5", "validation top-5", "tab:orange", "-"),
    ("train_top1", "train top-1", "tab:blue", "--"),
    ("val_top1", "validation top-1", "tab:orange", "--"),
)
_LOSS_SERIES = (
    ("train_loss", "train loss", "tab:red", "-"),
    ("val_loss", "validation loss", "tab:purple", "-"),
)


def plot_curves(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Training curves per epoch: accuracy (top-5 solid, top-1 dashed, train vs validation)
    on the left; loss and learning rate on the right.

    ``rows`` are metrics.jsonl records with ``epoch`` and any of ``train_top1``, ``train_top5``,
    ``val_top1``, ``val_top5`` (fractions, or percentages if any value exceeds 1),
    ``train_loss``, ``val_loss``, ``lr``. Missing keys and ``None`` values are skipped.
    """
    if not rows:
        raise ValueError("plot_curves needs at least one row")
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(13, 4.8))
    marker = "o" if len(rows) <= 30 else None

    acc_values = [v for key, *_ in _ACC_SERIES for v in _series(rows, key)[1]]
    percent = any(v > 1.0 for v in acc_values)
    for key, label, colour, style in _ACC_SERIES:
        xs, ys = _series(rows, key)
        if xs:
            ax_acc.plot(xs, ys, style, color=colour, marker=marker, ms=4, label=label)
    ax_acc.set_title("Accuracy")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy")
    ax_acc.yaxis.set_major_formatter(PercentFormatter(xmax=100.0 if percent else 1.0))
    ax_acc.grid(alpha=0.3)
    if acc_values:
        ax_acc.legend(loc="lower right")
    else:
        ax_acc.text(
            0.5, 0.5, "no accuracy logged", ha="center", va="center", transform=ax_acc.transAxes
        )

    handles = []
    for key, label, colour, style in _LOSS_SERIES:
        xs, ys = _series(rows, key)
        if xs:
            handles += ax_loss.plot(xs, ys, style, color=colour, marker=marker, ms=4, label=label)
    ax_loss.set_title("Loss and learning rate")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.grid(alpha=0.3)
    xs, ys = _series(rows, "lr")
    if xs:
        ax_lr = ax_loss.twinx()
        handles += ax_lr.plot(
            xs, ys, ":", color="tab:green", marker=marker, ms=4, label="learning rate"
        )
        ax_lr.set_ylabel("learning rate")
        if min(ys) > 0 and max(ys) / min(ys) > 10:
            ax_lr.set_yscale("log")
    if handles:
        ax_loss.legend(handles=handles, loc="upper right")
    else:
        ax_loss.text(
            0.5, 0.5, "no loss logged", ha="center", va="center", transform=ax_loss.transAxes
        )

    epochs = {_epoch(i, row) for i, row in enumerate(rows)}
    for ax in (ax_acc, ax_loss):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if len(epochs) == 1:  # a single epoch: keep a readable, integer x axis
            (x,) = epochs
            ax.set_xlim(x - 1.0, x + 1.0)
    fig.tight_layout()
    return _save(fig, path)


def time_to_accuracy(rows: Sequence[Mapping[str, Any]]) -> tuple[list[float], list[float]]:
    """(cumulative training seconds, validation top-1) at each epoch's end that logged both."""
    xs, ys = [], []
    for row in rows:
        t, acc = row.get("train_s"), row.get("val_top1")
        if t is not None and acc is not None and not math.isnan(float(acc)):
            xs.append(float(t))
            ys.append(float(acc))
    return xs, ys


def plot_time_to_accuracy(
    rows: Sequence[Mapping[str, Any]], path: str | Path, target: float | None = None
) -> Path:
    """Validation top-1 against training wall time, one point per epoch (the paper's
    Figure 2b for one machine); ``target`` (a fraction) draws a horizontal line.

    ``rows`` are metrics.jsonl records with ``train_s`` (cumulative seconds of the training
    epochs, validation passes not included) and ``val_top1``.
    """
    xs, ys = time_to_accuracy(rows)
    if not xs:
        raise ValueError("plot_time_to_accuracy needs rows with train_s and val_top1")
    minutes = max(xs) >= 120
    scale, unit = (60.0, "minutes") if minutes else (1.0, "seconds")
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.plot([x / scale for x in xs], ys, "-o", color="tab:orange", ms=4, label="validation top-1")
    if target is not None:
        ax.axhline(target, color="grey", ls=":", label=f"target {100 * target:.1f}%")
    ax.set_xlabel(f"training wall time ({unit})")
    ax.set_ylabel("top-1 accuracy")
    ax.set_title("Time to accuracy")
    ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    return _save(fig, path)


CSV_COLUMNS = ("class_index", "class_id", "name", "n", "top1", "top5")


def write_per_class_csv(
    per_class: Sequence[Mapping[str, Any]],
    labels: Sequence[str] | None,
    path: str | Path,
    names: Mapping[str, str] | None = None,
) -> Path:
    """Write per-class accuracy (``ClassificationMeter.results()["per_class"]``) as CSV.

    Columns: class_index, class_id, name, n, top1, top5. ``labels`` are the class ids by index
    (e.g. ``DatasetIndex.classes``); ``names`` maps id -> readable name. Accuracies are
    fractions with 6 decimals, empty for classes without images.
    """
    path = Path(path)
    names = names or {}

    def fmt(v: Any) -> str:
        return "" if v is None else f"{float(v):.6f}"

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(CSV_COLUMNS)
            for row in per_class:
                idx = int(row["class_index"])
                if labels is not None and not 0 <= idx < len(labels):
                    raise ValueError(f"class_index {idx} outside the {len(labels)} labels")
                class_id = str(labels[idx]) if labels is not None else str(idx)
                writer.writerow(
                    [
                        idx,
                        class_id,
                        names.get(class_id, ""),
                        int(row["n"]),
                        fmt(row.get("top1")),
                        fmt(row.get("top5")),
                    ]
                )

    atomic_write(path, write)
    return path
