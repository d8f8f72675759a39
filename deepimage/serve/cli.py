"""Sub-commands ``predict``, ``serve`` and ``export``: their parsers and runners.

The shape of every command module is described in :mod:`deepimage.cli`.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import yaml


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``predict``, ``serve`` and ``export`` on the top-level sub-parsers."""
    for add in (_add_predict, _add_serve, _add_export):
        add(sub)


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="top-k classes of images, or of a whole folder")
    p.add_argument("source", help="run folder, weights file, ensemble manifest or .onnx file")
    p.add_argument("images", nargs="*", help="image files")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--json", action="store_true", help="one JSON object per image")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default=None,
                   help="default auto: the fastest correct precision for the device")  # fmt: skip
    p.add_argument("--folder", default=None, help="score every file under this folder")
    p.add_argument("--out", default=None, help="with --folder: preds.csv or preds.jsonl")
    p.add_argument("--resume", action="store_true", help="with --folder: skip scored files")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=None, help="decoding threads")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="HTTP service with a web page (FastAPI + uvicorn)")
    p.add_argument("source", help="run folder, weights file, ensemble manifest or .onnx file")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--backend", choices=["auto", "torch", "onnx"], default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default=None,
                   help="default auto: the fastest correct precision for the device")  # fmt: skip
    p.add_argument("--max-batch", type=int, default=16, help="images per forward pass")
    p.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="longest wait for a batch to fill (ms)")  # fmt: skip
    p.add_argument("--max-body-mb", type=float, default=10.0, help="largest request body")
    p.add_argument("--max-pixels", type=int, default=40_000_000, help="larger is a bomb")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads")
    p.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])  # fmt: skip


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export to ONNX or TorchScript with a parity check")
    p.add_argument("source", help="run folder or weights file")
    p.add_argument("--format", dest="fmt", choices=["onnx", "torchscript"], default="onnx")
    p.add_argument("--out", required=True, help="output file (.onnx, .pt)")
    p.add_argument("--samples", nargs="+", default=None,
                   help="images or folders for the parity check (default: run's data)")  # fmt: skip


def _default_samples(source: str, count: int = 8) -> list[str] | None:
    """Up to ``count`` photos spread over the run's validation or training data, if it still
    exists (a folder, a CSV manifest or a prepared store)."""
    from deepimage.data.index import DataError, load_index
    from deepimage.data.store import Store

    config = Path(source) / "config.yaml"
    if not config.is_file():
        return None
    try:
        cfg = yaml.safe_load(config.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None
    for key in ("val", "data"):
        value = cfg.get(key)
        if not isinstance(value, str) or not Path(value).exists():
            continue
        try:
            if (Path(value) / "manifest.json").is_file():
                paths = list(Store.open(value).paths)
            else:
                paths = [sample.path for sample in load_index(value).samples]
        except (DataError, OSError, ValueError):
            continue
        spread = [p for p in paths[:: max(1, len(paths) // count)] if Path(p).is_file()]
        if spread:
            return spread[:count]
    return None


def run_predict(args: argparse.Namespace) -> int:
    from deepimage.serve.predict import Predictor, format_prediction

    if args.folder is None and not args.images:
        raise ValueError("predict: give image files, or --folder DIR --out FILE")
    if args.folder is not None and args.out is None:
        raise ValueError("predict: --folder needs --out preds.csv or preds.jsonl")
    if args.topk < 1:
        raise ValueError(f"--topk must be positive, got {args.topk}")
    predictor = Predictor.load(args.source, device=args.device, precision=args.precision)
    status = 0
    if args.images:
        results = predictor.predict_files(args.images, topk=args.topk)
        for result in results:
            print(json.dumps(result) if args.json else format_prediction(result))
        status = 1 if any("error" in r for r in results) else 0
    if args.folder is not None:
        from deepimage.serve.batch import score_folder

        counts = score_folder(
            predictor,
            args.folder,
            args.out,
            topk=args.topk,
            batch_size=args.batch_size,
            workers=args.workers,
            resume=args.resume,
            progress=args.progress,
        )
        print(
            f"{args.out}: {counts['scored']} scored, {counts['errors']} unreadable, "
            f"{counts['skipped']} already scored"
        )
    return status


def _need(extra: str, *modules: str) -> None:
    """A one-line error naming the pip extra when an optional dependency is missing."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"{', '.join(missing)} not installed: pip install 'deepimage[{extra}]'")


def run_serve(args: argparse.Namespace) -> int:
    _need("serve", "fastapi", "uvicorn")
    if args.backend == "onnx" or args.source.endswith(".onnx"):
        _need("export", "onnxruntime")
    import torch
    import uvicorn

    from deepimage.serve.app import create_app
    from deepimage.serve.predict import Predictor

    if args.threads:
        torch.set_num_threads(args.threads)
    predictor = Predictor.load(
        args.source,
        device=args.device,
        backend=args.backend,
        max_pixels=args.max_pixels,
        threads=args.threads,
        precision=args.precision,
    )
    app = create_app(
        predictor,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_body=int(args.max_body_mb * 1024 * 1024),
    )
    print(
        f"serving {predictor.name} ({predictor.backend}) on http://{args.host}:{args.port}/ "
        f"(API docs at /docs)",
        flush=True,
    )
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=30,
    )
    server = uvicorn.Server(config)
    server.run()  # SIGTERM/SIGINT: stop accepting, finish in-flight requests, then exit
    return 0 if server.started else 2


def run_export(args: argparse.Namespace) -> int:
    if args.fmt == "onnx":
        _need("export", "onnx", "onnxruntime", "onnxscript")
    from deepimage.serve.export import export

    samples = args.samples or _default_samples(args.source)
    report = export(args.source, args.fmt, args.out, samples=samples)
    print(
        f"exported {report['format']} to {report['path']}: parity max |logit diff| "
        f"{report['max_abs_diff']:.3g} < {report['tolerance']:g} on {report['samples']} "
        f"(batch sizes {', '.join(map(str, report['batch_sizes']))})"
    )
    return 0


RUNNERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "predict": run_predict,
    "serve": run_serve,
    "export": run_export,
}
"""Command name -> runner: parsed flags in, exit status out."""
