"""A real ``deepimage serve`` process on loopback: graceful SIGTERM, loopback by default."""

from __future__ import annotations

import http.client
import json
import signal
from urllib.parse import urlsplit

import httpx
import pytest

from tests.helpers import photo_jpeg

from .conftest import label, start_server

pytestmark = pytest.mark.slow


def test_sigterm_finishes_in_flight_requests_then_exits(run_dir):
    # a long batching wait keeps the requests in flight when the signal arrives
    proc, url = start_server(run_dir, "--max-wait-ms", "1500", "--max-batch", "64")
    try:
        address = urlsplit(url)
        connections = []
        for seed in range(3):  # request() returns once the whole request is sent
            conn = http.client.HTTPConnection(address.hostname, address.port, timeout=30)
            conn.request("POST", "/predict", body=photo_jpeg(seed))
            connections.append(conn)
        # a round trip after the three requests were sent: the server's event loop has read
        # them (their bytes were waiting first), so they are in flight, held by the batcher
        assert httpx.get(f"{url}/health", timeout=10).json()["forwards"] == 0
        proc.send_signal(signal.SIGTERM)
        responses = [conn.getresponse() for conn in connections]
        assert [r.status for r in responses] == [200, 200, 200]
        answers = [json.loads(r.read())["top"] for r in responses]
        assert all(len(top) == 3 for top in answers)
        assert [top[0]["class_id"] for top in answers] == [label(i) for i in range(3)]
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
