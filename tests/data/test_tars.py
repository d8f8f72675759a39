"""WebDataset tar shards as input: brace patterns, samples, bad samples skipped and reported."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest

from deepimage.cli import main
from deepimage.data import DataError, decode_image, load_index, prepare_store, store_for
from deepimage.data.index import expand_braces, read_sample
from tests.helpers import photo_class, photo_jpeg


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(root: Path, per_shard: int = 4, shards: int = 3) -> dict:
    """``shards`` tar files of ``per_shard`` photos (``<key>.jpg`` + ``<key>.cls``), then in
    the last shard the bad samples: an undecodable image, an image without a label and a
    label without an image. Returns the pattern and what each sample should become."""
    root.mkdir(parents=True, exist_ok=True)
    good: list[tuple[str, int, bytes]] = []
    seed = 0
    for k in range(shards):
        with tarfile.open(root / f"train-{k:03d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for _ in range(per_shard):
                key, data = f"s{seed:05d}", photo_jpeg(seed, (30 + seed, 24))
                _add(tar, f"{key}.jpg", data)
                _add(tar, f"{key}.cls", str(photo_class(seed)).encode())
                good.append((f"{root / f'train-{k:03d}.tar'}#{key}.jpg", photo_class(seed), data))
                seed += 1
            if k == shards - 1:
                _add(tar, "broken.jpg", b"\xff\xd8 not really a jpeg")
                _add(tar, "broken.cls", b"1")
                _add(tar, "nolabel.png", b"png?")
                _add(tar, "noimage.cls", b"2")
    last = root / f"train-{shards - 1:03d}.tar"
    return {
        "pattern": str(root / f"train-{{000..{shards - 1:03d}}}.tar"),
        "good": good,
        "skipped_at_index": {f"{last}#nolabel", f"{last}#noimage"},
        "undecodable": f"{last}#broken.jpg",
    }


def test_expand_braces_ranges_lists_and_products():
    assert expand_braces("a-{000..002}.tar") == ["a-000.tar", "a-001.tar", "a-002.tar"]
    assert expand_braces("{8..10}") == ["8", "9", "10"]
    assert expand_braces("{train,val}-{0..1}.tar") == [
        "train-0.tar", "train-1.tar", "val-0.tar", "val-1.tar"
    ]  # fmt: skip
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(DataError, match="cannot expand"):
        expand_braces("a-{x}.tar")


def test_scan_tars_indexes_samples_and_lists_the_bad_ones(tmp_path):
    shards = write_shards(tmp_path / "shards")
    index = load_index(shards["pattern"])
    assert index.paths == [p for p, _, _ in shards["good"]] + [shards["undecodable"]]
    assert index.targets == [c for _, c, _ in shards["good"]] + [1]
    assert index.classes == ["0", "1", "2"]
    assert {s["path"] for s in index.skipped} == shards["skipped_at_index"]
    reasons = {s["path"]: s["reason"] for s in index.skipped}
    assert all("no label" in r or "no image" in r for r in reasons.values())
    for sample, (_, _, data) in zip(index.samples, shards["good"]):
        assert read_sample(sample) == data  # offset and size point at the member's bytes


def test_text_labels_become_sorted_classes(tmp_path):
    with tarfile.open(tmp_path / "a.tar", "w") as tar:
        for i, label in enumerate(["zebra", "ant", "zebra"]):
            _add(tar, f"k{i}.jpg", photo_jpeg(i))
            _add(tar, f"k{i}.cls", label.encode())
    index = load_index(tmp_path / "a.tar")
    assert index.classes == ["ant", "zebra"] and index.targets == [1, 0, 1]


def test_truncated_archive_keeps_the_samples_before_the_cut(tmp_path, caplog):
    tar = tmp_path / "cut.tar"
    with tarfile.open(tar, "w") as tf:  # label first: the image is the sample's last member
        for i in range(5):
            _add(tf, f"s{i}.cls", b"0")
            _add(tf, f"s{i}.jpg", photo_jpeg(i))
    data = tar.read_bytes()
    cut = data.index(b"s3.jpg")  # the header of the fourth image
    tar.write_bytes(data[: cut + 700])  # its header and part of its data
    with caplog.at_level(logging.WARNING):
        index = load_index(tar)
    assert [Path(p).name for p in index.paths] == [f"cut.tar#s{i}.jpg" for i in range(3)]
    bad = {s["path"]: s["reason"] for s in index.skipped}
    assert "truncated" in bad[str(tar)] and f"{tar}#s3" in bad  # the cut sample is reported
    assert any(str(tar) in r.getMessage() for r in caplog.records)


def test_missing_shard_is_an_error_naming_it(tmp_path):
    write_shards(tmp_path / "shards", shards=2)
    with pytest.raises(DataError, match="train-002.tar"):
        load_index(str(tmp_path / "shards" / "train-{000..002}.tar"))


@pytest.mark.parametrize("encoding", ["raw", "jpeg"])
def test_prepare_from_tar_shards_skips_and_reports_bad_samples(tmp_path, caplog, encoding):
    shards = write_shards(tmp_path / "shards")
    with caplog.at_level(logging.WARNING):
        store = prepare_store(
            load_index(shards["pattern"]), tmp_path / "s", [16], workers=2, progress=False,
            encoding=encoding,
        )  # fmt: skip
    assert store.paths == [p for p, _, _ in shards["good"]]
    assert store.labels.tolist() == [c for _, c, _ in shards["good"]]
    skipped = {s["path"]: s["reason"] for s in store.skipped}
    assert set(skipped) == shards["skipped_at_index"] | {shards["undecodable"]}
    assert "not an image" in skipped[shards["undecodable"]]
    assert any(shards["undecodable"] in r.getMessage() for r in caplog.records)
    if encoding == "raw":
        expected = np.stack([decode_image(data, 16) for _, _, data in shards["good"]])
        assert np.array_equal(store.read(16, np.arange(len(store))), expected)


def test_store_for_a_pattern_is_cached_and_reused(tmp_path):
    shards = write_shards(tmp_path / "shards")
    a = store_for(shards["pattern"], [8], cache_dir=tmp_path / "c", workers=0, progress=False)
    b = store_for(shards["pattern"], [8], cache_dir=tmp_path / "c", workers=0, progress=False)
    assert a.path == b.path and a.path.parent == tmp_path / "c"
    assert "{" not in a.path.name and len(a) == 12


def test_cli_prepare_takes_data_and_says_which_encoding(tmp_path, capsys):
    shards = write_shards(tmp_path / "shards")
    out = tmp_path / "s"
    code = main(["-q", "prepare", "--data", shards["pattern"], "--sizes", "8", "16", "--out",
                 str(out), "--workers", "0", "--no-progress"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "encoding raw:" in printed and "fit the budget" in printed
    assert "12 images" in printed and "3 skipped" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["encoding"] == "raw" and manifest["sizes"] == [8, 16]
    assert main(["-q", "verify", str(out)]) == 0
    assert "match their SHA-256" in capsys.readouterr().out
    shard = out / manifest["shards"]["16"][0]["file"]
    data = bytearray(shard.read_bytes())
    data[600] ^= 1
    shard.write_bytes(bytes(data))
    assert main(["-q", "verify", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and str(shard) in err


@pytest.mark.slow
def test_train_and_evaluate_on_tar_shards_equal_the_same_images_in_a_folder(tmp_path, capsys):
    """The same photos as tar shards and as an image folder (same order): the same weights
    and the same evaluation."""
    from safetensors.torch import load_file

    shards = write_shards(tmp_path / "shards", per_shard=6, shards=2)
    folder = tmp_path / "folder"
    for _, label, _ in shards["good"]:
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
    # ImageFolder order is by class, then name: write the tar samples in that order too.
    order = sorted(range(len(shards["good"])), key=lambda i: (shards["good"][i][1], i))
    with tarfile.open(tmp_path / "sorted.tar", "w") as tar:
        for rank, i in enumerate(order):
            _, label, data = shards["good"][i]
            (folder / str(label) / f"{rank:03d}.jpg").write_bytes(data)
            _add(tar, f"{rank:03d}.jpg", data)
            _add(tar, f"{rank:03d}.cls", str(label).encode())
    runs = {}
    for name, data in (("tar", str(tmp_path / "sorted.tar")), ("folder", str(folder))):
        runs[name] = tmp_path / f"run-{name}"
        args = ["-q", "train", "--data", data, "--out", str(runs[name]), "--model",
                "vgg16_deepimage", "--width", "0.0625", "--size", "36", "--crop", "32",
                "--epochs", "1", "--batch-size", "4", "--workers", "0", "--no-progress",
                "--precision", "fp32", "--no-tensorboard",
                "--cache-dir", str(tmp_path / "c")]  # fmt: skip
        assert main(args) == 0
    a, b = (load_file(runs[k] / "model.safetensors") for k in ("tar", "folder"))
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
    capsys.readouterr()
    printed = []
    for data in (shards["pattern"], str(folder)):
        assert main(["-q", "evaluate", str(runs["tar"]), "--data", data, "--workers", "0",
                     "--cache-dir", str(tmp_path / "c"), "--no-progress"]) == 0  # fmt: skip
        printed.append(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed[0] == printed[1] and "(12 images)" in printed[0]
