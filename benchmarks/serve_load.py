"""Load test of ``deepimage serve``: micro-batched against one-by-one, PyTorch against ONNX.

Each configuration starts a real server process on loopback, and N concurrent clients
(bounded in count and in time) send a seeded mix of about 80% real photos from
``../shared/datasets/imagenet-sample`` and 20% bad inputs (truncated, non-image, oversized,
decompression bomb, empty). Every good answer's top-1 class is checked against ``predict``
(the same backend's :class:`~deepimage.serve.predict.Predictor` in this process); every bad
input must get its 4xx. The table gives requests/s, p50/p99 latency, the status counts,
5xx and wrong answers, the mean batch the server formed and whether it was alive at the
end; then the ratios batched / one-by-one and ONNX / PyTorch (medians over repeats).

The model (the defaults are the README's table: ResNet-18, 500 classes, size 128, crop 112,
16 clients, 8 s, 3 repeats) has the sample's 500 classes, one per photo, and its last layer
fitted to the photos in closed form (ridge regression on its features), so it answers
each photo with a class of its own: a request given another request's answer, or a photo
preprocessed differently from ``predict``, shows as a wrong answer. ``--run`` serves a
trained run instead; either way the run stops if fewer than 90% of the photos in the mix
get distinct answers, since the correctness check would then be blind.

    python benchmarks/serve_load.py [--clients 16] [--duration 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import torch

from deepimage.bench.report import header, spread
from deepimage.inference import logits_for
from deepimage.models import get_model
from deepimage.runs import WEIGHTS, RunMeta, save_weights
from deepimage.serve.export import export
from deepimage.serve.predict import Predictor

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "imagenet-sample"
BAD_KINDS = ("truncated", "non-image", "oversized", "bomb", "empty")
EXPECTED = {"truncated": 400, "non-image": 415, "oversized": 413, "bomb": 400, "empty": 400}


def png_bomb(side: int = 60_000) -> bytes:
    """A small PNG whose header claims ``side x side`` pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def untrained_run(folder: Path, photos: list[Path], model: str, size: int, crop: int) -> Path:
    """A run folder holding an untrained ``model`` with the sample's classes and names
    (one class per photo, named after the photo's file)."""
    classes, names = [], {}
    for p in photos:
        wnid, _, name = p.stem.partition("_")
        if wnid not in names:
            classes.append(wnid)
            names[wnid] = name.replace("_", " ")
    torch.manual_seed(0)
    net = get_model(model, num_classes=len(classes), image_size=crop)
    meta = {
        "model": model,
        "model_kwargs": {},
        "classes": classes,
        "class_names": names,
        "size": size,
        "crop": crop,
        "resize_mode": "shorter",
        "mean": list(net.mean),
        "std": list(net.std),
        "precision": "fp32",
    }
    folder.mkdir(parents=True, exist_ok=True)
    save_weights(folder / WEIGHTS, net, RunMeta.from_dict(meta, folder))
    return folder


