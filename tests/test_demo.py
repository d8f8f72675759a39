"""``deepimage demo`` runs the whole job: data, training, report, plots, predictions."""

from __future__ import annotations

import json

import pytest

from deepimage.cli import main

pytestmark = pytest.mark.slow


def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["-q", "demo", "--out", str(out), "--epochs", "1", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    run = out / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == 1 and len(summary["classes"]) >= 6 and summary["skipped"] == []
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    assert metrics["n_images"] == summary["n_val_images"]
    for path in (run / "curves.png", out / "report" / "confusion.png", run / "model.safetensors"):
        assert path.stat().st_size > 0
    # the top-5 block: a file name, then five "<id> <name>  <probability>" lines
    lines = printed.splitlines()
    start = next(i for i, line in enumerate(lines) if line.endswith(".png"))
    probs = [float(line.rsplit(maxsplit=1)[1]) for line in lines[start + 1 : start + 6]]
    assert len(probs) == 5 and probs == sorted(probs, reverse=True)
