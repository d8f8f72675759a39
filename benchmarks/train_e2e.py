"""End-to-end training images/s from a JPEG folder, data loading included.

Four measurements, interleaved in one process, same model, crop, batch and optimizer:

- torchvision: the reference recipe, ``ImageFolder`` + ``transforms.v2`` (Resize to S,
  RandomCrop, RandomHorizontalFlip, ToImage, ToDtype, Normalize) + ``DataLoader``, fp32;
- deepimage fp32: the folder decoded once into a prepared uint8 store (timed apart, a
  one-off cost), batches read from the memory-mapped store in loader workers, cropped and
  flipped with keyed per-image parameters, trained in fp32: the data-path gain alone;
- deepimage auto: the same with the precision and layout ``precision: auto`` picks on this
  machine (fp32 where the CPU has no native bf16): the precision gain on top;
- compute limit: forward + backward + SGD on one batch already in memory, in the best
  precision this machine has (auto's): what the model alone costs, no data path at all.

    python benchmarks/train_e2e.py                      # CIFAR-10 at 32 px, crop 28
    python benchmarks/train_e2e.py --data ../shared/datasets/flowers12/train \
        --size 256 --crop 224 --batch 16 --steps 8 --width 1   # 224 px
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torchvision.transforms import v2

from deepimage.augment.pipeline import build_train_augment
from deepimage.bench.report import header, spread
from deepimage.data.cache import store_for
from deepimage.data.loader import iterate_batches, train_batches
from deepimage.models import get_model
from deepimage.precision import ExecutionChoice, resolve
from deepimage.train.step import forward_backward

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


MODEL = {"name": "resnet18", "width": 1.0}


def make_model(crop: int, classes: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = get_model(MODEL["name"], classes, image_size=crop, width=MODEL["width"])
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    return model, opt


def run_torchvision(
    data: Path, size: int, crop: int, batch: int, steps: int, workers: int, epoch: int
) -> float:
    tf = v2.Compose(
        [
            v2.Resize((size, size), antialias=True),
            v2.RandomCrop(crop),
            v2.RandomHorizontalFlip(),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(MEAN, STD),
        ]
    )
    dataset = torchvision.datasets.ImageFolder(str(data), transform=tf)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
        generator=torch.Generator().manual_seed(epoch),
    )
    model, opt = make_model(crop, len(dataset.classes))
    model.train()
    n, start = 0, None
    for i, (x, y) in enumerate(loader):
        if i == 3:  # after worker start-up and warm-up steps
            start, n = time.perf_counter(), 0
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        n += len(x)
        if i + 1 == steps + 3:
            break
    return n / (time.perf_counter() - start)


def run_deepimage(
    store, size: int, crop: int, batch: int, steps: int, workers: int, epoch: int,
    choice: ExecutionChoice,
) -> float:  # fmt: skip
    model, opt = make_model(crop, len(store.classes))
    fmt = torch.channels_last if choice.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt).train()
    augment = build_train_augment(
        "crop_flip", size=size, crop=crop, seed=0, mean=MEAN, std=STD, stats=store.stats
    )
    batches = train_batches(np.arange(len(store)), batch, seed=0, epoch=epoch)[: steps + 3]
    n, start = 0, None
    for i, (images, labels, rows) in enumerate(iterate_batches(store.path, size, batches, workers)):
        if i == 3:
            start, n = time.perf_counter(), 0
        x = augment(images, rows.numpy(), epoch)
        if not choice.channels_last:
            x = x.contiguous()
        forward_backward(model, x, labels, precision=choice.precision)
        opt.step()
        opt.zero_grad(set_to_none=True)
        n += len(x)
    return n / (time.perf_counter() - start)


def run_limit(crop: int, classes: int, batch: int, steps: int, choice: ExecutionChoice) -> float:
    """Forward + backward + SGD on one in-memory batch: the model's own cost."""
    model, opt = make_model(crop, classes)
    fmt = torch.channels_last if choice.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt).train()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, crop, crop, generator=gen).contiguous(memory_format=fmt)
    y = torch.randint(0, classes, (batch,), generator=gen)
    n, start = 0, None
    for i in range(steps + 3):
        if i == 3:
            start, n = time.perf_counter(), 0
        forward_backward(model, x, y, precision=choice.precision)
        opt.step()
        opt.zero_grad(set_to_none=True)
        n += batch
    return n / (time.perf_counter() - start)


