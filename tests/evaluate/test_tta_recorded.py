"""Shifted-crop test-time views, and evaluate applying the views a run recorded."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from deepimage.evaluate.evaluate import evaluate
from deepimage.inference import posteriors_for, shifted_views
from deepimage.report import plot_time_to_accuracy, time_to_accuracy
from deepimage.runmeta import Preprocess
from deepimage.runs import WEIGHTS, read_weights, save_weights
from tests.helpers import make_run, write_photo_folder

KW = {"batch_size": 4, "workers": 0, "device": "cpu", "progress": False, "precision": "fp32"}


def test_shifted_views_are_reflect_padded_diagonal_moves():
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).reshape(2, 3, 5, 5)
    padded = np.pad(x.numpy(), ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect")
    up_left, down_right = shifted_views(x)
    assert np.array_equal(up_left.numpy(), padded[:, :, :5, :5])
    assert np.array_equal(down_right.numpy(), padded[:, :, 2:, 2:])


def test_shift_weights_the_centre_one_half_and_each_shift_one_quarter():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(1), torch.nn.Linear(3 * 6 * 6, 4)).eval()
    images = torch.randint(0, 256, (3, 6, 6, 3), dtype=torch.uint8)
    pre, cpu = Preprocess(size=6, crop=6, mean=(0.5,) * 3, std=(0.25,) * 3), torch.device("cpu")
    got = posteriors_for(net, images, pre, cpu, tta=["center", "flip", "shift"])
    centre = posteriors_for(net, images, pre, cpu, tta=["center"])
    x = (images.permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25

    def p(v):
        with torch.no_grad():
            return (torch.softmax(net(v), 1) + torch.softmax(net(v.flip(3)), 1)) / 2

    a, b = shifted_views(x)
    torch.testing.assert_close(got, 0.5 * p(x) + 0.25 * p(a) + 0.25 * p(b))
    assert not torch.allclose(got, centre)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    root = tmp_path_factory.mktemp("tta")
    data = write_photo_folder(root / "data", {"a": 4, "b": 3}, size=36)
    run = make_run(root / "run", ["a", "b"], size=40, width=0.0625)
    tensors, meta = read_weights(run)
    meta = dataclasses.replace(meta, tta=("center", "flip", "shift"))
    save_weights(run / WEIGHTS, tensors, meta)
    return root, data, run


def test_evaluate_applies_the_recorded_views_unless_told(recorded, tmp_path):
    root, data, run = recorded
    cache = str(root / "cache")
    default = evaluate(run, data, tmp_path / "d", cache_dir=cache, **KW)
    assert default["tta"] == ["center", "flip", "shift"]
    explicit = evaluate(run, data, tmp_path / "e", cache_dir=cache, tta=["center"], **KW)
    assert explicit["tta"] == ["center"]


def test_time_to_accuracy_curve(tmp_path):
    rows = [{"epoch": 1, "train_s": 10.0, "val_top1": 0.5}, {"epoch": 2, "val_top1": 0.6},
            {"epoch": 3, "train_s": 30.0, "val_top1": 0.7}]  # fmt: skip
    assert time_to_accuracy(rows) == ([10.0, 30.0], [0.5, 0.7])
    assert plot_time_to_accuracy(rows, tmp_path / "t.png", target=0.94).stat().st_size > 0
    with pytest.raises(ValueError, match="train_s"):
        plot_time_to_accuracy([{"epoch": 1}], tmp_path / "u.png")
