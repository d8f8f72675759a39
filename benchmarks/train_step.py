"""Training-step throughput on tensors in memory: reference loop, deepimage fp32 and auto.

Three paths, interleaved in one process on the same architecture and synthetic batches:

- reference: the torchvision reference loop, fp32, contiguous NCHW, eager;
- deepimage fp32: the trainer's own ``forward_backward`` + SGD in fp32, in the layout
  ``channels_last: auto`` gives fp32 here: the cost of deepimage's step itself;
- deepimage auto: the precision and layout ``precision: auto`` picks on *this* machine
  (bf16 + channels_last only where the CPU has native bf16 and a probe measures it faster).

So the two ratios printed separate the causes: fp32/reference is the step code, auto/fp32
is the precision choice (1.00x where auto resolves to fp32).

    python benchmarks/train_step.py [--repeats 5] [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from deepimage.bench.report import header, spread
from deepimage.models import get_model
from deepimage.precision import resolve
from deepimage.train.step import forward_backward

CASES = [
    # (label, model, image size, batch)
    ("resnet18 224x224 batch 32", "resnet18", 224, 32),
    ("resnet18 32x32 batch 128 (CIFAR-sized)", "resnet18", 32, 128),
]
PATHS = ("reference", "deepimage fp32", "deepimage auto")


def reference_step(model, opt, x, y, precision) -> None:
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def deepimage_step(model, opt, x, y, precision) -> None:
    forward_backward(model, x, y, precision=precision)
    opt.step()
    opt.zero_grad(set_to_none=True)


def time_steps(step, model, opt, x, y, precision, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step(model, opt, x, y, precision)
    return len(x) * steps / (time.perf_counter() - start)


def run_case(name: str, size: int, batch: int, repeats: int, steps: int) -> dict:
    torch.manual_seed(0)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 1000, (batch,))
    cpu = torch.device("cpu")
    probe_model = get_model(name, 1000, image_size=size)
    auto = resolve("auto", "auto", cpu, probe_model, name, size, tempfile.mkdtemp())
    fp32 = resolve("fp32", "auto", cpu, probe_model, name, size, tempfile.mkdtemp())
    setups = {
        "reference": (reference_step, "fp32", False),
        "deepimage fp32": (deepimage_step, fp32.precision, fp32.channels_last),
        "deepimage auto": (deepimage_step, auto.precision, auto.channels_last),
    }
    runs = {}
    for path, (step, precision, channels_last) in setups.items():
        torch.manual_seed(0)
        model = get_model(name, 1000, image_size=size).train()
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        model = model.to(memory_format=fmt)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        runs[path] = (step, model, opt, x.contiguous(memory_format=fmt), precision)
        for _ in range(2):  # warm-up: allocator, oneDNN primitives
            step(model, opt, runs[path][3], y, precision)
    rates: dict[str, list[float]] = {path: [] for path in PATHS}
    for _ in range(repeats):  # interleaved, so drifts in machine load hit every path alike
        for path, (step, model, opt, xs, precision) in runs.items():
            rates[path].append(time_steps(step, model, opt, xs, y, precision, steps))
    return {"rates": rates, "auto": auto.describe(), "fp32": fp32.describe()}


def ratio(rates: dict[str, list[float]], a: str, b: str) -> str:
    med = statistics.median(rates[a]) / statistics.median(rates[b])
    per = [p / q for p, q in zip(rates[a], rates[b])]
    return f"{med:.2f}x (per-repeat {min(per):.2f}-{max(per):.2f}x)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--cases", nargs="+", type=int, default=None, help="indices of CASES")
    args = parser.parse_args()
    header("training-step throughput: reference fp32 loop vs deepimage fp32 vs deepimage auto")
    summary = {}
    for i, (label, model, size, batch) in enumerate(CASES):
        if args.cases is not None and i not in args.cases:
            continue
        r = run_case(model, size, batch, args.repeats, args.steps)
        rates = r["rates"]
        print(f"\n{label}")
        print(f"  auto resolves to     : {r['auto']}")
        for path in PATHS:
            print(f"  {path:<21}: {spread(rates[path])} images/s")
        print(f"  deepimage fp32 / ref : {ratio(rates, 'deepimage fp32', 'reference')}")
        print(f"  auto / fp32          : {ratio(rates, 'deepimage auto', 'deepimage fp32')}")
        print(f"  auto / ref           : {ratio(rates, 'deepimage auto', 'reference')}")
        summary[label] = {p: round(statistics.median(v), 1) for p, v in rates.items()}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
