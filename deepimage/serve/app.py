"""The HTTP service: FastAPI app with predict, health, classes, the web page and OpenAPI docs.

``POST /predict`` takes a multipart upload (any one file field) or the raw image bytes as
the body. The body is read with a size cap (413 past it) before anything is parsed; the
image is decoded in a worker thread with a pixel cap, and every decoding failure is a client
error with a one-line reason: 415 for something that is not an image, 400 for an empty,
truncated or corrupt file or a decompression bomb. Decoded images go through a
:class:`~deepimage.serve.batcher.MicroBatcher`, so concurrent requests share forward passes.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from importlib import resources
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from deepimage import __version__
from deepimage.data.decode import DecodeError
from deepimage.serve.batcher import MicroBatcher
from deepimage.serve.predict import Predictor

logger = logging.getLogger(__name__)

DEFAULT_MAX_BODY = 10 * 1024 * 1024
DEFAULT_MAX_PIXELS = 40_000_000  # a photo of 40 megapixels; more is refused as a bomb


class ClientError(Exception):
    """A request the client must fix; ``status`` and a one-line ``reason``."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _one_line(text: str) -> str:
    return " ".join(text.split())[:300]


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) as soon as it is known to exceed ``limit`` bytes."""
    length = request.headers.get("content-length")
    if length is not None:
        try:
            declared = int(length)
        except ValueError:
            raise ClientError(400, "invalid Content-Length header") from None
        if declared > limit:
            raise ClientError(413, f"body of {declared} bytes is over the limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ClientError(413, f"body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _image_bytes(request: Request, limit: int) -> bytes:
    """The image's bytes from a multipart form (first file field) or the raw body."""
    body = await _read_body(request, limit)
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        if not body:
            raise ClientError(400, "empty body: send the image's bytes or a multipart upload")
        return body

    async def stream() -> AsyncIterator[bytes]:
        yield body

    try:
        form = await MultiPartParser(request.headers, stream(), max_files=1, max_fields=16).parse()
    except MultiPartException as err:
        raise ClientError(400, f"bad multipart body: {_one_line(err.message)}") from None
    for value in form.values():
        if isinstance(value, UploadFile):
            data = await value.read()
            await value.close()
            if not data:
                raise ClientError(400, f"empty file {value.filename or ''}".strip())
            return data
    raise ClientError(400, "multipart body has no file field")


def _decode_status(reason: str) -> int:
    return 415 if reason.startswith("not an image") else 400


IMAGE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary"}},
                    "required": ["file"],
                }
            },
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
"""The OpenAPI description of ``POST /predict``'s body (the route reads the body itself)."""


def create_app(
    predictor: Predictor,
    *,
    max_batch: int = 16,
    max_wait_ms: float = 5.0,
    max_body: int = DEFAULT_MAX_BODY,
    default_topk: int = 5,
) -> FastAPI:
    """The service for ``predictor``; the batcher runs for the app's lifetime."""
    batcher = MicroBatcher(predictor, max_batch=max_batch, max_wait=max_wait_ms / 1000)
    app = FastAPI(
        title="deepimage",
        version=__version__,
        description=f"Image classification with {predictor.name}.",
        lifespan=_lifespan(predictor, batcher),
    )
    app.state.batcher = batcher
    app.state.predictor = predictor
    app.add_exception_handler(ClientError, _client_error)
    _add_info_routes(app, predictor, batcher, {"max_batch": max_batch, "max_wait_ms": max_wait_ms})
    _add_predict_route(app, predictor, batcher, max_body, default_topk)
    return app


def _lifespan(
    predictor: Predictor, batcher: MicroBatcher
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """Start the batcher with the app and stop it (logging its counters) at shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await batcher.start()
        logger.info("serving %s (%s backend)", predictor.name, predictor.backend)
        try:
            yield
        finally:
            await batcher.stop()
            logger.info("stopped: %s", batcher.stats.as_dict())

    return lifespan


async def _client_error(request: Request, err: ClientError) -> JSONResponse:
    """A :class:`ClientError` as its status and ``{"detail": reason}``."""
    return JSONResponse({"detail": err.reason}, status_code=err.status)


def _add_info_routes(
    app: FastAPI, predictor: Predictor, batcher: MicroBatcher, batching: dict[str, Any]
) -> None:
    """``GET /`` (the web page), ``/health`` and ``/classes``."""

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        page = resources.files("deepimage.serve").joinpath("static/index.html").read_text()
        return HTMLResponse(page)

    @app.get("/health", summary="Liveness, the model, and micro-batching counters")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": predictor.name,
            "backend": predictor.backend,
            "num_classes": len(predictor.classes),
            "batching": batching,
            **batcher.stats.as_dict(),
        }

    @app.get("/classes", summary="The model's classes with readable names")
    async def classes() -> dict[str, Any]:
        return {
            "model": predictor.name,
            "classes": [
                {"index": i, "class_id": c, "name": predictor.meta.name_of(c)}
                for i, c in enumerate(predictor.classes)
            ],
        }


def _add_predict_route(
    app: FastAPI, predictor: Predictor, batcher: MicroBatcher, max_body: int, default_topk: int
) -> None:
    """``POST /predict``: read and decode one image, then classify it in a shared batch."""

    @app.post(
        "/predict",
        summary="Top-k classes of one image (multipart upload or raw bytes)",
        openapi_extra=IMAGE_BODY,
        responses={
            400: {"description": "empty, truncated or corrupt image, or a decompression bomb"},
            413: {"description": "body over the size limit"},
            415: {"description": "not an image"},
        },
    )
    async def predict(
        request: Request,
        topk: int = Query(default_topk, ge=1, le=1000, description="number of classes"),
    ) -> dict[str, Any]:
        data = await _image_bytes(request, max_body)
        try:
            image = await run_in_threadpool(predictor.load_image, data)
        except DecodeError as err:
            reason = _one_line(str(err))
            raise ClientError(_decode_status(reason), reason) from None
        probs = await batcher.submit(image)
        return {"model": predictor.name, "top": predictor.top(probs, topk)}
