"""Batch scoring of a folder: rows for every file, error rows, CSV and JSONL, resume."""

from __future__ import annotations

import csv
import json

import pytest

from deepimage.cli import main
from deepimage.serve import batch
from deepimage.serve.batch import csv_header, score_folder
from deepimage.serve.predict import Predictor

from .conftest import label

GOOD = ["img0.jpg", "img1.jpg", "img2.jpg", "img3.jpg", "sub/img4.jpg"]  # photo_jpeg(0..4)
BAD = ["empty.png", "notes.txt", "truncated.jpg"]


@pytest.fixture(scope="module")
def predictor(run_dir):
    return Predictor.load(run_dir, device="cpu")


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_has_one_row_per_file_matching_predict(predictor, image_folder, tmp_path):
    out = tmp_path / "preds.jsonl"
    counts = score_folder(predictor, image_folder, out, batch_size=2, workers=2, progress=False)
    assert counts == {"scored": 5, "errors": 3, "skipped": 0}
    rows = {r["path"]: r for r in _jsonl(out)}
    assert sorted(rows) == sorted(GOOD + BAD)
    for name in BAD:
        assert rows[name]["error"] and "top" not in rows[name]
    assert "not an image" in rows["notes.txt"]["error"]
    assert "empty" in rows["empty.png"]["error"]
    expected = predictor.predict_files([image_folder / n for n in GOOD], topk=5)
    for seed, (name, exp) in enumerate(zip(GOOD, expected)):
        got = rows[name]["top"]
        assert got[0]["class_id"] == label(seed)  # each file its own answer
        assert [p["class_id"] for p in got] == [p["class_id"] for p in exp["top"]]
        for g, e in zip(got, exp["top"]):
            assert g["probability"] == pytest.approx(e["probability"], abs=1e-5)


def test_csv_columns_and_error_rows(predictor, image_folder, tmp_path):
    out = tmp_path / "preds.csv"
    score_folder(predictor, image_folder, out, topk=2, batch_size=3, progress=False)
    with open(out, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == csv_header(2)
    body = {r[0]: r for r in rows[1:]}
    assert len(body) == 8
    assert body["truncated.jpg"][1] and body["truncated.jpg"][2] == ""
    good = body["img0.jpg"]
    assert good[1] == "" and good[2] == label(0)
    assert [body[name][2] for name in GOOD] == [label(seed) for seed in range(5)]
    assert float(good[4]) >= float(good[7])


def test_resume_drops_a_partial_line_and_skips_scored_files(predictor, image_folder, tmp_path):
    out = tmp_path / "preds.jsonl"
    score_folder(predictor, image_folder, out, batch_size=2, progress=False)
    full = _jsonl(out)
    lines = out.read_text().splitlines(keepends=True)
    # as if killed mid-write: three complete rows and half of the fourth
    out.write_text("".join(lines[:3]) + lines[3][: len(lines[3]) // 2])
    with pytest.raises(ValueError, match="--resume"):
        score_folder(predictor, image_folder, out, progress=False)
    counts = score_folder(predictor, image_folder, out, batch_size=2, resume=True, progress=False)
    assert counts["skipped"] == 3 and counts["scored"] + counts["errors"] == 5
    resumed = _jsonl(out)
    assert sorted(r["path"] for r in resumed) == sorted(r["path"] for r in full)
    before = {r["path"]: r for r in full}
    for row in resumed:
        ref = before[row["path"]]
        assert row.get("error") == ref.get("error")
        got, exp = row.get("top", []), ref.get("top", [])
        assert [p["class_id"] for p in got] == [p["class_id"] for p in exp]
        assert [p["probability"] for p in got] == pytest.approx(
            [p["probability"] for p in exp], abs=1e-5
        )
    again = score_folder(predictor, image_folder, out, resume=True, progress=False)
    assert again == {"scored": 0, "errors": 0, "skipped": 8}


def test_decoding_in_flight_is_bounded(predictor, image_folder, tmp_path, monkeypatch):
    """Memory stays flat: never more than 2 * batch + workers images decoded and unscored."""
    for i in range(40):
        (image_folder / f"more{i:02d}.jpg").write_bytes((image_folder / "img0.jpg").read_bytes())
    state = {"decoded": 0, "scored": 0, "peak": 0}
    decode, probabilities = batch._decode, predictor.probabilities

    def counting_decode(p, path):
        result = decode(p, path)
        state["decoded"] += 1
        state["peak"] = max(state["peak"], state["decoded"] - state["scored"])
        return result

    def counting_probabilities(views):
        state["scored"] += len(views[0])
        return probabilities(views)

    monkeypatch.setattr(batch, "_decode", counting_decode)
    monkeypatch.setattr(predictor, "probabilities", counting_probabilities)
    counts = score_folder(predictor, image_folder, tmp_path / "p.jsonl", batch_size=4, workers=2,
                          progress=False)  # fmt: skip
    assert counts["scored"] == 45
    assert state["peak"] <= 2 * 4 + 2 + 4


def test_cli_folder_scoring_and_resume(run_dir, image_folder, tmp_path, capsys):
    out = tmp_path / "preds.csv"
    argv = ["predict", str(run_dir), "--folder", str(image_folder), "--out", str(out),
            "--no-progress", "--batch-size", "4"]  # fmt: skip
    assert main(argv) == 0
    assert "5 scored, 3 unreadable, 0 already scored" in capsys.readouterr().out
    assert main([*argv, "--resume"]) == 0
    assert "0 scored, 0 unreadable, 8 already scored" in capsys.readouterr().out
    assert main([*argv, "--topk", "3", "--resume"]) == 2
    assert "--topk" in capsys.readouterr().err
    assert main(["predict", str(run_dir), "--folder", str(image_folder)]) == 2


def test_a_symlink_cycle_is_walked_once(image_folder):
    (image_folder / "sub" / "loop").symlink_to(image_folder, target_is_directory=True)
    files = [p.relative_to(image_folder).as_posix() for p in batch.walk_files(image_folder)]
    assert sorted(files) == sorted(GOOD + BAD)
