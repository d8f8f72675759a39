"""torchrun end to end: ``--parallel hybrid`` on 2 processes ends with one process's weights.

Through the CLI with the default optimizer settings (SGD, momentum 0.9, weight decay 5e-4 on
every parameter, biases included), fp32, crop + flip augmentation, 6 steps: hybrid under each
``--sync`` against a plain one-process run, within 1e-5 relative per tensor.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import env, max_relative_error, write_noise_folder

pytestmark = pytest.mark.slow

RTOL = 1e-5
STEPS = 6


def _cmd(data: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    """``-m deepimage train`` of a tiny VGG; no optimizer flag: the defaults."""
    return [
        "-m", "deepimage", "-q", "train", "--data", str(data), "--out", str(out),
        "--cache-dir", str(cache), "--model", "vgg16_deepimage", "--width", "0.0625",
        "--size", "36", "--crop", "32", "--batch-size", "8", "--precision", "fp32",
        "--augment", "crop_flip", "--max-steps", str(STEPS), "--workers", "0",
        "--checkpoint-every", "0", "--no-progress", "--no-tensorboard", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    root = tmp_path_factory.mktemp("hybrid-cli")
    data = write_noise_folder(root / "data")
    cmd = [sys.executable, *_cmd(data, root / "single", root / "cache")]
    subprocess.run(cmd, check=True, env=env(), timeout=300)
    return root, data


@pytest.mark.parametrize("sync", ["ddp", "butterfly", "lazy"])
def test_hybrid_on_two_processes_ends_with_one_process_weights(single, sync):
    root, data = single
    out = root / f"hybrid-{sync}"
    hybrid = _cmd(data, out, root / "cache", "--parallel", "hybrid", "--sync", sync)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node", "2", *hybrid]  # fmt: skip
    done = subprocess.run(cmd, env=env(), timeout=300, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    err = max_relative_error(out, root / "single")
    assert err <= RTOL, f"hybrid --sync {sync}: off by {err:.2e} (relative)"
