"""deepimage.runmeta and the run folder: typed metadata, old run folders, bad keys."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from deepimage.inference import posteriors_for
from deepimage.models import get_model
from deepimage.runmeta import Preprocess, RunMeta
from deepimage.runs import WEIGHTS, CheckpointError, Run, load_model, read_meta, save_weights
from deepimage.serve.predict import Predictor
from tests.helpers import save_weights_v1

CLASSES = ["n01", "n02", "n03"]


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return get_model("vgg16_deepimage", num_classes=3, image_size=32, width=0.0625).eval()


def _v1_meta(net: torch.nn.Module) -> dict:
    """The weights' metadata exactly as training wrote it before RunMeta existed."""
    return {
        "model": "vgg16_deepimage",
        "model_kwargs": {"width": 0.0625, "dropout": None},
        "classes": CLASSES,
        "class_names": {"n01": "tench"},
        "size": 40,
        "crop": 32,
        "resize_mode": "shorter",
        "mean": [0.4, 0.5, 0.6],
        "std": [0.2, 0.25, 0.3],
        "precision": "bf16",
    }


def _by_hand(net: torch.nn.Module, images: np.ndarray, crop: int, mean, std) -> np.ndarray:
    top = (images.shape[1] - crop) // 2
    x = images[:, top : top + crop, top : top + crop].astype(np.float32) / 255
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    with torch.no_grad():
        logits = net(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous())
    return torch.softmax(logits, 1).numpy()


def test_a_run_folder_written_by_the_first_version_opens(tmp_path: Path) -> None:
    net, run = _net(), tmp_path / "old"
    v1 = _v1_meta(net)
    save_weights_v1(run / WEIGHTS, net, v1)
    model, meta = load_model(run)
    pre = meta.preprocess
    assert (meta.model, list(meta.classes), dict(meta.class_names)) == (
        v1["model"], v1["classes"], v1["class_names"])  # fmt: skip
    assert (pre.size, pre.crop, pre.resize_mode, pre.precision) == (40, 32, "shorter", "bf16")
    assert (list(pre.mean), list(pre.std)) == (v1["mean"], v1["std"])
    assert read_meta(run) == meta == Run(run).meta()
    images = np.random.default_rng(0).integers(0, 256, (4, 40, 40, 3), np.uint8)
    want = _by_hand(net, images, 32, v1["mean"], v1["std"])
    predictor = Predictor.load(run, device="cpu", precision="fp32")
    np.testing.assert_allclose(predictor.probabilities(images), want, atol=1e-6)
    assert predictor.top(want[0], 3)[[p["class_id"] for p in predictor.top(want[0], 3)].index(
        "n01")]["name"] == "tench"  # fmt: skip


def test_keys_older_files_lack_take_their_defaults(tmp_path: Path) -> None:
    net = _net()
    v0 = {k: v for k, v in _v1_meta(net).items() if k not in
          ("resize_mode", "precision", "class_names", "model_kwargs")}  # fmt: skip
    v0["model_kwargs"] = {"width": 0.0625}
    save_weights_v1(tmp_path / "w.safetensors", net, v0)
    _, meta = load_model(tmp_path / "w.safetensors")
    assert meta.preprocess.resize_mode == "stretch" and meta.preprocess.precision == "fp32"
    assert not meta.preprocess.channels_last and dict(meta.class_names) == {}
    assert meta.labels() == CLASSES and meta.dropout is None


def test_new_files_keep_every_key_and_value_of_the_first_version(tmp_path: Path) -> None:
    """Written by save_weights, the metadata holds the first version's keys unchanged (so
    exported files and older readers still understand it) and reads back equal."""
    net = _net()
    v1 = _v1_meta(net)
    meta = RunMeta.from_dict(v1, "test")
    save_weights(tmp_path / WEIGHTS, net, meta)
    written = json.loads((tmp_path / "model.json").read_text())
    assert {k: written[k] for k in v1} == v1
    assert read_meta(tmp_path) == meta and load_model(tmp_path)[1] == meta


def test_posteriors_follow_the_runs_preprocessing(tmp_path: Path) -> None:
    """Every field of Preprocess reaches the forward pass: crop, mean and std."""
    net = _net()
    pre = Preprocess(size=40, crop=32, mean=(0.1, 0.2, 0.3), std=(0.5, 0.4, 0.3))
    images = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (3, 40, 40, 3), np.uint8))
    got = posteriors_for(net, images, pre, torch.device("cpu")).numpy()
    np.testing.assert_allclose(got, _by_hand(net, images.numpy(), 32, pre.mean, pre.std), atol=1e-6)


@pytest.mark.parametrize(
    ("key", "value", "says"),
    [
        ("crop", None, "missing"),
        ("classes", None, "missing"),
        ("mean", [0.5, 0.5], "3 numbers"),
        ("std", [0.2, 0.0, 0.3], "3 positive numbers"),
        ("size", "40", "positive whole number"),
        ("crop", 48, "exceeds size"),
        ("resize_mode", "squash", "stretch, shorter"),
        ("classes", [], "class ids"),
        ("model", 3, "name"),
        ("model_kwargs", [1], "JSON object"),
    ],
)
def test_a_bad_or_missing_key_is_one_line_naming_file_and_key(
    tmp_path: Path, key: str, value, says: str
) -> None:
    net = _net()
    meta = _v1_meta(net)
    if value is None:
        del meta[key]
    else:
        meta[key] = value
    save_weights_v1(tmp_path / WEIGHTS, net, meta)
    for read in (load_model, read_meta, Predictor.load):
        with pytest.raises(CheckpointError) as info:
            read(tmp_path)
        message = str(info.value)
        assert "\n" not in message and f"'{key}'" in message and says in message
        assert str(tmp_path / "model") in message  # model.safetensors or model.json
