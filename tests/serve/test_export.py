"""Export to ONNX and TorchScript: dynamic batch, metadata, parity, and the ONNX backend."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from deepimage.cli import main
from deepimage.inference import model_input
from deepimage.runmeta import RunMeta
from deepimage.runs import load_model
from deepimage.serve import export as export_mod
from deepimage.serve.app import create_app
from deepimage.serve.export import ParityError, export, read_torchscript_meta
from deepimage.serve.predict import Predictor
from tests.helpers import photo_jpeg

from .conftest import IMAGENET_SAMPLE, label

pytestmark = pytest.mark.slow  # exports and runs onnxruntime


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    """Real photos when the shared sample is present, else generated ones."""
    if IMAGENET_SAMPLE.is_dir():
        return [str(IMAGENET_SAMPLE)]
    folder = tmp_path_factory.mktemp("samples")
    for i in range(6):
        (folder / f"{i}.jpg").write_bytes(photo_jpeg(i))
    return [str(folder)]


@pytest.fixture(scope="module")
def onnx_file(run_dir, samples, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "model.onnx"
    report = export(run_dir, "onnx", out, samples=samples)
    assert report["max_abs_diff"] < 1e-4
    return out


def test_onnx_has_dynamic_batch_and_preprocessing_metadata(onnx_file, run_dir):
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    meta = json.loads(session.get_modelmeta().custom_metadata_map["deepimage"])
    model, run_meta = load_model(run_dir)
    read_back = RunMeta.from_dict(meta, onnx_file)
    assert read_back.classes == run_meta.classes
    assert read_back.class_names == run_meta.class_names
    assert read_back.preprocess == run_meta.preprocess.running("fp32", channels_last=False)
    assert "centre crop" in meta["preprocessing"]
    for batch in (1, 5):
        images = np.random.default_rng(batch).integers(0, 256, (batch, 40, 40, 3), np.uint8)
        x = model_input(torch.from_numpy(images), read_back.preprocess)
        got = session.run(None, {"input": x.numpy()})[0]
        with torch.inference_mode():
            assert np.abs(got - model(x).numpy()).max() < 1e-4


def test_cli_export_prints_parity(run_dir, samples, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert main(["export", str(run_dir), "--format", "onnx", "--out", str(out),
                 "--samples", *samples]) == 0  # fmt: skip
    line = capsys.readouterr().out.strip()
    print(line)
    assert "parity max |logit diff|" in line and out.is_file()
    diff = float(line.split("parity max |logit diff| ")[1].split()[0])
    assert diff < 1e-4


def test_torchscript_export(run_dir, samples, tmp_path):
    out = tmp_path / "m.pt"
    report = export(run_dir, "torchscript", out, samples=samples)
    assert report["max_abs_diff"] < 1e-4
    assert read_torchscript_meta(out).preprocess.crop == 32


def test_parity_failure_is_an_error_and_leaves_no_file(run_dir, tmp_path, monkeypatch, capsys):
    real = export_mod._run_onnx
    monkeypatch.setattr(export_mod, "_run_onnx", lambda path, x: real(path, x) + 1e-3)
    out = tmp_path / "bad.onnx"
    with pytest.raises(ParityError, match="parity"):
        export(run_dir, "onnx", out)
    assert not out.exists() and not list(tmp_path.glob(".bad.onnx*"))
    assert main(["export", str(run_dir), "--out", str(out)]) == 2
    assert "parity check failed" in capsys.readouterr().err


def test_onnx_backend_serves_the_same_answers(onnx_file, run_dir):
    torch_predictor = Predictor.load(run_dir, device="cpu", precision="fp32")
    onnx_predictor = Predictor.load(onnx_file)
    assert onnx_predictor.backend == "onnx"
    data = photo_jpeg(9)
    with TestClient(create_app(onnx_predictor)) as client:
        answer = client.post("/predict", content=data).json()
        assert client.get("/health").json()["backend"] == "onnx"
    expected = torch_predictor.top(
        torch_predictor.probabilities(torch_predictor.stack([torch_predictor.load_image(data)]))[0],
        5,
    )
    assert [p["class_id"] for p in answer["top"]] == [p["class_id"] for p in expected]
    assert answer["top"][0]["class_id"] == label(9)
    for got, exp in zip(answer["top"], expected):
        assert got["probability"] == pytest.approx(exp["probability"], abs=1e-4)


def test_an_ensemble_is_refused_with_a_clear_error(ensemble_dir, tmp_path):
    with pytest.raises(ValueError, match="ensemble"):
        export(ensemble_dir, "onnx", tmp_path / "e.onnx")


def test_parity_defaults_to_photos_of_the_runs_own_data(tmp_path):
    """Without --samples, the check runs on photos spread over the run's data (here a CSV)."""
    from deepimage.serve.cli import _default_samples

    from .conftest import make_run

    photos = tmp_path / "photos"
    photos.mkdir()
    rows = ["path,label"]
    for i in range(12):
        (photos / f"{i}.jpg").write_bytes(photo_jpeg(i))
        rows.append(f"{photos / f'{i}.jpg'},{'ab'[i % 2]}")
    manifest = tmp_path / "train.csv"
    manifest.write_text("\n".join(rows) + "\n")
    run = make_run(tmp_path / "run")
    assert _default_samples(str(run)) is None  # no config.yaml: random images stand in
    (run / "config.yaml").write_text(f"data: {manifest}\nval: null\n")
    chosen = _default_samples(str(run), count=4)
    assert len(chosen) == 4 and len(set(chosen)) == 4
    assert all(p.startswith(str(photos)) for p in chosen)
    report = export(run, "onnx", tmp_path / "m.onnx", samples=chosen)
    assert report["samples"].startswith("4 sample images") and report["max_abs_diff"] < 1e-4
