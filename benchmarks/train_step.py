"""Training-step throughput: deepimage's default path against a plain fp32 eager loop.

deepimage's path is bf16 autocast with channels_last memory (the defaults of ``train``), run
through the same ``forward_backward`` the trainer uses. The peer is the torchvision
reference loop: fp32, contiguous NCHW, eager. Both run interleaved in one process, on the
same model architecture and synthetic batches, and the ratio of medians is printed.

    python benchmarks/train_step.py [--repeats 5] [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from deepimage.bench.report import header, spread
from deepimage.models import get_model
from deepimage.train.step import forward_backward

CASES = [
    # (label, model, image size, batch)
    ("resnet18 224x224 batch 32", "resnet18", 224, 32),
    ("resnet18 32x32 batch 128 (CIFAR-sized)", "resnet18", 32, 128),
]


def reference_step(model, opt, x, y) -> None:
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def deepimage_step(model, opt, x, y) -> None:
    forward_backward(model, x, y, precision="bf16")
    opt.step()
    opt.zero_grad(set_to_none=True)


def time_steps(step, model, opt, x, y, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step(model, opt, x, y)
    return len(x) * steps / (time.perf_counter() - start)


def run_case(name: str, size: int, batch: int, repeats: int, steps: int) -> dict:
    torch.manual_seed(0)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 1000, (batch,))
    models = {}
    for path in ("reference", "deepimage"):
        torch.manual_seed(0)
        model = get_model(name, 1000, image_size=size).train()
        if path == "deepimage":
            model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        models[path] = (model, opt)
    inputs = {"reference": x, "deepimage": x.contiguous(memory_format=torch.channels_last)}
    steps_fn = {"reference": reference_step, "deepimage": deepimage_step}
    for path, (model, opt) in models.items():  # warm-up: allocator, oneDNN primitives
        for _ in range(2):
            steps_fn[path](model, opt, inputs[path], y)
    rates: dict[str, list[float]] = {"reference": [], "deepimage": []}
    for _ in range(repeats):  # interleaved, so drifts in machine load hit both alike
        for path, (model, opt) in models.items():
            rates[path].append(time_steps(steps_fn[path], model, opt, inputs[path], y, steps))
    ratios = [d / r for d, r in zip(rates["deepimage"], rates["reference"])]
    return {
        "reference": rates["reference"],
        "deepimage": rates["deepimage"],
        "ratio_median": statistics.median(rates["deepimage"])
        / statistics.median(rates["reference"]),
        "ratio_spread": (min(ratios), max(ratios)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    header("training-step throughput: deepimage (bf16 + channels_last) vs fp32 eager")
    results = {}
    for label, model, size, batch in CASES:
        r = run_case(model, size, batch, args.repeats, args.steps)
        results[label] = r
        print(f"\n{label}")
        print(f"  fp32 eager reference : {spread(r['reference'])} images/s")
        print(f"  deepimage default    : {spread(r['deepimage'])} images/s")
        lo, hi = r["ratio_spread"]
        print(f"  ratio (median)       : {r['ratio_median']:.2f}x  (per-repeat {lo:.2f}-{hi:.2f}x)")
    print(json.dumps({k: round(v["ratio_median"], 3) for k, v in results.items()}))


if __name__ == "__main__":
    main()
