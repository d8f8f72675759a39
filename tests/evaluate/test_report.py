import csv

import numpy as np
import pytest
import torch
from PIL import Image

from deepimage.metrics import ClassificationMeter
from deepimage.report import (
    MAX_CELLS,
    _block_sum,
    plot_confusion,
    plot_curves,
    plot_top5_histogram,
    write_per_class_csv,
)


def _assert_png(path, min_side=200, min_bytes=5_000):
    assert path.is_file()
    assert path.stat().st_size > min_bytes
    with Image.open(path) as img:
        assert img.format == "PNG"
        img.load()
        w, h = img.size
        assert w >= min_side and h >= min_side
        # not a blank canvas: the plot has many distinct colours
        colours = img.convert("RGB").getcolors(maxcolors=1_000_000)
        assert colours is not None and len(colours) > 20
    # no temporary files left next to the output
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []


def _meter(num_classes: int, n: int, seed: int = 0) -> ClassificationMeter:
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, num_classes, (n,), generator=g)
    logits = torch.randn(n, num_classes, generator=g)
    logits[torch.arange(n), targets] += 2.0  # mostly right
    meter = ClassificationMeter(num_classes)
    meter.update(logits, targets)
    return meter


@pytest.mark.parametrize("num_classes", [3, 12, 40, 600])
def test_plot_confusion_and_top5(tmp_path, num_classes):
    r = _meter(num_classes, 400).results()
    labels = [f"c{i:02d} class number {i}" for i in range(num_classes)]
    out = plot_confusion(r["confusion"], labels, tmp_path / "sub" / "confusion.png")
    assert out == tmp_path / "sub" / "confusion.png"
    _assert_png(out)
    out5 = plot_top5_histogram(r["top5_pairs"], labels, tmp_path / "top5.png")
    _assert_png(out5)


def test_plots_accept_arrays_without_labels_and_empty_rows(tmp_path):
    conf = np.array([[5, 1, 0], [0, 0, 0], [2, 0, 7]])  # class 1 has no images
    _assert_png(plot_confusion(conf, None, tmp_path / "c.png"))
    _assert_png(plot_top5_histogram(conf.tolist(), None, tmp_path / "h.png"))
    with pytest.raises(ValueError):
        plot_confusion(conf, ["a", "b"], tmp_path / "bad.png")
    with pytest.raises(ValueError):
        plot_confusion(np.zeros((2, 3)), None, tmp_path / "bad.png")


def test_plot_curves_many_epochs(tmp_path):
    rows = [
        {
            "epoch": e,
            "train_top1": 0.1 + 0.02 * e,
            "train_top5": 0.3 + 0.02 * e,
            "val_top1": 0.1 + 0.015 * e,
            "val_top5": 0.3 + 0.015 * e,
            "train_loss": 3.0 / e,
            "lr": 0.1 * 0.1 ** (e // 10),
        }
        for e in range(1, 31)
    ]
    _assert_png(plot_curves(rows, tmp_path / "curves.png"))


def test_plot_curves_one_epoch_and_missing_values(tmp_path):
    _assert_png(
        plot_curves([{"epoch": 1, "train_top1": 0.2, "val_top5": None}], tmp_path / "a.png")
    )
    rows = [
        {"epoch": 1, "train_loss": 2.0, "lr": 0.01},
        {"epoch": 2, "train_loss": 1.5, "lr": 0.01, "val_top1": 40.0, "val_top5": 75.0},
        {"epoch": 3, "train_loss": None, "train_top5": float("nan")},
    ]
    _assert_png(plot_curves(rows, tmp_path / "b.png"))
    with pytest.raises(ValueError):
        plot_curves([], tmp_path / "c.png")


def test_per_class_csv_round_trip(tmp_path):
    meter = ClassificationMeter(4)
    logits = torch.tensor([[3.0, 1, 0, 0], [0, 3.0, 1, 0], [3.0, 0, 1, 0], [0, 0, 0, 1.0]])
    meter.update(logits, torch.tensor([0, 1, 1, 3]))
    per_class = meter.results()["per_class"]
    labels = ["n01", "n02", "n03", "n04"]
    names = {"n01": "tabby, tabby cat", "n02": 'quote "x"', "n04": "ring"}
    path = write_per_class_csv(per_class, labels, tmp_path / "per_class.csv", names=names)

    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["class_index", "class_id", "name", "n", "top1", "top5"]
    assert len(rows) == 4
    assert rows[0] == {
        "class_index": "0",
        "class_id": "n01",
        "name": "tabby, tabby cat",
        "n": "1",
        "top1": "1.000000",
        "top5": "1.000000",
    }
    assert rows[1]["name"] == 'quote "x"'
    assert float(rows[1]["top1"]) == pytest.approx(0.5)
    assert rows[2]["n"] == "0" and rows[2]["top1"] == "" and rows[2]["name"] == ""
    for row, pc in zip(rows, per_class):
        assert int(row["n"]) == pc["n"]
        if pc["top5"] is not None:
            assert float(row["top5"]) == pytest.approx(pc["top5"])

    # without labels the class index doubles as the id
    path2 = write_per_class_csv(per_class, None, tmp_path / "p2.csv")
    with open(path2, newline="", encoding="utf-8") as f:
        assert [r["class_id"] for r in csv.DictReader(f)] == ["0", "1", "2", "3"]


def test_large_matrices_are_block_summed_not_subsampled():
    m = np.arange(1, 601 * 601 + 1, dtype=np.int64).reshape(601, 601)
    blocks, f = _block_sum(m)
    assert f == 3 and blocks.shape == (201, 201) and blocks.shape[0] <= MAX_CELLS
    assert blocks.sum() == m.sum()
    assert blocks[0, 0] == m[:3, :3].sum()
    assert blocks[-1, -1] == m[600, 600]  # padding adds nothing
    small = np.eye(5, dtype=np.int64)
    same, f1 = _block_sum(small)
    assert f1 == 1 and same is small
