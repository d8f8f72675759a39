"""Multi-scale training: one member run per size, an ensemble manifest, resume per member."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from deepimage.cli import main
from deepimage.config import ConfigError, resolve_config
from deepimage.ensemble import expand_sources, load_members
from deepimage.train.loop import RunExistsError, train
from deepimage.train.multiscale import member_configs, train_multiscale
from tests.helpers import write_noise_folder

pytestmark = pytest.mark.slow  # trains one model per size


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ms") / "data"
    return write_noise_folder(root, classes=3, per_class=8, size=48, prefix="c")


def base_config(data: Path, out: Path, **extra):
    keys = {
        "data": str(data), "out": str(out), "cache_dir": str(out.parent / "cache"),
        "model": "vgg16_deepimage", "width": 0.0625, "crop": 32, "size": 40, "epochs": 2,
        "batch_size": 8, "workers": 0, "progress": False, "tensorboard": False,
        "precision": "fp32", "checkpoint_every": 1, "val_split": 0.25, **extra,
    }  # fmt: skip
    return resolve_config(None, keys)


def test_member_configs_replace_size_and_out(tmp_path):
    cfg = base_config(tmp_path, tmp_path / "run")
    members = member_configs(cfg, [40, 48])
    assert [(m.size, Path(m.out).name) for m in members] == [(40, "s40"), (48, "s48")]
    assert all(m.crop == 32 and m.seed == cfg.seed for m in members)
    with pytest.raises(ConfigError, match="smaller than crop"):
        member_configs(cfg, [40, 24])
    with pytest.raises(ConfigError, match="repeated"):
        member_configs(cfg, [40, 40])


def test_cli_trains_members_and_writes_manifest(data, tmp_path, capsys):
    run = tmp_path / "run"
    argv = [
        "-q", "train", "--data", str(data), "--out", str(run), "--sizes", "40", "48",
        "--cache-dir", str(tmp_path / "cache"), "--model", "vgg16_deepimage",
        "--width", "0.0625", "--crop", "32", "--epochs", "1", "--batch-size", "8",
        "--workers", "0", "--precision", "fp32", "--no-progress", "--no-tensorboard",
    ]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "ensemble:" in printed and printed.count("trained vgg16_deepimage") == 2
    manifest = json.loads((run / "ensemble.json").read_text())
    assert manifest["members"] == ["s40", "s48"] and manifest["sizes"] == [40, 48]
    assert manifest["crop"] == 32 and manifest["classes"] == ["c0", "c1", "c2"]
    members = load_members([run])
    assert [meta.preprocess.size for _, meta in members] == [40, 48]
    assert [meta.preprocess.crop for _, meta in members] == [32, 32]
    assert expand_sources([run]) == [run / "s40", run / "s48"]

    # --resume with nothing left to do skips the finished members and leaves them alone
    before = {s: (run / s / "model.safetensors").stat().st_mtime_ns for s in ("s40", "s48")}
    assert main(["-q", "train", "--out", str(run), "--resume"]) == 0  # sizes read back
    after = {s: (run / s / "model.safetensors").stat().st_mtime_ns for s in ("s40", "s48")}
    assert before == after

    # a fresh start into the same folder is refused before anything is written
    config = (run / "config.yaml").read_text()
    assert main([*argv, "--epochs", "3"]) == 2
    assert "already holds a multi-scale run" in capsys.readouterr().err
    assert (run / "config.yaml").read_text() == config


def test_resume_continues_the_unfinished_member_exactly(data, tmp_path):
    cfg = base_config(data, tmp_path / "interrupted")
    reference = train_multiscale(base_config(data, tmp_path / "reference"), [40, 48])
    assert len(reference["members"]) == 2
    # the first member finished, the second stopped after one step (as if killed there)
    first, second = member_configs(cfg, [40, 48])
    train(first)
    partial = train(dataclasses.replace(second, max_steps=1))
    assert partial["steps"] == 1
    mtime = (Path(first.out) / "model.safetensors").stat().st_mtime_ns
    result = train_multiscale(cfg, [40, 48], resume=True)
    assert result["members"][0].get("skipped_finished")
    assert (Path(first.out) / "model.safetensors").stat().st_mtime_ns == mtime
    for size in ("s40", "s48"):
        a = load_file(tmp_path / "reference" / size / "model.safetensors")
        b = load_file(tmp_path / "interrupted" / size / "model.safetensors")
        assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a), size


def test_member_folder_of_another_run_is_not_overwritten(data, tmp_path):
    cfg = base_config(data, tmp_path / "run", epochs=1)
    train_multiscale(cfg, [40])
    with pytest.raises(RunExistsError):
        train_multiscale(cfg, [40])
