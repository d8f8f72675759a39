"""Kill-and-resume exactness: a run killed at any moment and resumed ends bitwise identical.

Real processes: ``python -m deepimage train`` is started, killed with SIGKILL (or stopped
with SIGINT) in the middle of an epoch, and resumed with ``--resume``.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deepimage.runs import load_state
from tests.helpers import TIMINGS, env, train_cmd, wait_until, write_noise_folder

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    data = write_noise_folder(root / "data")
    out = root / "uninterrupted"
    subprocess.run(train_cmd(data, out, root / "cache"), check=True, env=env(), timeout=300)
    return root, data, out


def wait_for_step(run: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> int:
    """The step of the first checkpoint at or after ``step`` (the process must still run)."""

    def reached() -> int:
        done = int(load_state(run / "checkpoint.safetensors")["global_step"])
        return done if done >= step else 0

    return wait_until(
        reached, timeout, f"a checkpoint at step {step}", alive=lambda: proc.poll() is None
    )


def assert_same_run(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), f"{key} differs after resume"
    rows = [
        [{k: v for k, v in json.loads(line).items() if k not in TIMINGS} for line in lines]
        for lines in ((a / "metrics.jsonl").read_text().splitlines(),
                      (b / "metrics.jsonl").read_text().splitlines())
    ]  # fmt: skip
    assert rows[0] == rows[1] and len(rows[0]) == 3


def test_sigkill_mid_epoch_then_resume_is_bitwise_exact(reference):
    root, data, ref = reference
    out = root / "killed"
    cmd = train_cmd(data, out, root / "cache")
    # Kill twice at different points (the second time in a later epoch), resuming each time.
    for kill_at in (4, 13):
        proc = subprocess.Popen(cmd + (["--resume"] if out.exists() else []), env=env())
        reached = wait_for_step(out, kill_at, proc)
        proc.send_signal(signal.SIGKILL)  # inside the step after that checkpoint
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
        assert reached % 8 != 0  # 64 training images, 8 steps per epoch: mid-epoch
    assert not (out / "model.safetensors").exists()
    subprocess.run(cmd + ["--resume"], check=True, env=env(), timeout=300)
    assert_same_run(ref, out)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stop_signal_saves_and_resume_is_bitwise_exact(reference, sig):
    """Ctrl-C or SIGTERM: a checkpoint at the end of the current step, exit status 130, and
    a resumed run equal to the uninterrupted one."""
    root, data, ref = reference
    out = root / f"interrupted-{sig.name}"
    cmd = train_cmd(data, out, root / "cache")
    proc = subprocess.Popen(cmd, env=env())
    wait_for_step(out, 9, proc)
    proc.send_signal(sig)
    assert proc.wait(timeout=60) == 130
    state = load_state(out / "checkpoint.safetensors")
    assert 9 <= state["global_step"] < 24
    subprocess.run(cmd + ["--resume"], check=True, env=env(), timeout=300)
    assert_same_run(ref, out)


def test_existing_run_is_not_overwritten_without_resume(reference):
    root, data, ref = reference
    before = (ref / "model.safetensors").read_bytes()
    result = subprocess.run(
        train_cmd(data, ref, root / "cache"), env=env(), capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "already holds a run" in result.stderr and len(result.stderr.splitlines()) == 1
    assert (ref / "model.safetensors").read_bytes() == before
