"""End-to-end training images/s on CIFAR-10 from disk, data loading included.

deepimage: the JPEG folder is decoded once into a prepared uint8 store (timed separately,
a one-off cost), then every step reads a batch from the memory-mapped store in loader
workers, crops and flips it with keyed per-image parameters and trains with bf16 autocast
and channels_last: the path ``deepimage train`` runs.

Peer: torchvision's reference recipe, ``ImageFolder`` + ``transforms.v2`` (RandomCrop,
RandomHorizontalFlip, ToImage, ToDtype, Normalize) + ``DataLoader(num_workers=2)``, fp32
eager. Same model, same crop size, same batch, same optimizer. Both run interleaved in one
process; the ratio of median images/s is printed.

    python benchmarks/train_e2e.py [--model resnet18 --width 0.25] [--steps 60]
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
from deepimage.data.loader import iterate_batches, train_batches
from deepimage.data.store import store_for
from deepimage.models import get_model
from deepimage.train.step import forward_backward

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


MODEL = {"name": "resnet18", "width": 1.0}


def make_model(crop: int, classes: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = get_model(MODEL["name"], classes, image_size=crop, width=MODEL["width"])
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    return model, opt


def run_torchvision(data: Path, crop: int, batch: int, steps: int, workers: int, epoch: int):
    tf = v2.Compose(
        [
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


def run_deepimage(store, size: int, crop: int, batch: int, steps: int, workers: int, epoch: int):
    model, opt = make_model(crop, len(store.classes))
    model = model.to(memory_format=torch.channels_last).train()
    augment = build_train_augment(
        "crop_flip", size=size, crop=crop, seed=0, mean=MEAN, std=STD, stats=store.stats
    )
    batches = train_batches(np.arange(len(store)), batch, seed=0, epoch=epoch)[: steps + 3]
    n, start = 0, None
    for i, (images, labels, rows) in enumerate(iterate_batches(store.path, size, batches, workers)):
        if i == 3:
            start, n = time.perf_counter(), 0
        x = augment(images, rows.numpy(), epoch)
        forward_backward(model, x, labels, precision="bf16")
        opt.step()
        opt.zero_grad(set_to_none=True)
        n += len(x)
    return n / (time.perf_counter() - start)


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
    parser.add_argument("--width", type=float, default=0.25)
    args = parser.parse_args()
    MODEL.update(name=args.model, width=args.width)
    header("end-to-end training images/s on CIFAR-10: deepimage vs ImageFolder + v2 + DataLoader")
    cache = args.cache_dir or tempfile.mkdtemp(prefix="deepimage-bench-")
    start = time.perf_counter()
    store = store_for(args.data, [args.size], cache_dir=cache, progress=False)
    prepare_s = time.perf_counter() - start
    print(f"data    : {args.data} ({len(store)} images), crop {args.crop}, batch {args.batch}")
    print(f"model   : {args.model} (width {args.width})")
    print(f"prepare : {prepare_s:.1f} s once (decode into the store; reused by later runs)")
    rates: dict[str, list[float]] = {"torchvision": [], "deepimage": []}
    for r in range(args.repeats):
        rates["torchvision"].append(
            run_torchvision(Path(args.data), args.crop, args.batch, args.steps, args.workers, r)
        )
        rates["deepimage"].append(
            run_deepimage(store, args.size, args.crop, args.batch, args.steps, args.workers, r)
        )
    ratio = statistics.median(rates["deepimage"]) / statistics.median(rates["torchvision"])
    per = [d / t for d, t in zip(rates["deepimage"], rates["torchvision"])]
    print(f"torchvision ImageFolder+v2+DataLoader(fp32): {spread(rates['torchvision'])} images/s")
    print(f"deepimage store+keyed crop/flip (bf16+CL)  : {spread(rates['deepimage'])} images/s")
    print(f"ratio (median): {ratio:.2f}x  (per-repeat {min(per):.2f}-{max(per):.2f}x)")
    epoch_s = len(store) / statistics.median(rates["deepimage"])
    print(
        f"one epoch of {len(store)} images: {epoch_s:.0f} s "
        f"(after a one-off prepare of {prepare_s:.0f} s)"
    )
    print(json.dumps({"ratio": round(ratio, 3), "prepare_s": round(prepare_s, 1)}))


if __name__ == "__main__":
    main()
