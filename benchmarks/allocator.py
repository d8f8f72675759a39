"""Training steps with glibc's default allocator against deepimage's (freed memory kept).

Each case runs in fresh processes, alternating, ``--repeats`` times: one with
``DEEPIMAGE_MALLOC=system`` (glibc as it comes: an ``mmap`` and page faults for every large
tensor, every step), one as ``deepimage train`` runs (:func:`deepimage.allocator.
retain_freed_memory`). Both time the same fp32 steps of the trainer's ``forward_backward`` and
the optimizer ``deepimage train`` builds, on synthetic batches in memory; only the allocator
differs. Prints the median step time, its range, the ratio, and each process's peak
resident memory (``VmHWM``).

    python benchmarks/allocator.py [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from deepimage.bench.report import header

CASES = [("vgg16_deepimage", 32, 16), ("resnet18", 32, 128), ("resnet18", 224, 16)]

CHILD = """
import json, sys, time, torch
from deepimage.allocator import retain_freed_memory
from deepimage.config import resolve_config
from deepimage.models import get_model
from deepimage.parallel.optim import build_optimizer
from deepimage.train.step import forward_backward
model_name, size, batch, threads, steps = sys.argv[1], *map(int, sys.argv[2:6])
torch.set_num_threads(threads)
applied = retain_freed_memory()
model = get_model(model_name, 100, image_size=size)
opt = build_optimizer(model, resolve_config(None, {"precision": "fp32"}))
x, y = torch.randn(batch, 3, size, size), torch.randint(0, 100, (batch,))
times = []
for i in range(steps + 2):
    start = time.perf_counter()
    forward_backward(model, x, y, accum_steps=1, precision="fp32")
    opt.step()
    opt.zero_grad()
    times.append(time.perf_counter() - start)
hwm = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
print(json.dumps({"applied": applied, "step_ms": 1e3 * sorted(times[2:])[len(times[2:]) // 2],
                  "peak_mb": hwm / 1024}))
"""


def run(case: tuple[str, int, int], threads: int, steps: int, system: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["DEEPIMAGE_MALLOC"] = "system" if system else ""
    args = [sys.executable, "-c", CHILD, case[0], str(case[1]), str(case[2]), str(threads),
            str(steps)]  # fmt: skip
    out = subprocess.run(args, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=7)
    args = p.parse_args()
    header(f"allocator: fp32 training steps, {args.threads} threads, glibc as is vs kept memory")
    for case in CASES:
        got: dict[str, list[dict]] = {"system": [], "kept": []}
        for _ in range(args.repeats):
            for name in ("system", "kept"):
                got[name].append(run(case, args.threads, args.steps, name == "system"))
        assert all(r["applied"] for r in got["kept"]) and not any(
            r["applied"] for r in got["system"]
        )
        ms = {k: [r["step_ms"] for r in v] for k, v in got.items()}
        peak = {k: statistics.median(r["peak_mb"] for r in v) for k, v in got.items()}
        per = [s / k for s, k in zip(ms["system"], ms["kept"])]
        label = f"{case[0]} {case[1]} px batch {case[2]}"
        sys_ms, kept_ms = statistics.median(ms["system"]), statistics.median(ms["kept"])
        print(f"{label:32s} system {sys_ms:7.1f} ms ({min(ms['system']):.1f}-"
              f"{max(ms['system']):.1f}), kept {kept_ms:7.1f} ms ({min(ms['kept']):.1f}-"
              f"{max(ms['kept']):.1f}): {sys_ms / kept_ms:.2f}x (per repeat {min(per):.2f}-"
              f"{max(per):.2f}x); peak {peak['system']:.0f} -> {peak['kept']:.0f} MB",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
