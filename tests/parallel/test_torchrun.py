"""torchrun end to end: N=2 equals one process, and a killed worker costs nothing but time.

``python -m deepimage train`` on one process and ``torchrun --nproc_per_node 2 -m deepimage
train --sync lazy`` end with the same weights (1e-5 relative, fp32, dropout keyed by image).
Under ``--max-restarts 1``, SIGKILL of rank 1 in the middle of an epoch makes torchrun restart
the job, which resumes from the last checkpoint and ends bitwise equal to the uninterrupted
N=2 run, with the same metrics.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deepimage.runs import load_state
from tests.helpers import env, max_relative_error, train_cmd, wait_until, write_noise_folder

pytestmark = pytest.mark.slow

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
FLAGS = ["--precision", "fp32", "--epochs", "2", "--workers", "0", "--sync", "lazy"]


def torchrun(*args: str) -> list[str]:
    return [*TORCHRUN, "--standalone", "--nproc_per_node", "2", *args]


def module_cmd(cmd: list[str]) -> list[str]:
    """``python -m deepimage ARGS`` -> ``-m deepimage ARGS`` for torchrun."""
    return cmd[1:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("torchrun")
    data = write_noise_folder(root / "data")
    cache = root / "cache"
    single = train_cmd(data, root / "single", cache, *FLAGS)
    subprocess.run(single, check=True, env=env(), timeout=300)
    two = torchrun(*module_cmd(train_cmd(data, root / "two", cache, *FLAGS)))
    subprocess.run(two, check=True, env=env(), timeout=300, capture_output=True)
    return root, data, cache


def test_two_processes_match_one(runs):
    root, _, _ = runs
    assert max_relative_error(root / "two", root / "single") <= 1e-5


def worker_pids(parent: int) -> dict[int, int]:
    """{rank: pid} of torchrun's worker processes."""
    found = {}
    for child in Path("/proc").iterdir():
        if not child.name.isdigit():
            continue
        try:
            stat = (child / "stat").read_text().rsplit(")", 1)[1].split()
            environ = (child / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat[1]) != parent:
            continue
        for item in environ:
            if item.startswith(b"RANK="):
                found[int(item[5:])] = int(child.name)
    return found


def test_sigkill_one_worker_restarts_and_ends_identical(runs):
    root, data, cache = runs
    out = root / "killed"
    cmd = torchrun("--max-restarts", "1", *module_cmd(train_cmd(data, out, cache, *FLAGS)))
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wait_until(
        lambda: load_state(out / "checkpoint.safetensors")["global_step"] >= 5,
        120,
        "a checkpoint at step 5",
        alive=lambda: proc.poll() is None,
    )
    pids = worker_pids(proc.pid)
    assert set(pids) == {0, 1}
    os.kill(pids[1], signal.SIGKILL)  # rank 1 dies in the middle of epoch 1 (8 steps)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output.decode()[-3000:]
    assert b"CollectiveError: rank 0 of 2" in output  # the survivor names itself and the op
    wa, wb = load_file(out / "model.safetensors"), load_file(root / "two" / "model.safetensors")
    for key in wb:
        assert torch.equal(wa[key], wb[key]), f"{key} differs after the restart"
    rows = [
        [{k: v for k, v in json.loads(line).items() if k != "images_per_s"}
         for line in (run / "metrics.jsonl").read_text().splitlines()]
        for run in (out, root / "two")
    ]  # fmt: skip
    assert rows[0] == rows[1] and len(rows[0]) == 2
