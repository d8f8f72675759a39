"""`deepimage bench loader` runs its three paths on a tiny store and ends with its JSON."""

from __future__ import annotations

import json

import pytest

from deepimage.cli import main
from deepimage.data.index import scan_folder
from deepimage.data.prepare import prepare_store
from tests.helpers import write_photo_folder


def test_bench_loader_prints_the_table_and_ends_with_json(tmp_path, capsys):
    pytest.importorskip("albumentations")
    data = write_photo_folder(tmp_path / "photos", {"a": 5, "b": 5})
    store = prepare_store(scan_folder(data), tmp_path / "store", [40], workers=0,
                          progress=False, encoding="jpeg")  # fmt: skip
    code = main(["bench", "loader", "--data", str(store.path), "--size", "40", "--crop", "32",
                 "--workers", "0", "--batch-size", "4", "--repeats", "2",
                 "--images", "16"])  # fmt: skip
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert any(line.startswith("cpu     : ") for line in lines)
    result = json.loads(lines[-1])
    assert result["images_per_repeat"] == 16  # 2 epochs of 2 full batches of 4
    for key in ("images_per_s", "decode_limit_images_per_s", "albumentations_images_per_s"):
        assert result[key] > 0
    assert result["vs_decode_limit"] == pytest.approx(
        result["images_per_s"] / result["decode_limit_images_per_s"], rel=0.02
    )


def test_bench_loader_names_a_size_the_store_lacks(tmp_path):
    data = write_photo_folder(tmp_path / "photos", {"a": 2, "b": 2})
    store = prepare_store(scan_folder(data), tmp_path / "store", [40], workers=0,
                          progress=False, encoding="jpeg")  # fmt: skip
    with pytest.raises(SystemExit, match="has sizes \\[40\\], not 48"):
        main(["bench", "loader", "--data", str(store.path), "--size", "48", "--crop", "32"])
