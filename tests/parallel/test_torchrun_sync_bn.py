"""torchrun end to end with ``--sync-bn``: two processes train like one process on the whole batch.

ResNet-18's batch norm makes fp32 training chaotic on a tiny noise data set: after two steps, the
same single-process run on one thread and on two threads already differs by several per cent on
some BN biases, from summation order alone. That difference is the noise floor. Two processes
with ``--sync-bn`` must stay within it, and two processes without it (per-rank statistics over
half the batch) must land far outside, which shows the synchronisation is what makes them match.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import env, max_relative_error, write_noise_folder

pytestmark = pytest.mark.slow


def train_args(data: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    return [
        "-m", "deepimage", "-q", "train", "--data", str(data), "--out", str(out),
        "--cache-dir", str(cache), "--model", "resnet18", "--size", "72", "--crop", "64",
        "--epochs", "1", "--max-steps", "2", "--batch-size", "8", "--workers", "0",
        "--lr", "0.01", "--precision", "fp32", "--channels-last", "--augment", "crop_flip",
        "--no-progress", "--no-tensorboard", *extra,
    ]  # fmt: skip


def test_sync_bn_two_processes_match_one(tmp_path):
    data = write_noise_folder(tmp_path / "data", size=72)
    cache = tmp_path / "cache"

    def run(out: str, *extra: str, threads: str = "1", procs: int = 1) -> Path:
        e = env()
        e["OMP_NUM_THREADS"] = threads
        launcher = [sys.executable]
        if procs > 1:
            launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
        args = train_args(data, tmp_path / out, cache, *extra)  # torchrun also takes `-m MODULE`
        subprocess.run([*launcher, *args], check=True, env=e, timeout=300, capture_output=True)
        return tmp_path / out

    single = run("single")
    floor = max_relative_error(run("single_2threads", threads="2"), single)
    synced = max_relative_error(run("synced", "--sync", "lazy", "--sync-bn", procs=2), single)
    local = max_relative_error(run("local", "--sync", "lazy", procs=2), single)
    assert synced <= max(1e-5, 2 * floor), (synced, floor)
    assert local >= 5 * max(synced, floor), (local, synced, floor)
