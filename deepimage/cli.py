"""The ``deepimage`` command line: parses flags, builds typed config, calls the library.

Sub-commands: demo, prepare, verify, train, finetune, evaluate, models, bench here; predict, serve
and export in :mod:`deepimage.serve.cli`; augment in :mod:`deepimage.augment.cli`. The three
command modules share one shape:

* one parser function per sub-command, registered on the top-level sub-parsers by
  ``add_parsers(sub)`` (``add_parser`` where a module has a single command);
* one runner per sub-command, ``run_<name>(args) -> int``: flags in, typed config or keyword
  arguments to the library, results printed, the exit status out;
* ``RUNNERS``, the sub-command names mapped to their runners.

This module adds :func:`main`: logging, dispatch, and errors a user can fix (bad flags,
config keys, data paths, checkpoints) as one line on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from deepimage import __version__
from deepimage.augment import cli as augment_cli
from deepimage.bench import cli as bench_cli
from deepimage.config import ConfigError, TrainConfig
from deepimage.precision import PRECISIONS
from deepimage.serve import cli as serve_cli

S = argparse.SUPPRESS


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    """Flags that override config keys; unset flags leave the config file's values alone."""
    from deepimage.augment.pipeline import PRESETS
    from deepimage.parallel.build import PARALLELS
    from deepimage.parallel.optim import OPTIMIZERS
    from deepimage.parallel.registry import SYNCS

    p.add_argument("--config", help="YAML file of config keys (flags override it)")
    p.add_argument("--data", default=S, help="ImageFolder directory, CSV manifest or store")
    p.add_argument("--val", default=S, help="validation data (default: a split of --data)")
    p.add_argument("--val-split", type=float, default=S, help="fraction held out (default 0.1)")
    p.add_argument("--class-names", default=S, help="file of '<id> <readable name>' lines")
    p.add_argument("--model", default=S, help="model name (see `deepimage models`)")
    p.add_argument("--width", type=float, default=S, help="channel multiplier (VGG, AlexNet)")
    p.add_argument("--size", type=int, default=S, help="source resolution S (default 256)")
    p.add_argument("--sizes", type=int, nargs="+", default=None,
                   help="one model per source size in OUT/s<size>; OUT/ensemble.json")  # fmt: skip
    p.add_argument("--crop", type=int, default=S, help="crop / input size (default 224)")
    p.add_argument("--resize-mode", choices=["stretch", "shorter"], default=S)
    p.add_argument("--augment", choices=list(PRESETS), default=S)
    p.add_argument("--epochs", type=int, default=S)
    p.add_argument("--max-steps", type=int, default=S, help="stop after N optimizer steps")
    p.add_argument("--batch-size", type=int, default=S, help="images per optimizer step")
    p.add_argument("--accum-steps", type=int, default=S, help="micro-batches per step")
    p.add_argument("--lr", type=float, default=S, help="learning rate (default 0.01)")
    p.add_argument("--lr-scaling", choices=["none", "linear"], default=S)
    p.add_argument("--optimizer", choices=list(OPTIMIZERS), default=S)
    p.add_argument("--momentum", type=float, default=S)
    p.add_argument("--weight-decay", type=float, default=S)
    p.add_argument("--schedule", choices=["plateau", "step", "exp", "constant", "linear"],
                   default=S)  # fmt: skip
    p.add_argument("--gamma", type=float, default=S)
    p.add_argument("--milestones", type=int, nargs="+", default=S)
    p.add_argument("--patience", type=int, default=S)
    p.add_argument("--warmup-epochs", type=float, default=S)
    p.add_argument("--label-smoothing", type=float, default=S)
    p.add_argument("--precision", choices=["auto", *PRECISIONS], default=S,
                   help="auto (default): bf16 only where the hardware runs it fast")  # fmt: skip
    p.add_argument("--channels-last", dest="channels_last", action="store_true", default=S,
                   help="NHWC layout (default auto: with bf16/fp16 and on CUDA)")  # fmt: skip
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false", default=S)
    p.add_argument("--device", default=S)
    p.add_argument("--seed", type=int, default=S)
    p.add_argument("--workers", type=int, default=S)
    p.add_argument("--sync", choices=list(SYNCS), default=S,
                   help="gradient sync across torchrun processes (default ddp)")  # fmt: skip
    p.add_argument("--parallel", choices=list(PARALLELS), default=S,
                   help="hybrid: FC layers split across processes (default data)")  # fmt: skip
    p.add_argument("--sync-bn", action="store_true", default=S, help="synchronised batch norm")
    p.add_argument("--bucket-mb", type=float, default=S, help="gradient bucket size (MiB)")
    p.add_argument("--dist-timeout", type=float, default=S, help="collective timeout (s)")
    p.add_argument("--checkpoint-every", type=int, default=S, help="steps between checkpoints")
    p.add_argument("--cache-dir", default=S, help="where folders are prepared into stores")
    p.add_argument(
        "--device-cache-mb", type=float, default=S, help="hold training images on the device"
    )
    p.add_argument("--no-progress", dest="progress", action="store_false", default=S)
    p.add_argument("--no-tensorboard", dest="tensorboard", action="store_false", default=S)
    p.add_argument("--out", default=S, help="run folder")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly")


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the main job end to end on a built-in synthetic data set")
    p.add_argument("--out", default="runs/demo", help="run folder (default runs/demo)")
    p.add_argument("--epochs", type=int, default=None, help="override the demo's epochs")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="decode once into a multi-scale, sharded store")
    p.add_argument("data", nargs="?", default=None,
                   help="image folder, CSV or tar shards ('a-{00..09}.tar')")  # fmt: skip
    p.add_argument("--data", dest="data_flag", default=None, help="the same as DATA")
    p.add_argument("--sizes", type=int, nargs="+", required=True)
    p.add_argument("--out", required=True, help="store folder")
    p.add_argument("--encoding", choices=["auto", "raw", "jpeg"], default="auto",
                   help="auto (default): raw if it fits a quarter of RAM, else jpeg")  # fmt: skip
    p.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90)")
    p.add_argument("--shard-mb", type=float, default=1024, help="shard size bound (MiB)")
    p.add_argument("--resize-mode", choices=["stretch", "shorter"], default="stretch")
    p.add_argument("--workers", type=int, default=None, help="decoding processes (default all)")
    p.add_argument("--max-pixels", type=int, default=None)
    p.add_argument("--class-names", default=None)
    p.add_argument("--no-progress", dest="progress", action="store_false")


