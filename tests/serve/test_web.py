"""The web page in headless Chromium: upload a photo, see the top-5 bars, take a screenshot.

Without Debian's chromium (or the playwright package) the test skips, except where
``DEEPIMAGE_BROWSER_TEST=required`` (set by ``.ci/run``): there it fails, saying what is
missing, so CI never passes without having run it.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import httpx
import pytest

from tests.helpers import free_port, photo_jpeg, wait_until

from .conftest import IMAGENET_SAMPLE

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip

pytestmark = pytest.mark.slow


def _missing(what: str) -> None:
    """Skip for want of ``what``; fail instead where the browser test is required."""
    if os.environ.get("DEEPIMAGE_BROWSER_TEST") == "required":
        pytest.fail(f"the browser test is required here but {what} is missing", pytrace=False)
    pytest.skip(f"needs {what}")


@pytest.fixture()
def server(run_dir):
    """The app under uvicorn in a thread on a free loopback port."""
    import uvicorn

    from deepimage.serve.app import create_app
    from deepimage.serve.predict import Predictor

    app = create_app(Predictor.load(run_dir, device="cpu"))
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}/"
    wait_until(lambda: srv.started, 30, "uvicorn to start")
    yield url
    srv.should_exit = True
    thread.join(10)


@pytest.fixture()
def photo_file(tmp_path) -> Path:
    """A real ImageNet photo when the shared sample is present, else a generated JPEG."""
    if IMAGENET_SAMPLE.is_dir():
        first = sorted(IMAGENET_SAMPLE.glob("*.JPEG"))[0]
        return Path(shutil.copy(first, tmp_path / first.name))
    path = tmp_path / "photo.jpg"
    path.write_bytes(photo_jpeg(42, (320, 240)))
    return path


@pytest.fixture()
def sync_api():
    """playwright's sync API, once Chromium and playwright are both there."""
    if not CHROMIUM.exists():
        _missing(f"Debian's chromium at {CHROMIUM} (apt-get install chromium)")
    try:
        from playwright import sync_api
    except ImportError:
        _missing("the playwright package (pip install -e '.[dev]')")
    return sync_api


def test_upload_shows_top5_bars_matching_the_api(sync_api, server, photo_file, tmp_path):
    answer = httpx.post(f"{server}predict?topk=5", content=photo_file.read_bytes()).json()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"),  # a fresh --user-data-dir
            executable_path=str(CHROMIUM),
            headless=True,
            args=FLAGS,
            viewport={"width": 900, "height": 900},
        )
        try:
            page = browser.new_page()
            page.goto(server)
            page.wait_for_function(
                "document.getElementById('classes').children.length === 3", timeout=20_000
            )
            assert "vgg16_deepimage" in page.inner_text("#model")
            page.set_input_files("#file", str(photo_file))
            page.wait_for_selector("#results .row", timeout=20_000)
            rows = page.query_selector_all("#results .row")
            ids = [row.get_attribute("data-class-id") for row in rows]
            labels = [row.inner_text() for row in rows]
            width = page.eval_on_selector("#results .row .bar", "e => e.style.width")
            shot = tmp_path / "web-page.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    print(f"screenshot: {shot}")
    assert ids == [p["class_id"] for p in answer["top"]]
    top = answer["top"][0]
    assert top["name"] in labels[0] and f"{100 * top['probability']:.1f}%" in labels[0]
    # the browser writes a style width in its own shortest form ("100%" for "100.0%")
    assert width.endswith("%") and float(width[:-1]) == float(f"{100 * top['probability']:.1f}")
    assert shot.stat().st_size > 5_000
