"""The ensemble manifest: writing, expanding into member runs, loading with checks."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from deepimage.ensemble import ENSEMBLE_FILE, expand_sources, load_members, write_manifest
from deepimage.runs import CheckpointError
from tests.helpers import make_run

TINY = 0.0625  # width of the members' VGG


@pytest.fixture
def ensemble(tmp_path):
    root = tmp_path / "ens"
    members = [
        make_run(root / "s40", ["a", "b"], size=40, width=TINY, seed=0),
        make_run(root / "s48", ["a", "b"], size=48, width=TINY, seed=1),
    ]
    return root, members, write_manifest(root, members, note="test")


def test_manifest_is_relative_and_records_crop_and_classes(ensemble):
    root, members, path = ensemble
    assert path == root / ENSEMBLE_FILE
    manifest = json.loads(path.read_text())
    assert manifest["members"] == ["s40", "s48"]
    assert manifest["version"] == 1
    assert manifest["crop"] == 32
    assert manifest["classes"] == ["a", "b"]
    assert manifest["sizes"] == [40, 48]
    assert manifest["note"] == "test"
    assert not list(root.glob(".*.tmp"))  # atomic write leaves no temporary file


def test_expand_manifest_file_and_folder(ensemble, tmp_path):
    root, members, path = ensemble
    expected = [root / "s40", root / "s48"]
    assert expand_sources([path]) == expected
    assert expand_sources([root]) == expected
    other = tmp_path / "other"
    assert expand_sources([other, root / "s40"]) == [other, root / "s40"]


def test_ensemble_survives_a_move(ensemble, tmp_path):
    root, _, _ = ensemble
    moved = tmp_path / "moved"
    shutil.move(root, moved)
    assert expand_sources([moved]) == [moved / "s40", moved / "s48"]
    assert len(load_members([moved])) == 2


def test_load_members_gives_models_in_eval_mode_with_meta(ensemble):
    root, _, _ = ensemble
    loaded = load_members([root])
    assert [meta.preprocess.size for _, meta in loaded] == [40, 48]
    assert all(not model.training for model, _ in loaded)
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():  # two different members, not one loaded twice
        assert not torch.equal(loaded[0][0](x), loaded[1][0](x))


def test_differing_classes_are_refused(tmp_path):
    a = make_run(tmp_path / "a", ["x", "y"], width=TINY)
    b = make_run(tmp_path / "b", ["x", "z"], width=TINY)
    with pytest.raises(CheckpointError, match="classes differ") as err:
        load_members([a, b])
    assert str(b) in str(err.value) and "\n" not in str(err.value)


def test_missing_member_is_refused(ensemble):
    root, _, path = ensemble
    shutil.rmtree(root / "s48")
    with pytest.raises(CheckpointError, match="s48"):
        load_members([path])


def test_missing_run_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="nope"):
        load_members([tmp_path / "nope"])


def test_bad_manifest_is_refused(tmp_path):
    (tmp_path / ENSEMBLE_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match=ENSEMBLE_FILE):
        expand_sources([tmp_path])
    (tmp_path / ENSEMBLE_FILE).write_text(json.dumps({"members": []}))
    with pytest.raises(CheckpointError, match="no 'members'"):
        expand_sources([tmp_path])


def test_manifest_of_unfinished_members(tmp_path):
    """Members still training are listed; crop and classes come from ``info``."""
    path = write_manifest(tmp_path, [tmp_path / "s1", tmp_path / "s2"], crop=24, classes=["a"])
    manifest = json.loads(path.read_text())
    assert manifest["members"] == ["s1", "s2"] and manifest["crop"] == 24
