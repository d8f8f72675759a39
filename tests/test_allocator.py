"""retain_freed_memory: a training loop's repeated large allocations stop page-faulting."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from deepimage import allocator

STEPS = """
import resource, sys, torch
from deepimage.allocator import retain_freed_memory
print(retain_freed_memory())
sizes = [64 * 2**20 // 4, 8 * 2**20 // 4, 40 * 2**20 // 4]  # a step's large tensors
def step():
    xs = [torch.ones(n) for n in sizes]
    return sum(float(x[0]) for x in xs)
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""


def faults_per_step(**env: str) -> tuple[bool, float]:
    clean = {
        k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "DEEPIMAGE_MALLOC"))
    }
    out = subprocess.run([sys.executable, "-c", STEPS], env={**clean, **env}, check=True,
                         capture_output=True, text=True).stdout.split()  # fmt: skip
    return out[0] == "True", float(out[1])


@pytest.mark.skipif(not allocator._is_glibc(), reason="glibc's allocator only")
def test_repeated_large_allocations_reuse_their_pages():
    applied, retained = faults_per_step()
    skipped, system = faults_per_step(DEEPIMAGE_MALLOC="system")
    assert applied and not skipped
    # 112 MB a step: ~28,700 faults of 4 KiB with mmap per allocation, a few thousand kept
    assert system > 20_000
    assert retained < system / 3


def test_a_users_own_malloc_settings_win(monkeypatch):
    monkeypatch.setattr(allocator, "_applied", False)
    monkeypatch.setenv("MALLOC_MMAP_MAX_", "65536")
    assert allocator.retain_freed_memory() is False


def test_training_and_evaluation_keep_freed_memory(tmp_path, monkeypatch):
    from deepimage.config import resolve_config
    from deepimage.evaluate import evaluate as evaluate_module
    from deepimage.train import loop
    from tests.helpers import write_flat_folder

    calls = []
    monkeypatch.setattr(loop, "retain_freed_memory", lambda: calls.append("train"))
    monkeypatch.setattr(evaluate_module, "retain_freed_memory", lambda: calls.append("evaluate"))
    data = write_flat_folder(tmp_path / "d", {"a": 4, "b": 4})
    values = dict(data=str(data), out=str(tmp_path / "run"), model="vgg16_deepimage",
                  width=0.0625, size=32, crop=32, epochs=1, batch_size=4, workers=0,
                  progress=False, tensorboard=False, max_steps=1, precision="fp32",
                  cache_dir=str(tmp_path / "cache"))  # fmt: skip
    cfg = resolve_config(None, values)
    loop.train(cfg)
    evaluate_module.evaluate(tmp_path / "run", str(data), workers=0, progress=False,
                             cache_dir=str(tmp_path / "cache"))  # fmt: skip
    assert calls == ["train", "evaluate"]