def _add_verify(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="check every shard of a store against its SHA-256")
    p.add_argument("store", help="store folder")


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a classifier")
    _add_train_flags(p)


def _add_finetune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="fine-tune a trained model on new data (paper 5.3)")
    _add_train_flags(p)
    p.add_argument("--from", dest="init_from", default=S, help="run or weights to start from")
    p.add_argument("--trainable", default=S, help="all, head or last:K (default all)")


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="top-1/top-5, per-class accuracy and confusion plots")
    p.add_argument("source", nargs="+",
                   help="run folder or weights file; an ensemble.json or several runs")  # fmt: skip
    p.add_argument("--data", required=True)
    p.add_argument("--out", default=None, help="report folder")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=["auto", *PRECISIONS], default=None,
                   help="default auto: the fastest correct precision for the device")  # fmt: skip
    p.add_argument(
        "--tta", nargs="+", choices=["center", "dense", "flip", "shift"], default=None,
        help="test-time views, combined: centre crop, dense (fully convolutional), flips, "
        "shifted crops (default: the views the run recorded, else the centre crop)",
    )  # fmt: skip
    p.add_argument("--scales", type=int, nargs="+", default=None, help="multi-scale testing")
    p.add_argument("--corrupt", default=None,
                   help="cast,vignette,distortion,rotation,blur,noise or all")  # fmt: skip
    p.add_argument("--severity", default="1..5", help="corruption severities: 1..5, 3, 1,3,5")
    p.add_argument("--corrupt-seed", type=int, default=0, help="seed of the corruptions")
    p.add_argument("--cache-dir", default=None, help="where folders are prepared into stores")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def _add_models(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("models", help="list model names")


def build_parser() -> argparse.ArgumentParser:
    """The ``deepimage`` parser: each command module registers its own sub-commands."""
    parser = argparse.ArgumentParser(
        prog="deepimage", description="Train, evaluate and use image-recognition models."
    )
    parser.add_argument("--version", action="version", version=f"deepimage {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (
        _add_demo, _add_prepare, _add_verify, _add_train, _add_finetune, _add_evaluate,
        serve_cli.add_parsers,  # predict, serve, export
        _add_models, augment_cli.add_parser, bench_cli.add_parsers,
    ):  # fmt: skip
        add(sub)
    return parser


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults < saved run config (on --resume) < --config file < flags."""
    from deepimage.config import resolve_config

    flags = {k: v for k, v in vars(args).items() if k not in ("command", "config", "resume")}
    flags.pop("quiet", None)
    resumed = flags.get("out") if args.resume else None
    return resolve_config(args.config, flags, resumed=resumed)


def run_train(args: argparse.Namespace) -> int:
    from deepimage.train.loop import train
    from deepimage.train.multiscale import saved_sizes, train_multiscale

    sizes = vars(args).pop("sizes", None)
    if sizes is None and args.resume:
        sizes = saved_sizes(getattr(args, "out", None))
    if sizes:  # multi-scale training: one member run per size, then an ensemble manifest
        result = train_multiscale(train_config_from_args(args), sizes, resume=args.resume)
        if result.get("stopped"):
            return 130
        for member in result["members"]:
            _print_summary(member, member["run"])
        print(f"ensemble: {result['ensemble']}")
        return 0
    cfg = train_config_from_args(args)
    summary = train(cfg, resume=args.resume)
    if summary.get("stopped"):
        return 130
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one summary for the job
        _print_summary(summary, cfg.out)
    return 0


def _print_summary(summary: dict[str, Any], run: str | None) -> None:
    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.2f}%"

    print(
        f"trained {summary['model']} on {summary['n_train_images']} images "
        f"({len(summary['classes'])} classes), {summary['steps']} steps: "
        f"val top-1 {pct(summary['val_top1'])}, top-5 {pct(summary['val_top5'])}"
    )
    if summary["skipped"]:
        print(f"skipped {len(summary['skipped'])} unreadable files:")
        for item in summary["skipped"]:
            print(f"  {item['path']}: {item['reason']}")
    print(f"run folder: {run}")


def run_finetune(args: argparse.Namespace) -> int:
    from deepimage.train.finetune import finetune_config
    from deepimage.train.loop import train

    if getattr(args, "sizes", None):
        raise ValueError("finetune: --sizes is for train; fine-tune one member at a time")
    skip = ("command", "config", "resume", "quiet", "sizes")
    flags = {k: v for k, v in vars(args).items() if k not in skip}
    cfg = finetune_config(flags, args.config, resume=args.resume)
    summary = train(cfg, resume=args.resume)
    if summary.get("stopped"):
        return 130
    if os.environ.get("RANK", "0") == "0":
        from deepimage.models.transfer import FinetuneReport

        for line in FinetuneReport(**summary["finetune"]).lines():
            print(line)
        _print_summary(summary, cfg.out)
    return 0


def run_prepare(args: argparse.Namespace) -> int:
    from deepimage.data.decode import DEFAULT_MAX_PIXELS
    from deepimage.data.index import load_index
    from deepimage.data.prepare import prepare_store

    if (args.data is None) == (args.data_flag is None):
        raise ValueError("prepare: give the data once, as DATA or --data")
    index = load_index(args.data or args.data_flag, class_names_file=args.class_names)
    store = prepare_store(
        index,
        args.out,
        args.sizes,
        mode=args.resize_mode,
        max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS,
        workers=args.workers,
        progress=args.progress,
        encoding=args.encoding,
        quality=args.quality,
        shard_bytes=int(args.shard_mb * 2**20),
    )
    why = store.manifest.get("encoding_reason") or store.encoding
    print(f"encoding {why}")
    print(
        f"store {store.path}: {len(store)} images, {len(store.classes)} classes, "
        f"sizes {' '.join(map(str, store.sizes))}, {len(store.skipped)} skipped, "
        f"{len(store.shard_files())} shards"
    )
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from deepimage.data.store import Store

    store = Store.open(args.store)
    store.verify()
    print(f"store {store.path}: {len(store.shard_files())} shards match their SHA-256")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from deepimage.evaluate.corrupt import format_table, parse_corruptions, parse_severities
    from deepimage.evaluate.evaluate import evaluate, format_members

    corruptions = parse_corruptions(args.corrupt) if args.corrupt else None
    metrics = evaluate(
        args.source[0] if len(args.source) == 1 else args.source,
        args.data,
        args.out,
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
        precision=args.precision,
        progress=args.progress,
        tta=args.tta,
        scales=args.scales,
        corruptions=corruptions,
        severities=parse_severities(args.severity),
        corrupt_seed=args.corrupt_seed,
        cache_dir=args.cache_dir,
    )
    if "members" in metrics:
        print(format_members(metrics))
    print(
        f"top-1 {100 * metrics['top1']:.2f}%  top-5 {100 * metrics['top5']:.2f}%  "
        f"mean per-class {100 * metrics['mean_class_acc']:.2f}%  ({metrics['n_images']} images)"
    )
    if "corruptions" in metrics:
        print(format_table(metrics["corruptions"]))
    if args.out:
        print(f"report: {args.out}")
    return 0


def run_models(args: argparse.Namespace) -> int:
    from deepimage.models import list_models

    print("\n".join(list_models()))
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from deepimage import demo

    demo.run_demo(args.out, epochs=args.epochs, progress=args.progress)
    return 0


RUNNERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "demo": run_demo,
    "prepare": run_prepare,
    "verify": run_verify,
    "train": run_train,
    "finetune": run_finetune,
    "evaluate": run_evaluate,
    **serve_cli.RUNNERS,  # predict, serve, export
    "models": run_models,
    "augment": augment_cli.run,
    "bench": bench_cli.run,
}
"""Command name -> runner: parsed flags in, exit status out."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from deepimage.data.decode import DecodeError
    from deepimage.data.index import DataError
    from deepimage.runs import CheckpointError
    from deepimage.train.loop import RunExistsError

    return (ConfigError, DataError, DecodeError, CheckpointError, RunExistsError, ValueError)


def main(argv: Sequence[str] | None = None) -> int:
    from deepimage.log import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging(logging.WARNING if args.quiet else logging.INFO)
    try:
        return RUNNERS[args.command](args)
    except KeyboardInterrupt:
        print("deepimage: interrupted", file=sys.stderr)
        return 130
    except _user_errors() as err:
        if os.environ.get("DEEPIMAGE_DEBUG"):  # the full traceback, for bug reports
            raise
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"deepimage: error: {message}", file=sys.stderr)
        return 2
    except FileNotFoundError as err:
        print(f"deepimage: error: {err.filename or err}: no such file", file=sys.stderr)
        return 2
