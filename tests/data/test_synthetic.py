import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from deepimage.data.synthetic import CLASSES, MARKER, make_synthetic_dataset


def _tree_hash(root) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


SMALL = {"n_train_per_class": 3, "n_val_per_class": 2, "image_size": 40}


def test_deterministic_layout_and_class_names(tmp_path):
    a = make_synthetic_dataset(tmp_path / "a", **SMALL)
    b = make_synthetic_dataset(tmp_path / "b", **SMALL)
    assert a == tmp_path / "a"
    assert _tree_hash(a) == _tree_hash(b)
    other = make_synthetic_dataset(tmp_path / "c", **SMALL, seed=1)
    assert _tree_hash(other) != _tree_hash(a)

    class_ids = sorted(p.name for p in (a / "train").iterdir())
    assert len(class_ids) >= 6
    assert class_ids == sorted(p.name for p in (a / "val").iterdir())
    lines = (a / "class_names.txt").read_text().splitlines()
    names = dict(line.split(" ", 1) for line in lines)
    assert sorted(names) == class_ids and all(names.values())

    for split, n in (("train", 3), ("val", 2)):
        for class_id in class_ids:
            files = sorted((a / split / class_id).iterdir())
            assert len(files) == n
            for f in files:
                with Image.open(f) as img:
                    assert img.format == "PNG" and img.mode == "RGB" and img.size == (40, 40)
                    pixels = np.asarray(img)
                assert pixels.std() > 5  # not blank
    # no temporary folders left beside the set
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]


def test_idempotent_and_regenerates_on_new_args(tmp_path):
    root = make_synthetic_dataset(tmp_path / "s", **SMALL)
    marker = root / MARKER
    stamp = marker.stat().st_mtime_ns
    first = root / "train" / CLASSES[0][0] / "00000.png"
    first_stamp = first.stat().st_mtime_ns
    assert make_synthetic_dataset(tmp_path / "s", **SMALL) == root
    assert marker.stat().st_mtime_ns == stamp and first.stat().st_mtime_ns == first_stamp

    # a file lost after completion: detected and rebuilt
    first.unlink()
    make_synthetic_dataset(tmp_path / "s", **SMALL)
    assert first.is_file()

    bigger = {**SMALL, "n_val_per_class": 4}
    make_synthetic_dataset(tmp_path / "s", **bigger)
    assert len(list((root / "val" / CLASSES[0][0]).iterdir())) == 4
    assert json.loads(marker.read_text())["params"]["n_val_per_class"] == 4


def test_refuses_to_replace_foreign_folder(tmp_path):
    root = tmp_path / "mine"
    root.mkdir()
    (root / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        make_synthetic_dataset(root, **SMALL)
    assert (root / "notes.txt").read_text() == "keep me"
    # an empty folder is fine
    (tmp_path / "empty").mkdir()
    make_synthetic_dataset(tmp_path / "empty", **SMALL)
    assert (tmp_path / "empty" / MARKER).is_file()


def _load_split(root, split, class_ids):
    xs, ys = [], []
    for label, class_id in enumerate(class_ids):
        for f in sorted((root / split / class_id).iterdir()):
            with Image.open(f) as img:
                xs.append(np.asarray(img, dtype=np.float32))
            ys.append(label)
    return np.stack(xs), np.array(ys)


def test_mean_colour_does_not_give_away_the_class(tmp_path):
    root = make_synthetic_dataset(
        tmp_path / "s", n_train_per_class=40, n_val_per_class=25, image_size=48
    )
    class_ids = sorted(p.name for p in (root / "train").iterdir())
    x_train, y_train = _load_split(root, "train", class_ids)
    x_val, y_val = _load_split(root, "val", class_ids)

    def nearest_mean_accuracy(f_train, f_val):
        means = np.stack([f_train[y_train == c].mean(axis=0) for c in range(len(class_ids))])
        dist = ((f_val[:, None, :] - means[None]) ** 2).sum(axis=-1)
        return float((dist.argmin(axis=1) == y_val).mean())

    # mean colour per image: near chance (1 / number of classes)
    colour_acc = nearest_mean_accuracy(x_train.mean(axis=(1, 2)), x_val.mean(axis=(1, 2)))
    assert colour_acc < 0.35

    # the images differ per class in structure: objects are placed, scaled and rotated
    # differently every time, so even a raw-pixel template matcher is weak ...
    flat = nearest_mean_accuracy(x_train.reshape(len(x_train), -1), x_val.reshape(len(x_val), -1))
    assert flat < 0.35
    # ... and every image is different (no duplicates within the set)
    digests = {hashlib.sha256(x.tobytes()).hexdigest() for x in np.concatenate([x_train, x_val])}
    assert len(digests) == len(x_train) + len(x_val)


def test_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        make_synthetic_dataset(tmp_path / "x", n_train_per_class=0)
    with pytest.raises(ValueError):
        make_synthetic_dataset(tmp_path / "x", image_size=8)
