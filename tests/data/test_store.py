import json
import logging
import os
import pickle
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import deepimage.data.prepare as prepare_mod
from deepimage.data import (
    CorruptShardError,
    DataError,
    DecodeError,
    IncompleteStoreError,
    Store,
    decode_image,
    load_index,
    prepare_store,
    scan_folder,
    split_index,
    store_for,
)
from deepimage.data.decode import decode_jpeg, encode_jpeg
from tests.helpers import write_flat_folder

REPO = Path(__file__).resolve().parents[2]


def _rel(paths, root):
    return [Path(os.path.relpath(p, root)).as_posix() for p in paths]


@pytest.fixture
def count_decodes(monkeypatch):
    """Count in-process decodes done by the store (workers=0)."""
    calls = []
    original = prepare_mod.open_image

    def counting(*args, **kwargs):
        calls.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(prepare_mod, "open_image", counting)
    return calls


@pytest.mark.parametrize("encoding", ["raw", "jpeg"])
def test_messy_folder_store_skips_bad_files_and_keeps_rows_aligned(
    messy, tmp_path, caplog, encoding
):
    root = messy["root"]
    index = scan_folder(root)
    with caplog.at_level(logging.WARNING, logger="deepimage.data.prepare"):
        store = prepare_store(
            index, tmp_path / "store", [8, 16], workers=0, progress=False, encoding=encoding
        )
    assert store.encoding == encoding
    assert len(store) == len(messy["ok"])
    expected_rows = [p for p in index.paths if _rel([p], root)[0] in messy["ok"]]
    assert store.paths == expected_rows  # index order minus skipped
    assert sorted(_rel([s["path"] for s in store.skipped], root)) == sorted(messy["skipped"])
    assert all(s["reason"] for s in store.skipped)
    for s in store.skipped:
        assert any(r.getMessage() == f"skipped {s['path']}: {s['reason']}" for r in caplog.records)
    by_path = dict(zip(index.paths, index.targets))
    assert store.labels.dtype == np.int64
    assert store.labels.tolist() == [by_path[p] for p in store.paths]
    assert store.classes == messy["classes"] and store.class_names == messy["class_names"]
    for size in (8, 16):
        images = store.read(size, np.arange(len(store)))
        assert images.shape == (len(store), size, size, 3) and images.dtype == np.uint8
    big = store.read(16, np.arange(len(store))[::-1])[::-1]  # any row order
    for row, path in enumerate(store.paths):
        expected = decode_image(path, 16)
        if encoding == "jpeg":  # what the JPEG of the resized image decodes to
            expected = decode_jpeg(encode_jpeg(expected))
        assert np.array_equal(big[row], expected), path
    if encoding == "raw":  # one shard of raw rows: mapped from disk, read-only
        mapped = store.images(16)
        assert np.array_equal(mapped, big)
        with pytest.raises(ValueError):
            mapped[0, 0, 0, 0] = 1
    skipped_json = json.loads((tmp_path / "store" / "skipped.json").read_text())
    assert skipped_json == store.skipped


def test_layout_and_manifest(flat_folder, tmp_path):
    out = tmp_path / "s"
    store = prepare_store(scan_folder(flat_folder), out, [6, 4], mode="shorter", progress=False)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        ["manifest.json", "labels.npy", "paths.json", "skipped.json", "index_4.npy",
         "index_6.npy", "images_4-000000.tar", "images_6-000000.tar"]
    )  # fmt: skip
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sizes"] == [4, 6] and manifest["mode"] == "shorter" and manifest["n"] == 12
    assert manifest["classes"] == ["a", "b", "c"] and manifest["encoding"] == "raw"
    with tarfile.open(out / "images_6-000000.tar") as tar:  # a plain tar, one member per row
        members = tar.getmembers()
        assert [m.name for m in members] == [f"{r:09d}.u8" for r in range(12)]
        first = tar.extractfile(members[0]).read()
    assert np.array_equal(np.frombuffer(first, np.uint8).reshape(6, 6, 3), store.read(6, [0])[0])
    assert store.sizes == [4, 6] and store.mode == "shorter"
    assert np.load(out / "labels.npy").tolist() == store.labels.tolist()
    assert store.stats == manifest["stats"]
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    with pytest.raises(DataError, match="sizes"):
        store.images(5)