def fitted_run(folder: Path, photos: list[Path], model: str, size: int, crop: int) -> Path:
    """:func:`untrained_run` with the last linear layer fitted so that every photo's top-1 is
    its own class: ridge regression of one-hot targets on the features the served
    preprocessing gives (the trunk stays as initialised)."""
    from deepimage.runs import load_model

    run = untrained_run(folder, photos, model, size, crop)
    predictor = Predictor.load(run, device="cpu", backend="torch")
    net, meta = load_model(run)
    net.eval()
    last = [m for m in net.modules() if isinstance(m, torch.nn.Linear)][-1]
    seen: list[torch.Tensor] = []
    hook = last.register_forward_hook(lambda _m, args, _out: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            for i in range(0, len(photos), 32):
                views = [predictor.load_image(p.read_bytes()) for p in photos[i : i + 32]]
                images = predictor.stack(views)[0]
                x = torch.from_numpy(np.ascontiguousarray(images))
                logits_for(net, x, meta.preprocess, torch.device("cpu"))
    finally:
        hook.remove()
    feats = torch.cat(seen).flatten(1).double()
    labels = [meta.classes.index(p.stem.partition("_")[0]) for p in photos]
    target = -torch.ones(len(photos), meta.num_classes, dtype=torch.float64)
    target[torch.arange(len(photos)), torch.tensor(labels)] = 1.0
    mu = feats.mean(0)
    f = feats - mu
    gram = f @ f.T + 1e-3 * f.pow(2).sum(1).mean() * torch.eye(len(f), dtype=f.dtype)
    w = (f.T @ torch.linalg.solve(gram, target)).T
    w = w * (8.0 / (f @ w.T).std())  # logits a few units apart
    with torch.no_grad():
        last.weight.copy_(w.float())
        last.bias.copy_(-(w @ mu).float())
    save_weights(run / WEIGHTS, net, meta)
    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(source: Path, backend: str, max_batch: int, args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "deepimage", "serve", str(source), "--port", str(port),
           "--backend", backend, "--max-batch", str(max_batch), "--max-wait-ms",
           str(args.max_wait_ms), "--max-body-mb", str(args.max_body_mb), "--log-level",
           "warning"]  # fmt: skip
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start")


async def load(url: str, items: list[tuple[str, bytes, str | None]], args) -> dict:
    """``args.clients`` clients send ``items`` round-robin until the time or count runs out."""
    latencies: list[float] = []
    statuses: Counter = Counter()
    wrong = mismatched = 0
    sent = 0
    deadline = time.monotonic() + args.duration
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)

    async def client(c: int, http: httpx.AsyncClient) -> None:
        nonlocal sent, wrong, mismatched
        i = c
        while time.monotonic() < deadline and sent < args.max_requests:
            kind, body, expected = items[i % len(items)]
            i += args.clients
            sent += 1
            start = time.perf_counter()
            try:
                r = await http.post(f"{url}/predict?topk=5", content=body)
            except httpx.TransportError as err:
                statuses[f"error {type(err).__name__}"] += 1
                continue
            latencies.append(time.perf_counter() - start)
            statuses[r.status_code] += 1
            if kind == "photo":
                if r.status_code != 200 or r.json()["top"][0]["class_id"] != expected:
                    wrong += 1
            elif r.status_code != EXPECTED[kind]:
                mismatched += 1

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        await asyncio.gather(*(client(c, http) for c in range(args.clients)))
    elapsed = time.perf_counter() - start
    lat = np.array(latencies) * 1000
    return {
        "requests": sum(statuses.values()),
        "rps": sum(statuses.values()) / elapsed,
        "p50": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
        "p99": float(np.percentile(lat, 99)) if len(lat) else float("nan"),
        "statuses": statuses,
        "wrong": wrong,
        "bad_status_mismatch": mismatched,
    }


def run_config(source, backend, max_batch, items, args) -> dict:
    proc, url = start_server(source, backend, max_batch, args)
    try:
        for _kind, body, _ in items[: 2 * args.clients]:  # warm-up
            httpx.post(f"{url}/predict", content=body, timeout=60)
        before = httpx.get(f"{url}/health").json()
        result = asyncio.run(load(url, items, args))
        health = httpx.get(f"{url}/health", timeout=10).json()
        result["alive"] = proc.poll() is None and health["status"] == "ok"
        forwards = health["forwards"] - before["forwards"]
        images = health["images"] - before["images"]
        result["mean_batch"] = images / forwards if forwards else 0.0
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return result


