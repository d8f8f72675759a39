"""Predictor: evaluate's preprocessing, ensembles of members at different sizes, the CLI."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from deepimage.cli import main
from deepimage.data.decode import decode_image
from deepimage.inference import posteriors_for
from deepimage.runs import CheckpointError, load_model
from deepimage.serve.predict import Predictor
from tests.helpers import photo_jpeg

from .conftest import label, make_run


def _reference(run, data: bytes) -> np.ndarray:
    """Posteriors the way evaluate computes them: decode at size, posteriors_for centre."""
    model, meta = load_model(run)
    pre = meta.preprocess
    image = decode_image(data, pre.size, mode=pre.resize_mode)
    probs = posteriors_for(model, torch.from_numpy(image[None]), pre, torch.device("cpu"))
    return probs[0].numpy()


def test_one_member_uses_evaluates_preprocessing(run_dir):
    predictor = Predictor.load(run_dir, device="cpu", precision="fp32")
    data = photo_jpeg(7)
    probs = predictor.probabilities(predictor.stack([predictor.load_image(data)]))[0]
    np.testing.assert_allclose(probs, _reference(run_dir, data), atol=1e-6)
    top = predictor.top(probs, 2)
    assert top[0]["class_id"] == label(7)
    assert [p["probability"] for p in top] == sorted(probs, reverse=True)[:2]
    assert top[0]["name"] == predictor.meta.class_names[top[0]["class_id"]]


def test_ensemble_averages_members_each_at_its_own_size(ensemble_dir):
    predictor = Predictor.load(ensemble_dir, device="cpu", precision="fp32")
    assert len(predictor.members) == 2 and predictor.views == [(40, "stretch"), (48, "stretch")]
    data = photo_jpeg(3)
    views = predictor.load_image(data)
    assert [v.shape for v in views] == [(40, 40, 3), (48, 48, 3)]
    got = predictor.probabilities(predictor.stack([views, views]))
    expected = (_reference(ensemble_dir / "s40", data) + _reference(ensemble_dir / "s48", data)) / 2
    np.testing.assert_allclose(got[0], expected, atol=1e-6)
    np.testing.assert_allclose(got[1], expected, atol=1e-6)
    assert predictor.meta.classes[int(np.argmax(got[0]))] == label(3)
    assert predictor.name == "vgg16_deepimage + vgg16_deepimage"


def test_ensemble_with_different_classes_is_refused(tmp_path):
    from deepimage.ensemble import write_manifest

    a = make_run(tmp_path / "a")
    b = make_run(tmp_path / "b")
    from deepimage.runs import WEIGHTS, save_weights

    model, meta = load_model(b)
    save_weights(b / WEIGHTS, model, dataclasses.replace(meta, classes=("x", "y", "z")))
    write_manifest(tmp_path / "ens", [a, b])
    with pytest.raises(CheckpointError, match="classes differ"):
        Predictor.load(tmp_path / "ens", device="cpu")


def test_cli_predict_accepts_an_ensemble_manifest(ensemble_dir, tmp_path, capsys):
    image = tmp_path / "a.jpg"
    image.write_bytes(photo_jpeg(1))
    assert main(["predict", str(ensemble_dir / "ensemble.json"), str(image), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    expected = Predictor.load(ensemble_dir, device="cpu").predict_files([image], topk=5)[0]
    assert result == json.loads(json.dumps(expected))
    assert result["top"][0]["class_id"] == label(1)


def test_cli_predict_needs_images_or_a_folder(run_dir, capsys):
    assert main(["predict", str(run_dir)]) == 2
    assert "--folder" in capsys.readouterr().err