@pytest.mark.parametrize("encoding", ["raw", "jpeg"])
def test_pixel_stats_match_numpy(flat_folder, tmp_path, encoding):
    store = prepare_store(
        scan_folder(flat_folder), tmp_path / "s", [5, 9], workers=0, progress=False,
        encoding=encoding,
    )  # fmt: skip
    pixels = store.read(5, np.arange(len(store))).astype(np.float64).reshape(-1, 3) / 255.0
    stats = store.stats
    assert stats["size"] == 5 and stats["n_images"] == 12
    np.testing.assert_allclose(stats["rgb_mean"], pixels.mean(0), atol=1e-12)
    np.testing.assert_allclose(stats["rgb_std"], pixels.std(0), atol=1e-9)
    cov = np.cov(pixels, rowvar=False, bias=True)
    eigval, eigvec = np.array(stats["eigval"]), np.array(stats["eigvec"])
    assert eigval.shape == (3,) and eigvec.shape == (3, 3)
    assert np.all(np.diff(eigval) <= 0)
    np.testing.assert_allclose(eigvec.T @ eigvec, np.eye(3), atol=1e-9)
    np.testing.assert_allclose(cov @ eigvec, eigvec * eigval, atol=1e-9)  # columns
    assert all(isinstance(v, float) for v in stats["rgb_mean"] + stats["eigval"])


@pytest.mark.parametrize("encoding", ["raw", "jpeg"])
def test_rows_do_not_depend_on_worker_count(messy, tmp_path, encoding):
    index = scan_folder(messy["root"])
    kw = {"progress": False, "encoding": encoding, "shard_bytes": 3000}
    one = prepare_store(index, tmp_path / "w0", [8, 12], workers=0, **kw)
    two = prepare_store(index, tmp_path / "w2", [8, 12], workers=2, **kw)
    assert one.paths == two.paths and one.skipped == two.skipped
    assert np.array_equal(one.labels, two.labels)
    rows = np.arange(len(one))
    for size in (8, 12):
        assert np.array_equal(one.read(size, rows), two.read(size, rows))
    assert one.stats == two.stats
    assert len(one.shard_files()) > 2  # several shards, and byte for byte the same
    assert one.manifest["shards"] == two.manifest["shards"]


def test_second_prepare_does_no_decoding(flat_folder, tmp_path, count_decodes):
    index = scan_folder(flat_folder)
    out = tmp_path / "s"
    prepare_store(index, out, [8], workers=0, progress=False)
    assert len(count_decodes) == 12
    mtime = (out / "manifest.json").stat().st_mtime_ns
    again = prepare_store(scan_folder(flat_folder), out, [8], workers=0, progress=False)
    assert len(count_decodes) == 12
    assert (out / "manifest.json").stat().st_mtime_ns == mtime
    assert len(again) == 12


def test_changed_file_or_parameters_rebuild(flat_folder, tmp_path, count_decodes):
    out = tmp_path / "s"
    first = prepare_store(scan_folder(flat_folder), out, [8], workers=0, progress=False)
    target = flat_folder / "b" / "001.png"
    row = first.paths.index(str(target))
    Image.new("RGB", (30, 30), (1, 2, 3)).save(target)
    os.utime(target, ns=(time.time_ns(), time.time_ns() + 10**9))
    second = prepare_store(scan_folder(flat_folder), out, [8], workers=0, progress=False)
    assert len(count_decodes) == 24
    assert (second.images(8)[row] == [1, 2, 3]).all()
    third = prepare_store(scan_folder(flat_folder), out, [8, 10], workers=0, progress=False)
    assert third.sizes == [8, 10] and len(count_decodes) == 36


