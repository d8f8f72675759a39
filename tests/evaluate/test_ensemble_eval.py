"""Ensembles in evaluate: posteriors are the mean of the members' posteriors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from deepimage.cli import main
from deepimage.data.decode import decode_image
from deepimage.ensemble import write_manifest
from deepimage.evaluate.evaluate import Evaluation, evaluate
from deepimage.runs import load_model
from tests.helpers import make_run, write_photo_folder

KW = {"batch_size": 4, "workers": 0, "device": "cpu", "progress": False, "precision": "fp32"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ens_eval")
    data = write_photo_folder(root / "data", {"a": 4, "b": 3}, size=36)
    members = [
        make_run(root / "ens" / f"s{size}", ["a", "b"], size=size, width=0.0625, seed=seed)
        for seed, size in enumerate((40, 48))
    ]
    write_manifest(root / "ens", members)
    return root, data, members


def independent_posteriors(run: Path, data: Path) -> np.ndarray:
    """Decode, resize, centre-crop, normalise and run one image at a time, by hand."""
    model, meta = load_model(run)
    pre = meta.preprocess
    size, crop = pre.size, pre.crop
    files = sorted(p for p in data.rglob("*.png"))
    out = []
    for path in files:
        img = decode_image(path, size, mode=pre.resize_mode).astype(np.float32) / 255
        top = (size - crop) // 2
        img = img[top : top + crop, top : top + crop]
        x = (img - np.array(pre.mean, np.float32)) / np.array(pre.std, np.float32)
        x = torch.from_numpy(x).permute(2, 0, 1)[None].contiguous()
        with torch.no_grad():
            out.append(torch.softmax(model(x), dim=1)[0].numpy())
    return np.stack(out)


def test_ensemble_posteriors_are_the_mean_of_the_members(setup, tmp_path):
    root, data, members = setup
    ev = Evaluation(root / "ens", data, cache_dir=str(tmp_path), **KW)
    assert ev.is_ensemble and [m.preprocess.size for _, m in ev.members] == [40, 48]
    combined, each = ev.posteriors()
    expected = [independent_posteriors(run, data) for run in members]
    for got, want in zip(each, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(combined, (expected[0] + expected[1]) / 2, rtol=1e-4, atol=1e-5)
    assert np.abs(expected[0] - expected[1]).max() > 1e-3  # the mean is not trivial (>> atol)


def test_several_runs_equal_the_manifest(setup, tmp_path):
    root, data, members = setup
    kw = {**KW, "cache_dir": str(tmp_path)}
    by_manifest = evaluate(root / "ens" / "ensemble.json", data, **kw)
    by_runs = evaluate(members, data, **kw)
    assert by_manifest == by_runs
    assert by_manifest["model"] == "ensemble"
    assert [m["size"] for m in by_manifest["members"]] == [40, 48]
    assert [Path(m["source"]).name for m in by_manifest["members"]] == ["s40", "s48"]


def test_single_run_keeps_its_format(setup, tmp_path):
    root, data, members = setup
    metrics = evaluate(members[0], data, tmp_path / "report", cache_dir=str(tmp_path), **KW)
    assert "members" not in metrics and metrics["model"] == "vgg16_deepimage"
    assert metrics["scales"] == [40]
    want = independent_posteriors(members[0], data)
    labels = np.array([0] * 4 + [1] * 3)  # each photo's colour class
    assert list(want.argmax(1)) == list(labels)  # the model tells the photos apart
    assert metrics["top1"] == pytest.approx(np.mean(want.argmax(1) == labels)) == 1.0


def test_cli_prints_members_and_ensemble(setup, tmp_path, capsys):
    root, data, members = setup
    out = tmp_path / "report"
    argv = [
        "-q", "evaluate", str(root / "ens"), "--data", str(data), "--out", str(out),
        "--workers", "0", "--device", "cpu", "--no-progress", "--tta", "center", "flip",
    ]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    lines = [line.split()[0] for line in printed.splitlines() if line.strip()]
    assert lines[:4] == ["member", "s40", "s48", "ensemble"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["members"]) == 2 and metrics["tta"] == ["center", "flip"]
    assert (out / "per_class.csv").exists()


def test_mismatched_members_are_refused(setup, tmp_path, capsys):
    root, data, members = setup
    other = make_run(tmp_path / "other", ["a", "c"], width=0.0625)
    argv = ["evaluate", str(members[0]), str(other), "--data", str(data), "--device", "cpu"]
    assert main(argv) == 2
    assert "classes differ" in capsys.readouterr().err
