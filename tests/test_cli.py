"""The command-line contract end to end: train on a messy folder, evaluate, predict, errors."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from deepimage.cli import main
from tests.helpers.messy import make_messy_folder

TINY = ["--model", "vgg16_deepimage", "--width", "0.0625", "--size", "40", "--crop", "32"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained through the CLI on the messy folder."""
    root = tmp_path_factory.mktemp("cli")
    messy = make_messy_folder(root / "messy")
    run = root / "run"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(
            ["-q", "train", "--data", str(messy["root"]), "--out", str(run), *TINY]
            + ["--epochs", "2", "--batch-size", "4", "--val-split", "0.25", "--workers", "0"]
            + ["--cache-dir", str(root / "cache"), "--no-progress"]
        )
    assert code == 0
    (root / "train-output.txt").write_text(printed.getvalue())
    return root, messy, run


def test_messy_folder_trains_to_the_end_and_reports_each_skipped_file(trained, capsys):
    root, messy, run = trained
    summary = json.loads((run / "summary.json").read_text())
    for key in ("classes", "n_train_images", "n_val_images", "skipped", "val_top1", "val_top5"):
        assert key in summary
    assert summary["classes"] == messy["classes"]  # empty class folders left out
    assert summary["n_train_images"] + summary["n_val_images"] == len(messy["ok"])
    skipped = {str(Path(s["path"]).relative_to(messy["root"])) for s in summary["skipped"]}
    assert skipped == set(messy["skipped"])
    assert all(s["reason"] for s in summary["skipped"])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    for key in ("train_loss", "train_top1", "train_top5", "val_top1", "val_top5", "lr"):
        assert rows[-1][key] is not None
    assert rows[-1]["images_per_s"] > 0
    for name in ("model.safetensors", "model.json", "config.yaml", "curves.png"):
        assert (run / name).stat().st_size > 0
    assert any((run / "tb").iterdir())


def test_the_run_ends_with_a_report_of_every_skipped_file(trained):
    """README: each skipped file is reported by path with its reason at the end of the run."""
    root, messy, run = trained
    lines = (root / "train-output.txt").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("skipped "))
    assert lines[start] == f"skipped {len(messy['skipped'])} unreadable files:"
    report = lines[start + 1 : start + 1 + len(messy["skipped"])]
    summary = json.loads((run / "summary.json").read_text())["skipped"]
    expected = [f"  {s['path']}: {s['reason']}" for s in summary]
    assert sorted(report) == sorted(expected)
    reported = {
        str(Path(line.strip().split(": ", 1)[0]).relative_to(messy["root"])) for line in report
    }
    assert reported == set(messy["skipped"])
    assert lines[start + 1 + len(report) :] == [f"run folder: {run}"]  # the last lines


def test_evaluate_writes_the_report(trained, capsys):
    root, messy, run = trained
    out = root / "report"
    assert main(["-q", "evaluate", str(run), "--data", str(messy["root"]), "--out", str(out),
                 "--workers", "0", "--no-progress"]) == 0  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_images"] == len(messy["ok"])
    count = _count_by_hand(run, messy)
    n = len(messy["ok"])
    assert abs(metrics["top1"] * n - count["top1"]) <= count["near_ties"] + 1e-6
    assert metrics["top5"] == 1.0  # 3 classes: every label is within the top 5
    if count["near_ties"] == 0:
        assert metrics["mean_class_acc"] == pytest.approx(count["mean_class_acc"])
    lines = (out / "per_class.csv").read_text().splitlines()
    assert len(lines) == 1 + len(messy["classes"])
    for name in ("confusion.png", "top5_confusion.png"):
        with Image.open(out / name) as im:
            assert im.size[0] > 100
    assert "top-1" in capsys.readouterr().out