def test_store_without_manifest_is_refused_and_rebuilt(flat_folder, tmp_path, caplog):
    out = tmp_path / "s"
    prepare_store(scan_folder(flat_folder), out, [8], workers=0, progress=False)
    (out / "manifest.json").unlink()
    with pytest.raises(IncompleteStoreError, match="manifest") as e:
        Store.open(out)
    assert str(out) in str(e.value) and "\n" not in str(e.value)
    assert isinstance(e.value, DataError)
    with caplog.at_level(logging.WARNING, logger="deepimage.data.prepare"):
        store = prepare_store(scan_folder(flat_folder), out, [8], workers=0, progress=False)
    assert any("incomplete store" in r.getMessage() for r in caplog.records)
    assert len(store) == 12 and len(Store.open(out)) == 12


def test_manifest_that_does_not_match_the_files_is_refused(flat_folder, tmp_path):
    out = tmp_path / "s"
    prepare_store(scan_folder(flat_folder), out, [8], workers=0, progress=False)
    (out / "index_8.npy").unlink()
    with pytest.raises(IncompleteStoreError, match="index"):
        Store.open(out)
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(IncompleteStoreError, match="unreadable"):
        Store.open(out)
    with pytest.raises(DataError, match="no store"):
        Store.open(tmp_path / "nothing")


