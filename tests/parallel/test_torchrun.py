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
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deepimage.runs import load_state
from tests.helpers import (
    TIMINGS,
    env,
    max_relative_error,
    train_cmd,
    wait_until,
    write_noise_folder,
)

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


def test_a_two_process_checkpoint_resumes_on_one_process(runs):
    """README: a data-parallel run resumes on another number of processes. Two processes
    stop mid-epoch (a checkpoint after step 5 of 8); one process finishes the run and ends
    with the weights of the one-process run."""
    root, data, cache = runs
    out = root / "two-then-one"
    cmd = train_cmd(data, out, cache, *FLAGS)
    stop = torchrun(*module_cmd(cmd), "--max-steps", "5")
    subprocess.run(stop, check=True, env=env(), timeout=300, capture_output=True)
    state = load_state(out / "checkpoint.safetensors")
    assert (state["global_step"], state["step_in_epoch"]) == (5, 5)
    subprocess.run([*cmd, "--resume", "--max-steps", "1000"], check=True, env=env(), timeout=300)
    assert max_relative_error(out, root / "single") <= 1e-5


def _val_metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k.startswith("val_")} for row in rows]


def test_validation_metrics_equal_on_one_and_two_processes_with_an_uneven_split(tmp_path):
    """Nine validation images (3 classes x 3) over two processes: no image counted twice or
    left out, so the validation metrics equal the one-process run's."""
    data = write_noise_folder(tmp_path / "data", classes=3, per_class=18)
    flags = [*FLAGS, "--epochs", "1", "--val-split", "0.17"]
    single = train_cmd(data, tmp_path / "single", tmp_path / "cache", *flags)
    subprocess.run(single, check=True, env=env(), timeout=300)
    two = train_cmd(data, tmp_path / "two", tmp_path / "cache", *flags)
    subprocess.run(torchrun(*module_cmd(two)), check=True, env=env(), timeout=300,
                   capture_output=True)  # fmt: skip
    summaries = [json.loads((tmp_path / r / "summary.json").read_text()) for r in ("single", "two")]
    assert [s["n_val_images"] for s in summaries] == [9, 9]
    one, both = _val_metrics(tmp_path / "single"), _val_metrics(tmp_path / "two")
    assert len(one) == len(both) == 1 and one[0].keys() == both[0].keys()
    for key, value in one[0].items():
        assert both[0][key] == pytest.approx(value, rel=1e-5), key
    assert one[0]["val_top1"] * 9 == pytest.approx(round(one[0]["val_top1"] * 9))  # of 9


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


def signal_rank_1(cmd: list[str], out, step: int, sig: int) -> subprocess.Popen:
    """Start ``cmd`` (torchrun, 2 workers) and send ``sig`` to rank 1 once a checkpoint at
    ``step`` or later exists; return the running torchrun."""
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wait_until(
        lambda: load_state(out / "checkpoint.safetensors")["global_step"] >= step,
        120,
        f"a checkpoint at step {step}",
        alive=lambda: proc.poll() is None,
    )
    pids = worker_pids(proc.pid)
    assert set(pids) == {0, 1}
    os.kill(pids[1], sig)
    return proc


def test_sigkill_one_worker_restarts_and_ends_identical(runs):
    root, data, cache = runs
    out = root / "killed"
    cmd = torchrun("--max-restarts", "1", *module_cmd(train_cmd(data, out, cache, *FLAGS)))
    # rank 1 dies in the middle of epoch 1 (8 steps)
    proc = signal_rank_1(cmd, out, 5, signal.SIGKILL)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output.decode()[-3000:]
    assert b"CollectiveError: rank 0 of 2" in output  # the survivor names itself and the op
    wa, wb = load_file(out / "model.safetensors"), load_file(root / "two" / "model.safetensors")
    for key in wb:
        assert torch.equal(wa[key], wb[key]), f"{key} differs after the restart"
    rows = [
        [{k: v for k, v in json.loads(line).items() if k not in TIMINGS}
         for line in (run / "metrics.jsonl").read_text().splitlines()]
        for run in (out, root / "two")
    ]  # fmt: skip
    assert rows[0] == rows[1] and len(rows[0]) == 2


def test_sigterm_to_one_worker_stops_both_at_one_step_and_resumes_identical(runs):
    """SIGTERM reaches rank 1 alone: the ranks agree through the stop vote (no blocking
    collective per step), both stop after the same step, rank 0 writes the checkpoint, and
    the resumed run ends bitwise equal to the uninterrupted one. Ranks stopping at
    different steps would leave one of them in a collective the other never joins."""
    root, data, cache = runs
    out = root / "sigterm"
    cmd = torchrun(*module_cmd(train_cmd(data, out, cache, *FLAGS, "--dist-timeout", "60")))
    proc = signal_rank_1(cmd, out, 3, signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    text = output.decode()
    assert proc.returncode != 0, text[-3000:]  # torchrun reports the workers' exit 130
    assert "CollectiveError" not in text, text[-3000:]
    assert text.count("stopped at step") == 2, text[-3000:]  # both ranks, cleanly
    steps = {int(m) for m in re.findall(r"stopped at step (\d+)", text)}
    state = load_state(out / "checkpoint.safetensors")
    assert steps == {int(state["global_step"])} and 3 <= state["global_step"] < 16
    subprocess.run([*cmd, "--resume"], check=True, env=env(), timeout=300, capture_output=True)
    wa, wb = load_file(out / "model.safetensors"), load_file(root / "two" / "model.safetensors")
    for key in wb:
        assert torch.equal(wa[key], wb[key]), f"{key} differs after the stop and resume"
