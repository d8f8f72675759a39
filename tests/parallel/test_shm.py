"""When the shared-memory exchange is offered, and how it tells a dead peer (one process;
the exchange itself runs on spawned processes in ``test_collectives.py``)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time

import pytest

from deepimage.parallel import shm


def test_the_switch_turns_it_off(monkeypatch):
    monkeypatch.setenv("DEEPIMAGE_SHM", "0")
    assert shm.shm_supported() == "DEEPIMAGE_SHM=0"


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.machine() != "x86_64", reason="Linux x86-64 only"
)
def test_offered_on_linux_x86_64_cpu(monkeypatch):
    monkeypatch.delenv("DEEPIMAGE_SHM", raising=False)
    assert shm.shm_supported() is None


def test_other_machines_keep_torch_distributed(monkeypatch):
    monkeypatch.delenv("DEEPIMAGE_SHM", raising=False)
    monkeypatch.setattr(shm.platform, "machine", lambda: "aarch64")
    assert "x86-64" in shm.shm_supported()


@pytest.mark.skipif(platform.system() != "Linux", reason="reads /proc")
def test_a_zombie_or_reaped_peer_counts_as_dead():
    assert shm.process_alive(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while shm.process_alive(child.pid) and time.monotonic() < deadline:
        time.sleep(0.05)  # exited but not yet reaped: a zombie
    assert not shm.process_alive(child.pid)
    child.wait()
    assert not shm.process_alive(child.pid)