def _one_line(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text, text
    return text


@pytest.mark.parametrize("encoding", ["raw", "jpeg"])
def test_truncated_or_corrupted_shard_is_an_error_naming_it(flat_folder, tmp_path, encoding):
    out = tmp_path / "s"
    kw = {"workers": 0, "progress": False, "encoding": encoding, "shard_bytes": 1500}
    store = prepare_store(scan_folder(flat_folder), out, [8], **kw)
    shards = store.shard_files(8)
    assert len(shards) >= 3
    victim = out / shards[1]
    row = store.manifest["shards"]["8"][1]["rows"][0]
    offset, length, _ = np.load(out / "index_8.npy")[row]
    data = bytearray(victim.read_bytes())
    data[offset + length // 2] ^= 0x10  # one bit of one row's stored bytes
    victim.write_bytes(bytes(data))
    reopened = Store.open(out)  # same size: the cheap check passes
    others = [r for r in range(len(reopened)) if r != row]
    assert reopened.read(8, others).shape == (len(others), 8, 8, 3)
    with pytest.raises(CorruptShardError, match=shards[1]) as e:
        reopened.read(8, [row])
    assert str(victim) in _one_line(e.value) and "CRC" in str(e.value)
    with pytest.raises(CorruptShardError, match="SHA-256") as e:
        reopened.verify()
    assert str(victim) in _one_line(e.value)
    os.truncate(victim, len(data) - 700)
    with pytest.raises(CorruptShardError, match="truncated") as e:
        Store.open(out)
    assert str(victim) in _one_line(e.value)
    victim.unlink()
    with pytest.raises(CorruptShardError, match="missing"):
        Store.open(out)


def test_corrupt_shard_read_by_loader_workers_is_one_line(flat_folder, tmp_path):
    from deepimage.data.loader import iterate_batches

    out = tmp_path / "s"
    store = prepare_store(scan_folder(flat_folder), out, [8], workers=0, progress=False)
    victim = out / store.shard_files(8)[0]
    offset, length, _ = np.load(out / "index_8.npy")[3]
    data = bytearray(victim.read_bytes())
    data[offset] ^= 0xFF
    victim.write_bytes(bytes(data))
    batches = [np.arange(0, 3), np.arange(3, 6)]
    with pytest.raises(CorruptShardError) as e:
        list(iterate_batches(out, 8, batches, workers=2))
    assert _one_line(e.value).startswith(f"corrupt store shard {victim}: row 3 fails")


_KILLED_PREPARE = textwrap.dedent(
    """
    import sys, threading
    import deepimage.data.prepare as st
    from deepimage.data import load_index, prepare_store

    original = st.open_image
    calls = []

    def stalls_after_three(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # three images decoded: wait here until killed
            print("stalled", flush=True)
            threading.Event().wait()
        return original(*args, **kwargs)

    st.open_image = stalls_after_three
    prepare_store(load_index(sys.argv[1]), sys.argv[2], [8], workers=0, progress=False,
                  encoding=sys.argv[3], shard_bytes=1)
    print("finished")
    """
)


@pytest.mark.parametrize("encoding", ["raw", "jpeg"])
def test_prepare_killed_midway_resumes_where_it_stopped(
    flat_folder, tmp_path, caplog, count_decodes, encoding
):
    out = tmp_path / "stores" / "s"
    out.parent.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_PREPARE, str(flat_folder), str(out), encoding],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout.readline() == b"stalled\n", proc.communicate()
        assert any(".partial" in p.name for p in out.parent.iterdir())
    finally:
        proc.send_signal(signal.SIGKILL)
        stdout, _ = proc.communicate()
    assert proc.returncode == -signal.SIGKILL and b"finished" not in stdout
    assert not out.exists()
    with pytest.raises(IncompleteStoreError, match="interrupted"):
        Store.open(out)
    with pytest.raises(IncompleteStoreError):
        store_for(out, [8])  # leftovers are not mistaken for a store or image folder
    kw = {"workers": 0, "progress": False, "encoding": encoding, "shard_bytes": 1}
    with caplog.at_level(logging.INFO, logger="deepimage.data.prepare"):
        store = prepare_store(scan_folder(flat_folder), out, [8], **kw)
    assert any("resuming" in r.getMessage() and "at image 3 of 12" in r.getMessage()
               for r in caplog.records)  # fmt: skip
    assert len(count_decodes) == 12 - 3  # the three recorded images were not decoded again
    assert len(store) == 12
    assert [p.name for p in out.parent.iterdir() if not p.name.endswith(".lock")] == ["s"]
    whole = prepare_store(scan_folder(flat_folder), tmp_path / "whole", [8], **kw)
    assert store.manifest["shards"] == whole.manifest["shards"]  # byte for byte the same
    rows = np.arange(12)
    assert np.array_equal(store.read(8, rows), whole.read(8, rows)) and store.stats == whole.stats


def test_a_build_of_other_parameters_is_not_resumed(flat_folder, tmp_path, caplog, count_decodes):
    out = tmp_path / "s"
    index = scan_folder(flat_folder)
    prepare_store(index, out, [8], workers=0, progress=False)
    os.rename(out, out.with_name(".s.partial"))  # stands in for an interrupted build
    with caplog.at_level(logging.INFO, logger="deepimage.data.prepare"):
        store = prepare_store(index, out, [8, 9], workers=0, progress=False)
    assert any("leftover" in r.getMessage() for r in caplog.records)
    assert not any("resuming" in r.getMessage() for r in caplog.records)
    assert len(count_decodes) == 24 and store.sizes == [8, 9]


def test_refuses_to_replace_a_folder_that_is_not_a_store(flat_folder, tmp_path):
    with pytest.raises(DataError, match="not a store"):
        prepare_store(scan_folder(flat_folder), flat_folder, [8], workers=0, progress=False)
    assert (flat_folder / "a" / "000.png").is_file()


def test_nothing_decodable_is_an_error_and_leaves_nothing(tmp_path):
    (tmp_path / "d" / "x").mkdir(parents=True)
    (tmp_path / "d" / "x" / "bad.jpg").write_bytes(b"nope")
    with pytest.raises(DataError, match="could be decoded"):
        prepare_store(load_index(tmp_path / "d"), tmp_path / "s", [8], workers=0, progress=False)
    assert not (tmp_path / "s").exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_pickled_store_does_not_carry_pixels(flat_folder, tmp_path):
    store = prepare_store(scan_folder(flat_folder), tmp_path / "s", [64], workers=0, progress=False)
    store.images(64)
    data = pickle.dumps(store)
    assert len(data) < 12 * 64 * 64 * 3 // 4
    clone = pickle.loads(data)
    assert np.array_equal(clone.images(64), store.images(64))


def test_to_index_round_trip(flat_folder, tmp_path):
    index = scan_folder(flat_folder)
    store = prepare_store(index, tmp_path / "s", [8], workers=0, progress=False)
    back = store.to_index()
    assert back.paths == index.paths and back.targets == index.targets
    assert back.classes == index.classes and back.root == index.root


def test_store_for_caches_by_source_and_reprepares_changes(flat_folder, tmp_path, count_decodes):
    cache = tmp_path / "cache"
    store = store_for(flat_folder, [8], cache_dir=cache, workers=0, progress=False)
    assert store.path.parent == cache and len(count_decodes) == 12
    again = store_for(str(flat_folder), [8], cache_dir=cache, workers=0, progress=False)
    assert again.path == store.path and len(count_decodes) == 12
    other = store_for(flat_folder, [8], mode="shorter", cache_dir=cache, workers=0, progress=False)
    assert other.path != store.path
    write_flat_folder(flat_folder, {"d": 2})
    grown = store_for(flat_folder, [8], cache_dir=cache, workers=0, progress=False)
    assert grown.path == store.path and len(grown) == 14 and grown.classes[-1] == "d"


def test_store_for_uses_environment_cache_and_opens_stores(flat_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPIMAGE_CACHE", str(tmp_path / "env_cache"))
    store = store_for(flat_folder, [8, 12], workers=0, progress=False)
    assert store.path.parent == tmp_path / "env_cache"
    direct = store_for(store.path, [12])
    assert direct.path == store.path
    with pytest.raises(DataError, match="asked for sizes"):
        store_for(store.path, [16])


def test_store_for_index_subsets_get_their_own_stores(flat_folder, tmp_path):
    train, val = split_index(scan_folder(flat_folder), 0.25, seed=0)
    a = store_for(train, [8], cache_dir=tmp_path, workers=0, progress=False)
    b = store_for(val, [8], cache_dir=tmp_path, workers=0, progress=False)
    assert a.path != b.path
    assert len(a) + len(b) == 12 and not set(a.paths) & set(b.paths)


def test_decode_error_type_is_not_a_data_error():
    # DecodeError marks one bad file (skipped); DataError means the data set is unusable.
    assert not issubclass(DecodeError, DataError)


FIXTURES = Path(__file__).parent / "fixtures"


def test_a_version_1_store_still_opens_and_reads(tmp_path):
    """``fixtures/store_v1`` was written by the version 1 ``prepare_store`` (raw uint8 files):
    seven flat-colour images of ``write_flat_folder`` and one undecodable file."""
    from deepimage.data.loader import iterate_batches

    store = Store.open(FIXTURES / "store_v1")
    assert store.version == 1 and store.encoding == "raw" and len(store) == 7
    assert store.sizes == [4, 6] and len(store.skipped) == 1
    source = write_flat_folder(tmp_path / "flat", {"a": 3, "b": 2, "c": 2})
    expected = np.stack([decode_image(p, 6) for p in scan_folder(source).paths])
    rows = np.array([5, 0, 3])
    assert np.array_equal(store.read(6, rows), expected[rows])
    assert np.array_equal(store.images(6), expected)
    images, labels, got_rows = next(iterate_batches(store.path, 6, [rows]))
    assert np.array_equal(images.numpy(), expected[rows]) and got_rows.tolist() == [5, 0, 3]
    assert labels.tolist() == store.labels[rows].tolist()
    assert store_for(FIXTURES / "store_v1", [6]).path == store.path


def test_auto_encoding_is_raw_within_the_budget_and_jpeg_over_it(flat_folder, tmp_path, caplog):
    from deepimage.data.prepare import choose_encoding, memory_budget

    need = 12 * 3 * (8 * 8 + 16 * 16)
    assert choose_encoding("auto", 12, [8, 16], budget=need)[0] == "raw"
    chosen, why = choose_encoding("auto", 12, [8, 16], budget=need - 1)
    assert chosen == "jpeg" and "exceed the budget" in why
    assert choose_encoding("raw", 10**9, [512])[0] == "raw"
    assert 0 < memory_budget() < os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    with caplog.at_level(logging.INFO, logger="deepimage.data.prepare"):
        store = prepare_store(
            scan_folder(flat_folder), tmp_path / "s", [8, 16], workers=0, progress=False,
            budget=need - 1,
        )  # fmt: skip
    assert store.encoding == "jpeg" and store.manifest["encoding_reason"] == why
    assert any(r.getMessage() == f"encoding {why}" for r in caplog.records)
    with pytest.raises(DataError, match="encoding must be one of"):
        choose_encoding("png", 1, [8])


def test_preparation_streams_a_bounded_number_of_images(flat_folder):
    """Workers are fed a bounded number of images ahead of the writer, however many there
    are: the task list is consumed as results come back, never all at once."""
    from tqdm import tqdm

    from deepimage.data.prepare import _Encoding, _run_encoding

    path = scan_folder(flat_folder).paths[0]
    taken = []

    def tasks():
        for i in range(100_000):
            taken.append(i)
            yield i, path, -1, -1

    enc = _Encoding([8], "stretch", None, "raw", 90)
    results = _run_encoding(tasks(), enc, 2, tqdm(disable=True))
    for _ in range(40):
        next(results)
    assert 40 <= len(taken) <= 40 + 2 * 4 * 16 + 16  # workers x chunks in flight x chunk
    results.close()


def test_progress_bar_shows_images_per_second_and_time_left(flat_folder, tmp_path, capsys):
    prepare_store(scan_folder(flat_folder), tmp_path / "s", [8], workers=0, progress=True)
    err = capsys.readouterr().err
    assert "preparing store" in err and "img/s" in err and "<" in err  # elapsed<left


@pytest.mark.parametrize(
    ("name", "size"),
    [("000000007.jpg", 0), ("000000123.u8", 196_608), ("", 1), ("n" * 100, 8**11 - 1),
     ("long/" * 30 + "x.jpg", 5), ("é.jpg", 3)],
)  # fmt: skip
def test_tar_header_is_what_tarfile_writes(name, size):
    from deepimage.data.store import tar_header

    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    assert tar_header(name, size) == info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")


def test_preparation_memory_beyond_the_index_is_a_few_integers_per_image(tmp_path):
    """Preparing keeps, per image, only the store's own row index (a label and, per size,
    offset, length and CRC-32 as int64) beyond the source index: Python's peak memory during
    ``prepare_store`` grows by at most three copies of that per image, however many images."""
    import tracemalloc

    sizes = [4, 8]
    row_bytes = 8 * (1 + 3 * len(sizes))

    def folder(n):
        root = tmp_path / f"f{n}"
        for k in range(n):
            (root / f"c{k % 4}").mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (k % 256, k // 256, 7)).save(root / f"c{k % 4}/{k}.png")
        return scan_folder(root)

    def peak(index, out):
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            prepare_store(index, out, sizes, workers=0, progress=False, encoding="raw",
                          shard_bytes=200_000)  # fmt: skip
            return tracemalloc.get_traced_memory()[1] - before
        finally:
            tracemalloc.stop()

    small, large = folder(200), folder(1200)
    peak(small, tmp_path / "warm")  # first use imports modules
    growth = (peak(large, tmp_path / "large") - peak(small, tmp_path / "small")) / 1000
    assert growth < 3 * row_bytes, f"{growth:.0f} bytes per image"


def test_store_paths_are_read_on_first_use_and_checked(flat_folder, tmp_path):
    out = tmp_path / "s"
    prepare_store(scan_folder(flat_folder), out, [8], workers=0, progress=False)
    paths = json.loads((out / "paths.json").read_text())
    (out / "paths.json").write_text(json.dumps(paths[:-1]))
    store = Store.open(out)  # opening reads no paths
    with pytest.raises(IncompleteStoreError, match=r"paths\.json does not match n=12"):
        store.paths  # noqa: B018
    (out / "paths.json").unlink()
    with pytest.raises(IncompleteStoreError, match=r"no paths\.json"):
        Store.open(out)
