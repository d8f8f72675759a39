"""Fine-tuning: the head replaced, frozen layers really frozen, exact resume, the command."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from deepimage.cli import main
from deepimage.config import ConfigError, resolve_config
from deepimage.models import get_model
from deepimage.models.transfer import set_trainable, weight_layers
from deepimage.rng import seed_global
from deepimage.runs import WEIGHTS
from deepimage.train.finetune import finetune_config
from deepimage.train.loop import start_model, train
from tests.helpers import make_run, save_weights_v1, write_noise_folder

pytestmark = pytest.mark.slow  # trains, resumes and fine-tunes

HEAD = "classifier.7"  # the softmax layer of the deepimage VGG


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    data = write_noise_folder(root / "data", classes=3, per_class=8, size=48, prefix="c")
    return make_run(root / "source", ["x", "y"], size=40, width=0.0625), data


def tiny_config(source: Path, data: Path, out: Path, **extra):
    flags = {
        "init_from": str(source), "data": str(data), "out": str(out),
        "cache_dir": str(out.parent / "cache"), "epochs": 2, "batch_size": 8, "workers": 0,
        "progress": False, "tensorboard": False, "precision": "fp32", "checkpoint_every": 1,
        "val_split": 0.25, **extra,
    }  # fmt: skip
    return finetune_config(flags)


def test_config_takes_the_source_model_and_the_paper_schedule(source, tmp_path):
    run, data = source
    cfg = tiny_config(run, data, tmp_path / "ft", epochs=3)
    assert (cfg.model, cfg.width, cfg.size, cfg.crop) == ("vgg16_deepimage", 0.0625, 40, 32)
    assert cfg.lr == 0.001 and cfg.schedule == "step" and cfg.gamma == 0.1
    assert cfg.milestones == [2]
    assert tiny_config(run, data, tmp_path / "ft", lr=0.01).lr == 0.01  # flags win
    with pytest.raises(ConfigError, match="trainable"):
        tiny_config(run, data, tmp_path / "ft", trainable="last:x")


def test_head_replaced_and_the_rest_copied(source):
    run, _ = source
    keys = {"model": "vgg16_deepimage", "width": 0.0625, "size": 40, "crop": 32,
            "init_from": str(run), "trainable": "head"}  # fmt: skip
    cfg = resolve_config(None, keys)
    model = get_model("vgg16_deepimage", num_classes=3, image_size=32, width=0.0625)
    report = start_model(model, cfg, ["a", "b", "c"])
    assert len(report.replaced) == 1 and report.replaced[0].startswith(HEAD)
    assert "-> 2 classes" in report.replaced[0] and "-> 3" in report.replaced[0]
    saved = load_file(run / WEIGHTS)
    own = model.state_dict()
    assert all(torch.equal(own[k], saved[k]) for k in saved if not k.startswith(HEAD))
    assert own[f"{HEAD}.weight"].shape == (3, saved[f"{HEAD}.weight"].shape[1])
    head_params = sum(p.numel() for p in model.classifier[7].parameters())
    assert report.trainable_params == head_params
    assert report.frozen_params == sum(p.numel() for p in model.parameters()) - head_params
    assert any("trainable" in line for line in report.lines())


def test_last_k_and_norm_layers():
    model = get_model("vgg16_deepimage", num_classes=3, image_size=32, width=0.0625)
    names = set_trainable(model, "last:3")
    assert names == ["classifier.1", "classifier.4", "classifier.7"]  # the three FC layers
    assert all(not p.requires_grad for p in model.features.parameters())
    assert all(p.requires_grad for p in model.classifier.parameters())
    resnet = get_model("resnet18", num_classes=3, image_size=32, width=0.25)
    names = set_trainable(resnet, "last:2")
    assert names == [n for n, _ in weight_layers(resnet)][-2:]
    assert set_trainable(resnet, "all") == ["all layers"]
    assert all(p.requires_grad for p in resnet.parameters())


def test_frozen_weights_and_statistics_are_bitwise_unchanged(source, tmp_path):
    """ResNet with batch norm, only the last two weight layers trained: everything else,
    running statistics included, is exactly the source's after training."""
    _, data = source
    torch.manual_seed(3)
    base = get_model("resnet18", num_classes=2, image_size=32, width=0.25)
    src = tmp_path / "resnet"
    meta = {"model": "resnet18", "model_kwargs": {"width": 0.25, "dropout": None},
            "classes": ["x", "y"], "class_names": {}, "size": 40, "crop": 32,
            "resize_mode": "stretch", "mean": list(base.mean), "std": list(base.std),
            "precision": "fp32"}  # fmt: skip
    save_weights_v1(src / WEIGHTS, base, meta)  # a source run written by the first version
    cfg = tiny_config(src, data, tmp_path / "ft", trainable="last:2", lr=0.05)
    summary = train(cfg)
    trainable = summary["finetune"]["trainable_layers"]
    before, after = load_file(src / WEIGHTS), load_file(tmp_path / "ft" / WEIGHTS)
    changed = {k for k in after if k in before and not torch.equal(before[k], after[k])}
    changed |= {k for k in after if k not in before or before[k].shape != after[k].shape}
    layers = {k.rpartition(".")[0] for k in changed}
    assert layers and layers <= set(trainable) | {"features.layer4.1.bn2"}, layers
    assert any(k.endswith("running_mean") for k in before)  # there were statistics to keep
    assert "fc" in str(trainable) or "classifier" in str(trainable)


