"""End-to-end data-parallel training images/s per gradient sync, through ``deepimage train``.

For every round, and every ``--sync`` in an order that alternates between rounds, runs::

    torchrun --standalone --nproc_per_node N -m deepimage train --data DATA \\
        --model vgg16_deepimage --size 36 --crop 32 --batch-size 32 --precision fp32 \\
        --sync SYNC --epochs E --workers 0 --no-progress ...

and reads the images/s of epochs 2 to E from ``RUN/metrics.jsonl``: their images over their
summed wall time, every step whole (forward, backward, exchange, update, each epoch's last
deferred exchange included), after start-up, data preparation and the first epoch's warm-up
(the marginal rate of a long run; validation and checkpoints are outside the epochs' time).
Prints the median and range per sync and each one's ratio to ddp. ``ceiling`` runs N
independent one-process trainings at the per-rank batch at the same time (the same compute,
the same cores, no exchange): the summed images/s is the most any gradient sync could reach
on this machine. ``lazy-gloo`` is lazy update with its exchange forced through gloo's
all-reduce (``DEEPIMAGE_SHM=0``) instead of shared memory, so the gain of the transport shows
apart from the gain of the lazy schedule.

    OMP_NUM_THREADS=1 python benchmarks/train_sync.py \\
        --data ../shared/datasets/flowers12/train --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from deepimage.bench.report import header, spread


def train_args(args: argparse.Namespace, batch: int, out: Path, cache: Path) -> list[str]:
    return [
        "-m", "deepimage", "-q", "train", "--data", args.data, "--model", args.model,
        "--size", str(args.size), "--crop", str(args.crop), "--batch-size", str(batch),
        "--precision", "fp32", "--epochs", str(args.epochs), "--workers", "0", "--no-progress",
        "--no-tensorboard", "--cache-dir", str(cache), "--out", str(out),
    ]  # fmt: skip


def last_rate(out: Path) -> float:
    """Images/s over every epoch after the first."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    later = rows[1:] or rows
    images = sum(r["images_per_s"] * r["epoch_s"] for r in later)
    return images / sum(r["epoch_s"] for r in later)


def env(sync: str = "") -> dict[str, str]:
    extra = {"DEEPIMAGE_SHM": "0"} if sync.endswith("-gloo") else {}
    return {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **extra}


def run_once(args: argparse.Namespace, sync: str, out: Path, cache: Path) -> float:
    if sync == "ceiling":
        return run_ceiling(args, out, cache)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", str(args.procs)]  # fmt: skip
    cmd = launcher + train_args(args, args.batch, out, cache)[1:]
    cmd += ["--sync", sync.removesuffix("-gloo")]
    subprocess.run(cmd, check=True, env=env(sync), capture_output=True)
    return last_rate(out)


def run_ceiling(args: argparse.Namespace, out: Path, cache: Path) -> float:
    """N independent one-process runs at the per-rank batch, at the same time on the same
    cores: every rank's compute and its own SGD update, no exchange and no waiting. Their
    summed images/s is what data parallelism with replicated updates could reach here."""
    procs = [
        subprocess.Popen([sys.executable, *train_args(args, args.batch // args.procs,
                                                      out / str(r), cache)],
                         env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for r in range(args.procs)
    ]  # fmt: skip
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode:
            raise RuntimeError(f"ceiling run failed: {err.decode()[-2000:]}")
    return sum(last_rate(out / str(r)) for r in range(args.procs))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument(
        "--sync",
        nargs="+",
        default=["ddp", "butterfly", "lazy", "lazy-gloo", "ceiling"],
        help="strategies; 'ceiling' runs N independent one-process runs at once, "
        "'lazy-gloo' lazy update over gloo instead of shared memory",
    )
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--epochs", type=int, default=4, help="epochs 2 to E are measured")
    p.add_argument("--model", default="vgg16_deepimage")
    p.add_argument("--size", type=int, default=36)
    p.add_argument("--crop", type=int, default=32)
    p.add_argument("--batch", type=int, default=32, help="global batch")
    args = p.parse_args()
    header(
        f"train_sync: {args.model} crop {args.crop}, global batch {args.batch}, fp32, "
        f"{args.procs} processes on gloo, images/s of epochs 2-{args.epochs}"
    )
    results: dict[str, list[float]] = {s: [] for s in args.sync}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cache = root / "cache"
        for r in range(args.rounds):
            order = args.sync if r % 2 == 0 else list(reversed(args.sync))
            for sync in order:
                rate = run_once(args, sync, root / f"{sync}-{r}", cache)
                results[sync].append(rate)
                print(f"round {r + 1} {sync:>14}: {rate:.1f} images/s", flush=True)
    base = statistics.median(results["ddp"]) if "ddp" in results else None
    for sync, rates in results.items():
        ratio = f"  {statistics.median(rates) / base:.2f}x ddp" if base else ""
        print(f"{sync:>14}: {spread(rates)} images/s{ratio}")


if __name__ == "__main__":
    main()
