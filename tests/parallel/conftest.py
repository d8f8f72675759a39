"""Runs of ``deepimage train`` shared by the command-line equivalence tests (slow ones)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import env, write_noise_folder

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


class CliRuns:
    """``deepimage train`` of vgg16_deepimage (width 1/4, 40/32 px, batch 16, fp32, default
    optimizer settings) on one noise folder; one-process references are run once each."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = write_noise_folder(root / "data")
        self._singles: dict[tuple[str, int], Path] = {}

    def args(self, out: Path, augment: str, steps: int, cache: Path | None = None) -> list[str]:
        """Arguments after ``python`` (``-m deepimage train ...``), for python and torchrun."""
        return [
            "-m", "deepimage", "-q", "train", "--data", str(self.data), "--out", str(out),
            "--cache-dir", str(cache or self.root / "cache"), "--model", "vgg16_deepimage",
            "--width", "0.25", "--size", "40", "--crop", "32", "--batch-size", "16",
            "--epochs", "3", "--max-steps", str(steps), "--augment", augment,
            "--precision", "fp32", "--workers", "0", "--checkpoint-every", "1",
            "--no-progress", "--no-tensorboard",
        ]  # fmt: skip

    def single(self, augment: str, steps: int) -> Path:
        """The one-process run's folder (run on first use)."""
        key = (augment, steps)
        if key not in self._singles:
            out = self.root / f"single-{augment}-{steps}"
            cmd = [sys.executable, *self.args(out, augment, steps)]
            subprocess.run(cmd, check=True, env=env(), timeout=600, capture_output=True)
            self._singles[key] = out
        return self._singles[key]

    def torchrun(self, name: str, augment: str, steps: int, *extra: str, procs: int = 2) -> Path:
        """A ``torchrun --standalone`` run of ``procs`` processes; returns its folder."""
        out = self.root / name
        cmd = [*TORCHRUN, "--standalone", f"--nproc_per_node={procs}",
               *self.args(out, augment, steps), *extra]  # fmt: skip
        done = subprocess.run(cmd, env=env(), timeout=600, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return out


@pytest.fixture(scope="session")
def cli_runs(tmp_path_factory) -> CliRuns:
    return CliRuns(tmp_path_factory.mktemp("cli-runs"))