def test_head_only_training_moves_only_the_head(source, tmp_path):
    run, data = source
    cfg = tiny_config(run, data, tmp_path / "ft", trainable="head", lr=0.5, epochs=1)
    train(cfg)
    before, after = load_file(run / WEIGHTS), load_file(tmp_path / "ft" / WEIGHTS)
    for k in before:
        if not k.startswith(HEAD):
            assert torch.equal(before[k], after[k]), k
    seed_global(cfg.seed)  # the head the run started from: fresh, then it learned
    fresh = get_model("vgg16_deepimage", num_classes=3, image_size=32, width=0.0625)
    assert after[f"{HEAD}.weight"].shape == fresh.classifier[7].weight.shape
    assert not torch.equal(after[f"{HEAD}.weight"], fresh.classifier[7].weight.detach())


def test_resume_is_exact(source, tmp_path):
    run, data = source
    full = train(tiny_config(run, data, tmp_path / "full", trainable="last:3"))
    cut = tiny_config(run, data, tmp_path / "cut", trainable="last:3")
    assert train(dataclasses.replace(cut, max_steps=3))["steps"] == 3
    resumed = train(cut, resume=True)
    assert resumed["steps"] == full["steps"]
    a, b = load_file(tmp_path / "full" / WEIGHTS), load_file(tmp_path / "cut" / WEIGHTS)
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


def test_cli_reports_what_changed(source, tmp_path, capsys):
    run, data = source
    out = tmp_path / "cli"
    argv = [
        "-q", "finetune", "--from", str(run), "--data", str(data), "--out", str(out),
        "--trainable", "last:2", "--epochs", "2", "--batch-size", "8", "--workers", "0",
        "--cache-dir", str(tmp_path / "cache"), "--precision", "fp32", "--no-progress",
        "--no-tensorboard",
    ]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"replaced {HEAD}" in printed and "trainable (last:2)" in printed
    assert "frozen" in printed
    report = json.loads((out / "finetune.json").read_text())
    assert report["trainable_layers"] == ["classifier.4", "classifier.7"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["lr"] == pytest.approx(0.001) and rows[1]["lr"] == pytest.approx(0.0001)
    assert main([*argv[:2], "--from", str(run), "--data", str(data), "--out",
                 str(tmp_path / "bad"), "--trainable", "some"]) == 2  # fmt: skip
    assert "trainable" in capsys.readouterr().err
