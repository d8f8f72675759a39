"""A real ``deepimage serve`` process on loopback: graceful SIGTERM, loopback by default."""

from __future__ import annotations

import signal
import threading
import time

import httpx
import pytest

from tests.helpers import photo_jpeg

from .conftest import label, start_server

pytestmark = pytest.mark.slow


def test_sigterm_finishes_in_flight_requests_then_exits(run_dir):
    # a long batching wait keeps the requests in flight when the signal arrives
    proc, url = start_server(run_dir, "--max-wait-ms", "1500", "--max-batch", "64")
    try:
        results: list[httpx.Response] = []

        def send(seed: int) -> None:
            results.append(httpx.post(f"{url}/predict", content=photo_jpeg(seed), timeout=30))

        threads = [threading.Thread(target=send, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        time.sleep(0.6)
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(30)
        assert [r.status_code for r in results] == [200, 200, 200]
        assert all(len(r.json()["top"]) == 3 for r in results)
        assert sorted(r.json()["top"][0]["class_id"] for r in results) == [
            label(i) for i in range(3)
        ]
        # uvicorn re-raises the signal after its graceful shutdown, as a SIGTERMed process should
        assert proc.wait(30) in (0, -signal.SIGTERM)
        output = proc.stdout.read()
        assert "on http://127.0.0.1:" in output and "Traceback" not in output
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
