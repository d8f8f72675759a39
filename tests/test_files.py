"""deepimage.files: the one atomic-write helper, used by the store and the run folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from deepimage import files
from deepimage.data import prepare_store, scan_folder
from deepimage.runs import RunMeta, save_state, save_weights
from tests.helpers import write_flat_folder


class _Published:
    """Stands in for ``os`` inside deepimage.files: records every file it renames into place."""

    def __init__(self) -> None:
        self.names: set[str] = set()

    def __getattr__(self, name: str):
        return getattr(os, name)

    def replace(self, src, dst) -> None:
        self.names.add(Path(dst).name)
        os.replace(src, dst)


@pytest.fixture
def published(monkeypatch: pytest.MonkeyPatch) -> _Published:
    recorder = _Published()
    monkeypatch.setattr(files, "os", recorder)
    return recorder


def test_atomic_write_leaves_the_old_file_when_the_write_fails(tmp_path: Path) -> None:
    files.atomic_write_text(tmp_path / "a.txt", "one")

    def fail(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        files.atomic_write(tmp_path / "a.txt", fail)
    assert (tmp_path / "a.txt").read_text() == "one"
    assert os.listdir(tmp_path) == ["a.txt"]


def test_the_store_publishes_every_file_but_its_streamed_shards_through_the_helper(
    tmp_path: Path, published: _Published
) -> None:
    folder = write_flat_folder(tmp_path / "flat", {"a": 3, "b": 2})
    out = tmp_path / "store"
    prepare_store(scan_folder(folder), out, [6], progress=False)
    written = {p.name for p in out.iterdir() if p.suffix != ".tar"}  # shards: fsynced streams
    assert written and written <= published.names


def test_the_run_folder_publishes_weights_and_checkpoints_through_the_helper(
    tmp_path: Path, published: _Published
) -> None:
    model = torch.nn.Linear(3, 2)
    meta = {"model": "m", "classes": ["a", "b"], "size": 8, "crop": 6,
            "mean": [0.5] * 3, "std": [0.25] * 3}  # fmt: skip
    save_weights(tmp_path / "model.safetensors", model, RunMeta.from_dict(meta, "test"))
    save_state(tmp_path / "checkpoint.safetensors", {"model": model.state_dict()})
    assert {p.name for p in tmp_path.iterdir()} <= published.names
