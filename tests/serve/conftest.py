"""Small models with distinct answers per photo saved as runs, an ensemble of two sizes, and
generated photos whose class is their dominant colour (see :mod:`tests.helpers`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import helpers
from tests.helpers import free_port, photo_class, photo_jpeg

CLASSES = ["n01", "n02", "n03"]
NAMES = {"n01": "tench, Tinca tinca", "n02": "goldfish", "n03": "great white shark"}
SHARED = Path(__file__).resolve().parents[3] / "shared" / "datasets"
IMAGENET_SAMPLE = SHARED / "imagenet-sample"


def make_run(path: Path, *, size: int = 40, crop: int = 32, seed: int = 0) -> Path:
    """A small VGG fitted to the colour classes of :func:`tests.helpers.photo`, as a run."""
    return helpers.make_run(path, CLASSES, size=size, crop=crop, seed=seed, names=NAMES)


def label(seed: int) -> str:
    """The class id the fixture models must answer for ``photo_jpeg(seed)``."""
    return CLASSES[photo_class(seed)]


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
        (root / f"img{i}.jpg").write_bytes(photo_jpeg(i))
    (root / "sub" / "img4.jpg").write_bytes(photo_jpeg(4, (30, 90)))
    (root / "truncated.jpg").write_bytes(photo_jpeg(5)[:300])
    (root / "notes.txt").write_text("not an image\n")
    (root / "empty.png").write_bytes(b"")
    return root


def start_server(source: Path, *extra: str, timeout: float = 90.0):
    """``deepimage serve`` in a child process on a free loopback port, once healthy.

    Returns ``(process, url)``; the caller terminates it.
    """
    import os
    import subprocess
    import sys

    import httpx

    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "deepimage", "serve", str(source), "--port", str(port),
         "--threads", "1", "--log-level", "warning", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"

    try:
        helpers.wait_until(
            lambda: httpx.get(f"{url}/health", timeout=1).status_code == 200,
            timeout,
            "the server to answer /health",
            alive=lambda: proc.poll() is None,
        )
    except AssertionError:
        raise RuntimeError(f"server exited with {proc.returncode}: {proc.stdout.read()}") from None
    except TimeoutError:
        proc.kill()
        raise
    return proc, url
