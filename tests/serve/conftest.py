"""Tiny untrained models saved as runs, an ensemble of two sizes, and generated photos."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deepimage.models import get_model
from deepimage.runs import WEIGHTS, save_weights

CLASSES = ["n01", "n02", "n03"]
NAMES = {"n01": "tench, Tinca tinca", "n02": "goldfish", "n03": "great white shark"}
SHARED = Path(__file__).resolve().parents[3] / "shared" / "datasets"
IMAGENET_SAMPLE = SHARED / "imagenet-sample"


def make_run(path: Path, *, size: int = 40, crop: int = 32, seed: int = 0) -> Path:
    """An untrained small VGG saved like a finished training run (fp32)."""
    torch.manual_seed(seed)
    model = get_model("vgg16_deepimage", num_classes=len(CLASSES), image_size=crop, width=0.125)
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():  # spread the untrained logits so the classes are told apart
        last.weight.mul_(3000.0)
    meta = {
        "model": "vgg16_deepimage",
        "model_kwargs": {"width": 0.125},
        "classes": CLASSES,
        "class_names": NAMES,
        "size": size,
        "crop": crop,
        "resize_mode": "stretch",
        "mean": list(model.mean),
        "std": list(model.std),
        "precision": "fp32",
    }
    path.mkdir(parents=True, exist_ok=True)
    save_weights(path / WEIGHTS, model, meta)
    return path


def photo(seed: int, size: tuple[int, int] = (64, 48)) -> Image.Image:
    """A smooth random colour image (compresses like a photo)."""
    gen = np.random.default_rng(seed)
    small = gen.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)


def jpeg_bytes(seed: int, size: tuple[int, int] = (64, 48)) -> bytes:
    buf = io.BytesIO()
    photo(seed, size).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def png_bomb(width: int = 60_000, height: int = 60_000) -> bytes:
    """A PNG whose header claims ``width x height`` pixels (over any sane pixel cap)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("serve") / "run")


@pytest.fixture(scope="session")
def ensemble_dir(tmp_path_factory) -> Path:
    from deepimage.ensemble import write_manifest

    root = tmp_path_factory.mktemp("ensemble")
    a = make_run(root / "s40", size=40, seed=1)
    b = make_run(root / "s48", size=48, seed=2)
    write_manifest(root, [a, b])
    return root


@pytest.fixture()
def image_folder(tmp_path) -> Path:
    """Five good JPEGs (one in a sub-folder), a truncated one, a text file, an empty one."""
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    for i in range(4):
        (root / f"img{i}.jpg").write_bytes(jpeg_bytes(i))
    (root / "sub" / "img4.jpg").write_bytes(jpeg_bytes(4, (30, 90)))
    (root / "truncated.jpg").write_bytes(jpeg_bytes(5)[:300])
    (root / "notes.txt").write_text("not an image\n")
    (root / "empty.png").write_bytes(b"")
    return root


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(source: Path, *extra: str, timeout: float = 90.0):
    """``deepimage serve`` in a child process on a free loopback port, once healthy.

    Returns ``(process, url)``; the caller terminates it.
    """
    import os
    import subprocess
    import sys
    import time

    import httpx

    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "deepimage", "serve", str(source), "--port", str(port),
         "--threads", "1", "--log-level", "warning", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {proc.stdout.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not become healthy in time")