def ratio(rates: dict[str, list[float]], a: str, b: str) -> str:
    med = statistics.median(rates[a]) / statistics.median(rates[b])
    per = [p / q for p, q in zip(rates[a], rates[b])]
    return f"{med:.2f}x (per-repeat {min(per):.2f}-{max(per):.2f}x)"


def main() -> None:
    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(here.parent.parent / "shared/datasets/cifar10/train"))
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--crop", type=int, default=28)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--width", type=float, default=1.0)
    args = parser.parse_args()
    MODEL.update(name=args.model, width=args.width)
    header(
        "end-to-end training images/s: torchvision reference vs deepimage fp32 vs deepimage auto"
    )
    cache = args.cache_dir or tempfile.mkdtemp(prefix="deepimage-bench-")
    start = time.perf_counter()
    store = store_for(args.data, [args.size], cache_dir=cache, progress=False)
    prepare_s = time.perf_counter() - start
    print(f"data    : {args.data} ({len(store)} images), crop {args.crop}, batch {args.batch}")
    print(f"model   : {args.model} (width {args.width})")
    print(f"prepare : {prepare_s:.1f} s once (decode into the store; reused by later runs)")
    model, _ = make_model(args.crop, len(store.classes))
    cpu = torch.device("cpu")
    key = f"{args.model}@{args.width:g}"
    auto = resolve("auto", "auto", cpu, model, key, args.crop, tempfile.mkdtemp())
    fp32 = resolve("fp32", "auto", cpu, model, key, args.crop, tempfile.mkdtemp())
    print(f"auto    : {auto.describe()}")
    print(f"fp32    : {fp32.describe()}")
    paths = ("torchvision", "deepimage fp32", "deepimage auto", "compute limit")
    rates: dict[str, list[float]] = {p: [] for p in paths}
    common = (args.crop, args.batch, args.steps, args.workers)
    for r in range(args.repeats):  # interleaved: drifts in machine load hit every path alike
        rates["torchvision"].append(run_torchvision(Path(args.data), args.size, *common, r))
        rates["deepimage fp32"].append(run_deepimage(store, args.size, *common, r, fp32))
        rates["deepimage auto"].append(run_deepimage(store, args.size, *common, r, auto))
        rates["compute limit"].append(
            run_limit(args.crop, len(store.classes), args.batch, args.steps, auto)
        )
    labels = {
        "torchvision": "torchvision ImageFolder+v2+DataLoader, fp32",
        "deepimage fp32": "deepimage store + keyed crop/flip, fp32",
        "deepimage auto": f"deepimage store + keyed crop/flip, auto ({auto.precision})",
        "compute limit": f"compute limit, tensors in memory ({auto.precision})",
    }
    for p in paths:
        print(f"{labels[p]:<50}: {spread(rates[p])} images/s")
    for label, a, b in (
        ("data path    (deepimage fp32 / torchvision)", "deepimage fp32", "torchvision"),
        ("precision    (deepimage auto / deepimage fp32)", "deepimage auto", "deepimage fp32"),
        ("end to end   (deepimage auto / torchvision)", "deepimage auto", "torchvision"),
        ("of the limit (deepimage auto / compute limit)", "deepimage auto", "compute limit"),
    ):
        print(f"{label:<47}: {ratio(rates, a, b)}")
    epoch_s = len(store) / statistics.median(rates["deepimage auto"])
    print(
        f"one epoch of {len(store)} images: {epoch_s:.0f} s "
        f"(after a one-off prepare of {prepare_s:.0f} s)"
    )
    med = {p: statistics.median(v) for p, v in rates.items()}
    print(json.dumps({
        "images_per_s": {p: round(v, 1) for p, v in med.items()},
        "vs_torchvision": round(med["deepimage auto"] / med["torchvision"], 3),
        "of_limit": round(med["deepimage auto"] / med["compute limit"], 3),
        "precision": auto.precision,
        "prepare_s": round(prepare_s, 1),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
