"""The ``deepimage bench`` command: each benchmark registers a parser and a runner here."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path


def _bench_augment(args: argparse.Namespace) -> int:
    from deepimage.bench.augment import run

    print(json.dumps(run(args.data, args.size, args.crop, args.repeats, args.limit)))
    return 0


def _bench_scaling(args: argparse.Namespace) -> int:
    from deepimage.bench.report import write_json
    from deepimage.bench.scaling import bench_scaling, plot_scaling, print_scaling, spec_with

    out = Path(args.out)
    spec = spec_with(model=args.model, width=args.width, image_size=args.image_size,
                     batch_per_rank=args.batch_per_rank, steps=args.steps,
                     repeats=args.repeats)  # fmt: skip
    result = bench_scaling(args.procs, args.sync, spec, out)
    print_scaling(result)
    write_json(result, out / "scaling.json")
    plot_scaling(result, out / "scaling.png")
    print(f"table and plot: {out / 'scaling.json'}, {out / 'scaling.png'}")
    return 0


def _bench_simulate(args: argparse.Namespace) -> int:
    from deepimage.parallel.perf_model import print_simulation, simulate

    measured = json.loads(Path(args.measured).read_text()) if args.measured else None
    print_simulation(simulate(measured))
    return 0


def _bench_hybrid(args: argparse.Namespace) -> int:
    from deepimage.bench.hybrid import bench_hybrid, print_hybrid, spec_with
    from deepimage.bench.report import write_json

    out = Path(args.out)
    spec = spec_with(model=args.model, width=args.width, image_size=args.image_size,
                     batch_per_rank=args.batch_per_rank, steps=args.steps,
                     warmup=args.warmup, rounds=args.rounds, classes=args.classes)  # fmt: skip
    result = bench_hybrid(args.procs, spec, out)
    print_hybrid(result)
    write_json(result, out / "hybrid.json")
    print(f"table: {out / 'hybrid.json'}")
    return 0


def _bench_loader(args: argparse.Namespace) -> int:
    from deepimage.bench.loader import main

    return main(args)


BENCHES: dict[str, Callable[[argparse.Namespace], int]] = {
    "augment": _bench_augment,
    "loader": _bench_loader,
    "scaling": _bench_scaling,
    "simulate": _bench_simulate,
    "hybrid": _bench_hybrid,
}


def _add_augment(bench: argparse._SubParsersAction) -> None:
    p = bench.add_parser("augment", help="augmentation images/s against albumentations")
    p.add_argument("--data", required=True, help="folder of photos")
    p.add_argument("--size", type=int, default=256, help="S (default 256)")
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--limit", type=int, default=None, help="use the first N photos")


def _add_loader(bench: argparse._SubParsersAction) -> None:
    p = bench.add_parser("loader", help="input pipeline batches/s against albumentations")
    p.add_argument("--data", required=True, help="prepared store folder")
    p.add_argument("--size", type=int, required=True, help="S, a size of the store")
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--augment", default="deepimage", help="preset (default deepimage)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--images", type=int, default=2000, help="at least this many per pass")
    p.add_argument("--no-peer", dest="peer", action="store_false", help="skip albumentations")


def _add_parallel_benches(bench: argparse._SubParsersAction) -> None:
    from deepimage.parallel.registry import SYNCS

    p = bench.add_parser("scaling", help="data-parallel step time, sync time and bytes vs N")
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--sync", nargs="+", choices=list(SYNCS), default=list(SYNCS))
    p.add_argument("--model", default=None, help="default vgg16_deepimage")
    p.add_argument("--width", type=float, default=None, help="default 0.25")
    p.add_argument("--image-size", type=int, default=None, help="default 64")
    p.add_argument("--batch-per-rank", type=int, default=None, help="default 16")
    p.add_argument("--steps", type=int, default=None, help="steps per timed window (default 6)")
    p.add_argument("--repeats", type=int, default=None, help="timed windows (default 3)")
    p.add_argument("--out", default="bench-scaling", help="folder for the JSON and PNG")
    p = bench.add_parser("hybrid", help="hybrid vs data parallel: step time, memory, bytes")
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--model", default=None, help="default vgg16_deepimage")
    p.add_argument("--width", type=float, default=None, help="default 0.25")
    p.add_argument("--image-size", type=int, default=None, help="default 96")
    p.add_argument("--batch-per-rank", type=int, default=None, help="default 16")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default 2)")
    p.add_argument("--classes", type=int, default=None, help="default 100")
    p.add_argument("--rounds", type=int, default=None, help="alternating repeats (default 3)")
    p.add_argument("--out", default="bench-hybrid", help="folder for the JSON")
    p = bench.add_parser("simulate", help="scaling model calibrated on the paper's Minwa")
    p.add_argument("--measured", default=None, help="scaling.json of `bench scaling` to check")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``bench`` and its sub-commands on the top-level sub-command parser."""
    p = sub.add_parser("bench", help="benchmarks (see also benchmarks/)")
    bench = p.add_subparsers(dest="bench", required=True, metavar="BENCH")
    _add_augment(bench)
    _add_loader(bench)
    _add_parallel_benches(bench)


def run(args: argparse.Namespace) -> int:
    return BENCHES[args.bench](args)
