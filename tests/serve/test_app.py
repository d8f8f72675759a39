"""The HTTP service in process: endpoints, bad input as client errors, micro-batching."""

from __future__ import annotations

import asyncio
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from fastapi.testclient import TestClient

from deepimage.serve.app import create_app
from deepimage.serve.batcher import MicroBatcher
from deepimage.serve.predict import Predictor
from tests.helpers import photo, photo_jpeg, png_bomb

from .conftest import label


@pytest.fixture(scope="module")
def predictor(run_dir):
    return Predictor.load(run_dir, device="cpu", max_pixels=40_000_000)


@pytest.fixture()
def client(predictor):
    app = create_app(predictor, max_batch=8, max_wait_ms=2, max_body=200_000)
    with TestClient(app) as c:
        yield c


def _expected(predictor, data, k=5):
    probs = predictor.probabilities(predictor.stack([predictor.load_image(data)]))[0]
    return predictor.top(probs, k)


def _same(got, expected):
    assert [p["class_id"] for p in got] == [p["class_id"] for p in expected]
    for g, e in zip(got, expected):
        assert g["probability"] == pytest.approx(e["probability"], abs=1e-5)


def test_health_classes_docs_and_page(client):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["model"] == "vgg16_deepimage"
    assert health["backend"] == "torch" and health["num_classes"] == 3
    classes = client.get("/classes").json()["classes"]
    assert classes[1] == {"index": 1, "class_id": "n02", "name": "goldfish"}
    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in body and "application/octet-stream" in body
    assert client.get("/docs").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and 'id="file"' in page.text and "predict" in page.text


def test_multipart_and_raw_bytes_give_predicts_answer(client, predictor):
    data = photo_jpeg(11)
    raw = client.post("/predict?topk=3", content=data,
                      headers={"content-type": "image/jpeg"})  # fmt: skip
    form = client.post("/predict?topk=3", files={"file": ("x.jpg", data, "image/jpeg")})
    assert raw.status_code == form.status_code == 200
    _same(raw.json()["top"], _expected(predictor, data, 3))
    _same(form.json()["top"], _expected(predictor, data, 3))
    assert raw.json()["top"][0]["class_id"] == label(11)
    assert len(client.post("/predict", content=data).json()["top"]) == 3  # only 3 classes
    assert client.post("/predict?topk=0", content=data).status_code == 422


def _truncated() -> bytes:
    buf = io.BytesIO()
    photo(1, (120, 90)).save(buf, "PNG")
    return buf.getvalue()[:-200]


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        (b"", 400, "empty"),
        (b"hello, this is plain text and not a picture", 415, "not an image"),
        (_truncated(), 400, "truncated"),
        (png_bomb(), 400, "too many pixels"),
        (b"\xff" * 300_000, 413, "limit"),
    ],
    ids=["empty", "non-image", "truncated", "bomb", "oversized"],
)
def test_bad_input_is_a_one_line_client_error(client, body, status, needle):
    for response in (
        client.post("/predict", content=body),
        client.post("/predict", files={"file": ("f.bin", body, "application/octet-stream")}),
    ):
        assert response.status_code == status
        detail = response.json()["detail"]
        assert needle in detail and "\n" not in detail
    assert client.get("/health").json()["status"] == "ok"


def test_oversized_chunked_body_without_length_is_413(client):
    def chunks():
        for _ in range(10):
            yield b"\xff" * 50_000

    response = client.post("/predict", content=chunks())
    assert response.status_code == 413 and "limit" in response.json()["detail"]


def test_multipart_without_a_file_is_400(client):
    body = b'--b0\r\nContent-Disposition: form-data; name="name"\r\n\r\nx\r\n--b0--\r\n'
    headers = {"content-type": "multipart/form-data; boundary=b0"}
    response = client.post("/predict", content=body, headers=headers)
    assert response.status_code == 400 and "no file" in response.json()["detail"]


def test_concurrent_requests_share_forward_passes(predictor):
    app = create_app(predictor, max_batch=32, max_wait_ms=300)
    images = [photo_jpeg(100 + i) for i in range(24)]
    with TestClient(app) as client, ThreadPoolExecutor(24) as pool:
        responses = list(pool.map(lambda d: client.post("/predict", content=d), images))
        health = client.get("/health").json()
    assert all(r.status_code == 200 for r in responses)
    for i, (response, data) in enumerate(zip(responses, images)):
        _same(response.json()["top"], _expected(predictor, data))
        assert response.json()["top"][0]["class_id"] == label(100 + i)  # its own answer
    assert health["images"] == 24
    assert health["forwards"] <= 8 and health["largest_batch"] >= 3


def test_batcher_splits_at_max_batch_and_matches_one_by_one(predictor):
    images = [predictor.load_image(photo_jpeg(200 + i)) for i in range(20)]

    async def go():
        batcher = MicroBatcher(predictor, max_batch=8, max_wait=0.2)
        await batcher.start()
        try:
            return await asyncio.gather(*(batcher.submit(im) for im in images)), batcher.stats
        finally:
            await batcher.stop()

    rows, stats = asyncio.run(go())
    assert (stats.forwards, stats.images, stats.largest) == (3, 20, 8)
    for i, (row, image) in enumerate(zip(rows, images)):
        np.testing.assert_allclose(row, predictor.probabilities(predictor.stack([image]))[0],
                                   atol=1e-5)  # fmt: skip
        assert predictor.meta.classes[int(np.argmax(row))] == label(200 + i)


def test_ensemble_is_served(ensemble_dir):
    predictor = Predictor.load(ensemble_dir, device="cpu")
    data = photo_jpeg(5)
    with TestClient(create_app(predictor)) as client:
        response = client.post("/predict", content=data)
    assert response.status_code == 200
    _same(response.json()["top"], _expected(predictor, data))
    assert response.json()["top"][0]["class_id"] == label(5)


def test_serve_defaults_cap_bodies_at_10_mb_and_images_at_40_megapixels(run_dir, monkeypatch):
    """README: ``--max-body-mb`` (10) and ``--max-pixels`` (40 M) by default. ``deepimage
    serve`` with no such flags; its app is exercised in place of uvicorn's server."""
    import uvicorn

    from deepimage.cli import main

    answers = {}
    mb = 1024 * 1024
    probes = {
        "body over 10 MB": b"\xff" * (10 * mb + 1),
        "body of 10 MB": b"\xff" * (10 * mb),
        "over 40 M pixels": png_bomb(6325, 6325, bit_depth=1, color_type=0),  # 40,005,625
        "under 40 M pixels": png_bomb(6324, 6324, bit_depth=1, color_type=0),  # 39,992,976
    }

    class InPlaceOfUvicorn:
        started = True

        def __init__(self, config: uvicorn.Config) -> None:
            self.app = config.app

        def run(self) -> None:
            with TestClient(self.app) as client:
                for name, body in probes.items():
                    response = client.post("/predict", content=body)
                    answers[name] = (response.status_code, response.json()["detail"])

    monkeypatch.setattr(uvicorn, "Server", InPlaceOfUvicorn)
    assert main(["serve", str(run_dir), "--log-level", "warning"]) == 0
    assert answers["body over 10 MB"][0] == 413
    assert answers["body of 10 MB"][0] == 415  # read in full, then found not to be an image
    assert answers["over 40 M pixels"][0] == 400
    assert "too many pixels" in answers["over 40 M pixels"][1]
    assert answers["under 40 M pixels"][0] == 400  # a header without pixels: truncated
    assert "too many pixels" not in answers["under 40 M pixels"][1]