def _count_by_hand(run: Path, messy: dict) -> dict:
    """Top-1 hits of the run's model on every readable file of the messy folder, counted
    here: each file decoded at the run's size, centre-cropped and normalised with numpy,
    its label read from its folder name."""
    import numpy as np
    import torch

    from deepimage.data.decode import decode_image
    from deepimage.runs import load_model

    model, meta = load_model(run)
    pre = meta.preprocess
    size, crop = pre.size, pre.crop
    top = (size - crop) // 2
    images, labels = [], []
    for rel in messy["ok"]:
        image = decode_image(messy["root"] / rel, size, mode=pre.resize_mode)
        x = image[top : top + crop, top : top + crop].astype(np.float32) / 255
        images.append((x - np.array(pre.mean, np.float32)) / np.array(pre.std, np.float32))
        labels.append(meta.classes.index(rel.split("/")[0]))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        logits = model(x).numpy()
    labels = np.array(labels)
    hits = logits.argmax(1) == labels
    ordered = np.sort(logits, axis=1)
    per_class = [hits[labels == c].mean() for c in np.unique(labels)]
    return {
        "top1": int(hits.sum()),
        "near_ties": int((ordered[:, -1] - ordered[:, -2] < 1e-4).sum()),
        "mean_class_acc": float(np.mean(per_class)),
    }


def test_predict_prints_ids_names_and_probabilities(trained, capsys):
    root, messy, run = trained
    image = messy["root"] / messy["ok"][0]
    assert main(["predict", str(run), str(image), "--topk", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(image) and len(lines) == 3
    names = messy["class_names"]
    for line in lines[1:]:
        label, prob = line.rsplit(maxsplit=1)
        class_id = label.split()[0]
        assert label.strip() == f"{class_id} {names[class_id]}".strip()
        assert 0 <= float(prob) <= 1
    assert main(["predict", str(run), str(image), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    probs = [p["probability"] for p in result["top"]]
    assert len(probs) == 3 and probs == sorted(probs, reverse=True)
    assert sum(probs) == pytest.approx(1, abs=1e-4)


def test_predict_reports_an_unreadable_file_and_goes_on(trained, capsys):
    root, messy, run = trained
    bad = messy["root"] / next(iter(messy["skipped"]))
    good = messy["root"] / messy["ok"][0]
    assert main(["predict", str(run), str(bad), str(good), "--json"]) == 1
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert "error" in out[0] and "top" in out[1]


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["train", "--data", "nowhere", "--out", "x", "--lr", "-1"], "'lr'"),
        (["train", "--data", "nowhere", "--out", "x", "--crop", "300"], "'crop'"),
        (["evaluate", "no-such-run", "--data", "d"], "no-such-run"),
        (["predict", "no-such-run.safetensors", "img.jpg"], "no-such-run.safetensors"),
    ],
)
def test_user_errors_are_one_line_naming_the_culprit(argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("deepimage: error:") and needle in err and "\n" not in err


def test_bad_config_file_key(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("epochs: 2\nlearning_rate: 0.1\n")
    assert main(["train", "--config", str(cfg), "--data", "d", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "'learning_rate'" in err and str(cfg) in err


def test_corrupted_weights_give_a_clear_error(tmp_path, capsys):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    assert main(["predict", str(weights), "x.jpg"]) == 2
    assert "corrupted" in capsys.readouterr().err


def test_dense_at_the_crop_size_equals_center_and_tta_combines(tmp_path, capsys):
    """Images stored at exactly the crop size: dense evaluation sees the centre crop."""
    from deepimage.evaluate.evaluate import evaluate
    from tests.helpers import write_flat_folder

    data = write_flat_folder(tmp_path / "d", {"a": 6, "b": 6, "c": 6})
    run = tmp_path / "run"
    args = ["-q", "train", "--data", str(data), "--out", str(run), "--model", "vgg16_deepimage",
            "--width", "0.0625", "--size", "32", "--crop", "32", "--epochs", "1",
            "--batch-size", "4", "--workers", "0", "--no-progress", "--precision", "fp32",
            "--cache-dir", str(tmp_path / "c")]  # fmt: skip
    assert main(args) == 0
    kw = {"workers": 0, "progress": False, "cache_dir": str(tmp_path / "c")}
    center = evaluate(run, data, tmp_path / "center", tta=["center"], **kw)
    dense = evaluate(run, data, tmp_path / "dense", tta=["dense"], **kw)
    for key in ("top1", "top5", "mean_class_acc", "n_images"):
        assert dense[key] == center[key]
    both = evaluate(run, data, None, tta=["dense", "flip"], scales=[32, 48], **kw)
    assert both["n_images"] == center["n_images"] and both["scales"] == [32, 48]