def mix(photos: list[bytes], answers: list[str], max_body: int, seed: int) -> list:
    """A seeded sequence: ~80% photos (with their expected top-1), ~20% bad inputs."""
    rng = random.Random(seed)
    bad = {
        "truncated": photos[0][: len(photos[0]) // 3],
        "non-image": b"this is a text file, not a picture\n" * 40,
        "oversized": os.urandom(max_body + 1024),
        "bomb": png_bomb(),
        "empty": b"",
    }
    items = []
    for i in range(2000):
        if rng.random() < 0.8:
            j = rng.randrange(len(photos))
            items.append(("photo", photos[j], answers[j]))
        else:
            kind = BAD_KINDS[i % len(BAD_KINDS)]
            items.append((kind, bad[kind], None))
    return items


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per configuration")
    parser.add_argument("--max-requests", type=int, default=5000, help="per configuration")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved; medians reported")
    parser.add_argument("--photos", type=int, default=100, help="distinct photos in the mix")
    parser.add_argument(
        "--run", default=None, help="a trained run (default: a model fitted to the photos)"
    )
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--crop", type=int, default=112)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--max-body-mb", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=None, help="server intra-op threads")
    parser.add_argument("--backends", nargs="+", default=["torch", "onnx"])
    args = parser.parse_args()
    if not SAMPLE.is_dir():
        print(f"skipped: {SAMPLE} not found (the real photos this load test sends)")
        return 0
    header("serve load test: micro-batched vs one-by-one, PyTorch vs ONNX")
    import fastapi
    import onnxruntime
    import uvicorn

    print(f"serving : fastapi {fastapi.__version__}, uvicorn {uvicorn.__version__}, "
          f"onnxruntime {onnxruntime.__version__}, httpx {httpx.__version__}")  # fmt: skip
    paths = sorted(SAMPLE.glob("*.JPEG"))[: args.photos]
    photos = [p.read_bytes() for p in paths]
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(args.run) if args.run else fitted_run(
            Path(tmp) / "run", sorted(SAMPLE.glob("*.JPEG")), args.model, args.size, args.crop
        )  # fmt: skip
        sources = {"torch": run}
        if "onnx" in args.backends:
            report = export(run, "onnx", Path(tmp) / "model.onnx", samples=[str(SAMPLE)])
            print(f"onnx export parity: max |logit diff| {report['max_abs_diff']:.3g} "
                  f"on {report['samples']}")  # fmt: skip
            sources["onnx"] = Path(tmp) / "model.onnx"
        max_body = int(args.max_body_mb * 1024 * 1024)
        items = {}
        for backend in args.backends:
            predictor = Predictor.load(sources[backend], device="cpu", backend=backend)
            answers = []
            for data in photos:  # what `predict` answers, one image at a time
                probs = predictor.probabilities(predictor.stack([predictor.load_image(data)]))
                answers.append(predictor.top(probs[0], 1)[0]["class_id"])
            distinct = len(set(answers))
            print(f"{backend}: {distinct} distinct answers over {len(photos)} photos")
            if distinct < 0.9 * len(photos):
                print("too few distinct answers for the correctness check to mean anything")
                return 1
            items[backend] = mix(photos, answers, max_body, seed=0)
        modes = (("micro-batched", args.max_batch), ("one-by-one", 1))
        configs = [(backend, label, batch) for backend in args.backends for label, batch in modes]
        results: dict[tuple, list] = {c: [] for c in configs}
        for _ in range(args.repeats):  # interleaved, so drift on a shared machine hits all alike
            for backend, label, max_batch in configs:
                result = run_config(sources[backend], backend, max_batch, items[backend], args)
                results[(backend, label, max_batch)].append(result)
        rows = [(*c, results[c]) for c in configs]
        print()
        print(f"{args.clients} clients, {args.duration:g} s per configuration, "
              f"max wait {args.max_wait_ms:g} ms, model {args.run or args.model} "
              f"({args.size}/{args.crop}), repeats {args.repeats} (medians)")  # fmt: skip
        cols = f"{'backend':<7} {'batching':<16} {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8} "
        print(cols + f"{'batch':>6} {'5xx':>4} {'wrong':>5} {'alive':>5}  statuses")
        rps = {}
        ok = True
        for backend, label, max_batch, runs in rows:

            def med(key: str, runs: list = runs) -> float:
                return statistics.median(r[key] for r in runs)

            statuses = sum((r["statuses"] for r in runs), Counter())
            five = sum(v for k, v in statuses.items() if isinstance(k, int) and k >= 500)
            five += sum(v for k, v in statuses.items() if not isinstance(k, int))
            wrong = sum(r["wrong"] + r["bad_status_mismatch"] for r in runs)
            alive = all(r["alive"] for r in runs)
            ok = ok and five == 0 and wrong == 0 and alive
            rps[(backend, label)] = [r["rps"] for r in runs]
            shown = " ".join(f"{k}:{v}" for k, v in sorted(statuses.items(), key=str))
            print(f"{backend:<7} {f'{label} ({max_batch})':<16} {med('rps'):>7.1f} "
                  f"{med('p50'):>8.1f} {med('p99'):>8.1f} {med('mean_batch'):>6.2f} "
                  f"{five:>4} {wrong:>5} {'yes' if alive else 'NO':>5}  {shown}")  # fmt: skip
        print()
        for backend in args.backends:
            b, o = rps[(backend, "micro-batched")], rps[(backend, "one-by-one")]
            print(f"{backend}: micro-batched / one-by-one requests/s = "
                  f"{statistics.median(b) / statistics.median(o):.2f}x "
                  f"(batched {spread(b)}, one-by-one {spread(o)})")  # fmt: skip
        if {"torch", "onnx"} <= set(args.backends):
            for label in ("micro-batched", "one-by-one"):
                t, o = rps[("torch", label)], rps[("onnx", label)]
                print(f"{label}: onnx / torch requests/s = "
                      f"{statistics.median(o) / statistics.median(t):.2f}x")  # fmt: skip
        print("zero 5xx, zero wrong answers, server alive: " + ("yes" if ok else "NO"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
