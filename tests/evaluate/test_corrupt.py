"""Corruptions for robustness evaluation: deterministic, graded, and wired into evaluate."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from deepimage.cli import main
from deepimage.evaluate.corrupt import (
    CORRUPTIONS,
    corrupt,
    parse_corruptions,
    parse_severities,
    summarise,
)
from deepimage.evaluate.evaluate import evaluate
from tests.helpers import make_run, write_flat_folder


def images(n: int = 4, size: int = 40, seed: int = 0) -> torch.Tensor:
    """Smooth images with structure (gradients plus a square), so geometry shows."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    base = torch.stack([xx * 255 / size, yy * 255 / size, (xx + yy) * 127 / size], -1)
    out = base[None].repeat(n, 1, 1, 1) + torch.rand(n, 1, 1, 3, generator=g) * 40
    out[:, 10:20, 12:22] = 240
    return out.clamp(0, 255).to(torch.uint8)


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_shape_dtype_determinism_and_batch_independence(name):
    x = images()
    rows = np.arange(10, 14)
    y = corrupt(x, rows, name, 3, seed=7)
    assert y.shape == x.shape and y.dtype == torch.uint8
    assert torch.equal(y, corrupt(x, rows, name, 3, seed=7))
    alone = corrupt(x[2:3], rows[2:3], name, 3, seed=7)  # same image, another batch
    assert torch.equal(alone[0], y[2])
    assert not torch.equal(y, x)


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_severity_grades_the_damage(name):
    x = images()
    rows = np.arange(4)
    damage = [(corrupt(x, rows, name, s).float() - x.float()).abs().mean().item() for s in
              range(1, 6)]  # fmt: skip
    assert all(a < b for a, b in zip(damage, damage[1:], strict=False)), damage


def test_seed_changes_random_corruptions_only_through_the_seed():
    x = images(8)
    rows = np.arange(8)
    for name in ("noise", "cast", "rotation"):
        assert not torch.equal(corrupt(x, rows, name, 2, 0), corrupt(x, rows, name, 2, 1))
    for name in ("blur", "vignette"):  # no randomness in these
        assert torch.equal(corrupt(x, rows, name, 2, 0), corrupt(x, rows, name, 2, 1))


def test_vignette_darkens_corners_not_the_centre():
    x = torch.full((1, 41, 41, 3), 200, dtype=torch.uint8)
    y = corrupt(x, [0], "vignette", 5)
    assert y[0, 20, 20].tolist() == [200, 200, 200]
    assert (y[0, 0, 0] < 100).all()


def test_rotation_is_a_rotation():
    """A horizontal bar through the centre, rotated, leaves the centre but not the row."""
    x = torch.zeros((1, 41, 41, 3), dtype=torch.uint8)
    x[:, 19:22, :] = 255
    y = corrupt(x, [0], "rotation", 5)  # 30 degrees
    assert y[0, 20, 20, 0] > 200
    assert y[0, 20, 3, 0] < 60 and y[0, 20, 37, 0] < 60


def test_parsing():
    assert parse_corruptions("cast, blur,cast") == ["cast", "blur"]
    assert parse_corruptions("all") == list(CORRUPTIONS)
    assert parse_severities("1..5") == [1, 2, 3, 4, 5]
    assert parse_severities("3") == [3] and parse_severities("5,1") == [1, 5]
    with pytest.raises(ValueError, match="unknown corruption 'fog'"):
        parse_corruptions("cast,fog")
    with pytest.raises(ValueError, match="severit"):
        parse_severities("0..6")


def test_summary_means():
    table = {"a": {1: 0.8, 2: 0.6}, "b": {1: 0.4, 2: 0.2}}
    s = summarise(0.9, table, [1, 2])
    assert s["mean_top1"] == pytest.approx({"a": 0.7, "b": 0.3})
    assert s["mean"] == pytest.approx(0.5) and s["top1"]["a"]["2"] == 0.6


def test_evaluate_reports_corruptions(tmp_path, capsys):
    data = write_flat_folder(tmp_path / "data", {"a": 3, "b": 3}, size=40)
    run = make_run(tmp_path / "run", ["a", "b"], size=40, width=0.0625)
    kw = {"batch_size": 4, "workers": 0, "device": "cpu", "progress": False}
    metrics = evaluate(run, data, corruptions=["noise", "blur"], severities=[1, 5],
                       cache_dir=str(tmp_path / "cache"), **kw)  # fmt: skip
    c = metrics["corruptions"]
    assert set(c["top1"]) == {"noise", "blur"} and c["severities"] == [1, 5]
    assert c["clean_top1"] == metrics["top1"]
    assert c["mean"] == pytest.approx(np.mean([np.mean(list(r.values())) for r in
                                               c["top1"].values()]))  # fmt: skip
    # the same numbers again (seeded), and with another batch size
    again = evaluate(run, data, corruptions=["noise", "blur"], severities=[1, 5],
                     cache_dir=str(tmp_path / "cache"), **{**kw, "batch_size": 1})  # fmt: skip
    assert again["corruptions"] == c

    out = tmp_path / "report"
    argv = ["-q", "evaluate", str(run), "--data", str(data), "--out", str(out),
            "--corrupt", "cast,rotation", "--severity", "2", "--workers", "0",
            "--device", "cpu", "--no-progress", "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "corruption" in printed and "rotation" in printed and "mean" in printed
    saved = json.loads((out / "metrics.json").read_text())["corruptions"]
    assert saved["severities"] == [2] and set(saved["top1"]) == {"cast", "rotation"}
