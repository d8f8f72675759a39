"""One SGD step (momentum 0.9, weight decay 5e-4) over a model's parameters, per kernel.

Interleaved in one process on the same parameters and gradients:

- ``torch default``: ``torch.optim.SGD`` as a user builds it (``foreach=None``: on CPU the
  single-tensor loop, three passes per tensor), the peer;
- ``foreach``: ``torch.optim.SGD(foreach=True)``, deepimage's kernel before;
- ``deepimage``: the optimizer ``deepimage train`` builds (``fused=True`` where PyTorch has the
  kernel: one pass per tensor);
- ``strategy update``: :func:`deepimage.parallel.base.sgd_update_many_`, what the butterfly,
  lazy and hybrid strategies apply to their own tensors.

Prints milliseconds per step (median and range over repeats) and the ratios to the peer.

    python benchmarks/optimizer_step.py [--model vgg16_deepimage] [--size 32] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from deepimage.bench.report import header
from deepimage.config import resolve_config
from deepimage.models import get_model
from deepimage.parallel.base import sgd_update_many_
from deepimage.parallel.optim import build_optimizer

HYPER = {"lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4}


def steppers(model: torch.nn.Module) -> dict[str, Callable[[], None]]:
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    default = torch.optim.SGD(params, **HYPER)
    foreach = torch.optim.SGD(params, foreach=True, **HYPER)
    ours = build_optimizer(model, resolve_config(None, {"precision": "fp32", **HYPER}))
    bufs: list[torch.Tensor | None] = [None] * len(params)

    def strategy() -> None:
        bufs[:] = sgd_update_many_(params, [p.grad for p in params], bufs, **HYPER)

    return {"torch default": default.step, "foreach": foreach.step, "deepimage": ours.step,
            "strategy update": strategy}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vgg16_deepimage")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    header(f"optimizer_step: SGD over {args.model}'s parameters, {args.threads} thread(s)")
    model = get_model(args.model, 1000, image_size=args.size)
    n = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n / 1e6:.1f} M")
    step = steppers(model)
    for fn in step.values():  # momentum buffers exist from here on
        fn()
    ms: dict[str, list[float]] = {k: [] for k in step}
    for _ in range(args.repeats):
        for name, fn in step.items():
            start = time.perf_counter()
            fn()
            ms[name].append((time.perf_counter() - start) * 1e3)
    peer = statistics.median(ms["torch default"])
    for name, values in ms.items():
        med = statistics.median(values)
        print(f"{name:16s}: {med:7.1f} ms (min {min(values):.1f}, max {max(values):.1f}, "
              f"n={len(values)})  {peer / med:5.2f}x torch default")  # fmt: skip
    print(json.dumps({k: statistics.median(v) for k, v in ms.items()}))


if __name__ == "__main__":
    main()
