import logging
import os
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from deepimage.data import DataError, DatasetIndex, Sample, load_index
from deepimage.data.index import (
    IMAGE_EXTENSIONS,
    read_class_names,
    read_manifest,
    scan_folder,
    split_index,
)
from tests.helpers import write_flat_folder


def _rel(index: DatasetIndex, root: Path) -> list[str]:
    return [Path(os.path.relpath(s.path, root)).as_posix() for s in index.samples]


def test_scan_messy_folder_finds_exactly_the_image_files(messy, caplog):
    root = messy["root"]
    with caplog.at_level(logging.WARNING, logger="deepimage.data.index"):
        index = scan_folder(root)
    assert index.classes == messy["classes"]
    assert sorted(_rel(index, root)) == sorted(messy["indexed"])
    for rel, label in zip(_rel(index, root), index.targets):
        assert index.classes[label] == messy["indexed"][rel]
    for name in messy["empty_classes"]:
        assert any(name in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    # Uppercase extensions and nested folders are kept; hidden and stray files are not.
    rels = set(_rel(index, root))
    assert {"cats/upper_ext.JPG", "dogs/upper_ext.PNG", "cats/nested/deeper/nested.png"} <= rels
    assert not rels & set(messy["ignored"])


def test_scan_paths_are_absolute_normalized_and_sorted(flat_folder):
    index = scan_folder(str(flat_folder) + "/./")
    assert index.root == os.path.abspath(flat_folder)
    for s in index.samples:
        assert os.path.isabs(s.path) and s.path == os.path.normpath(s.path)
    keys = [(s.label, s.path) for s in index.samples]
    assert keys == sorted(keys)
    assert Counter(index.targets) == {0: 5, 1: 4, 2: 3}
    assert len(index) == 12


def test_scan_uses_class_names_file_automatically(messy):
    index = scan_folder(messy["root"])
    assert index.class_names == messy["class_names"]
    label = index.classes.index("cats")
    assert index.display_name(label) == "cats Felis catus"


def test_explicit_class_names_file_and_display_name_without_name(flat_folder, tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("a first class\n\n# comment\nb\n", encoding="utf-8")
    index = scan_folder(flat_folder, class_names_file=names)
    assert index.class_names == {"a": "first class", "b": ""}
    assert index.display_name(0) == "a first class"
    assert index.display_name(1) == "b"
    assert index.display_name(2) == "c"


def test_read_class_names_imagenet_style(tmp_path):
    path = tmp_path / "names.txt"
    path.write_text("n02123045 tabby, tabby cat\nn01440764\ttench, Tinca tinca\n", encoding="utf-8")
    assert read_class_names(path) == {
        "n02123045": "tabby, tabby cat",
        "n01440764": "tench, Tinca tinca",
    }
    with pytest.raises(DataError, match="missing.txt"):
        read_class_names(tmp_path / "missing.txt")


def test_scan_errors_name_the_path(tmp_path):
    with pytest.raises(DataError, match="not a folder") as e:
        scan_folder(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match="no class folders with images"):
        scan_folder(tmp_path / "empty")
    assert issubclass(DataError, ValueError)


def test_image_extensions_are_case_insensitive_set():
    assert ".jpg" in IMAGE_EXTENSIONS and ".tiff" in IMAGE_EXTENSIONS
    assert all(e == e.lower() for e in IMAGE_EXTENSIONS)


def _write_images(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        Image.new("RGB", (4, 4)).save(folder / n)


def test_read_manifest_with_header_relative_paths_and_string_labels(tmp_path):
    _write_images(tmp_path / "imgs", ["x.png", "y.png", "z.png"])
    csv_path = tmp_path / "list.csv"
    csv_path.write_text("path,label\nimgs/x.png,dog\nimgs/y.png,cat\nimgs/z.png,dog\n")
    index = read_manifest(csv_path)
    assert index.classes == ["cat", "dog"]
    assert index.targets == [1, 0, 1]
    assert index.samples[0].path == str(tmp_path / "imgs" / "x.png")
    assert index.root == str(tmp_path)


def test_read_manifest_without_header_int_labels_and_column_order(tmp_path):
    _write_images(tmp_path, ["a.png", "b.png"])
    plain = tmp_path / "plain.csv"
    plain.write_text(f"a.png,2\n{tmp_path / 'b.png'},0\n")
    index = read_manifest(plain)
    assert index.classes == ["0", "1", "2"]
    assert index.targets == [2, 0]
    assert index.samples[1].path == str(tmp_path / "b.png")
    swapped = tmp_path / "swapped.csv"
    swapped.write_text("label,filename,extra\n1,a.png,foo\n0,b.png,bar\n")
    assert read_manifest(swapped).targets == [1, 0]


def test_read_manifest_errors(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("only_one_column\n")
    with pytest.raises(DataError, match="bad.csv"):
        read_manifest(bad)
    empty = tmp_path / "empty.csv"
    empty.write_text("path,label\n")
    with pytest.raises(DataError, match="no rows"):
        read_manifest(empty)


def test_load_index_dispatches_and_rejects_other_sources(flat_folder, tmp_path):
    assert load_index(flat_folder).classes == ["a", "b", "c"]
    csv_path = tmp_path / "l.csv"
    csv_path.write_text(f"{flat_folder / 'a' / '000.png'},a\n")
    assert len(load_index(csv_path)) == 1
    other = tmp_path / "data.txt"
    other.write_text("x")
    with pytest.raises(DataError, match="folder or a .csv"):
        load_index(other)
    with pytest.raises(DataError, match="not found"):
        load_index(tmp_path / "missing")
    with pytest.raises(DataError, match="not found"):
        load_index(tmp_path / "missing.csv")


def test_subset_and_targets(flat_folder):
    index = scan_folder(flat_folder)
    sub = index.subset([11, 0, 5])
    assert [s.path for s in sub.samples] == [index.samples[i].path for i in (11, 0, 5)]
    assert sub.targets == [2, 0, 1]
    assert sub.classes == index.classes and sub.root == index.root
    assert isinstance(sub.samples[0], Sample)


def test_split_index_is_stratified_deterministic_and_disjoint(tmp_path):
    root = write_flat_folder(tmp_path / "d", {"a": 20, "b": 10, "c": 2, "d": 1}, size=4)
    index = scan_folder(root)
    train, val = split_index(index, 0.2, seed=3)
    assert Counter(val.targets) == {0: 4, 1: 2, 2: 1}
    assert Counter(train.targets) == {0: 16, 1: 8, 2: 1, 3: 1}
    assert not set(train.paths) & set(val.paths)
    assert sorted(train.paths + val.paths) == sorted(index.paths)
    train2, val2 = split_index(index, 0.2, seed=3)
    assert val2.paths == val.paths and train2.paths == train.paths
    _, val3 = split_index(index, 0.2, seed=4)
    assert val3.paths != val.paths
    assert val.classes == index.classes
    _, none = split_index(index, 0.0, seed=0)
    assert len(none) == 0
    with pytest.raises(DataError):
        split_index(index, 1.0, seed=0)
