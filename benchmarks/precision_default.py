"""``deepimage train`` with its default precision against each precision forced by flag.

The default (``precision: auto``) must be as fast as the fastest correct choice on every
kind of CPU: as ``--precision fp32`` where the CPU has no native bf16, as ``--precision bf16``
where it has. This runs the real command line, interleaved, on the same data and settings,
and reports the wall time of each run (start-up, store check and the precision probe
included) and the training images/s of its steps, median and spread over repeats.

To see the path of a CPU without native bf16 on one that has it, restrict oneDNN and ATen
to AVX2 (bf16 is then emulated, as on such a CPU): ``ONEDNN_MAX_CPU_ISA=AVX2
ATEN_CPU_CAPABILITY=avx2 python benchmarks/precision_default.py``.

    python benchmarks/precision_default.py [--data ../shared/datasets/cifar10/train]
        [--size 32 --crop 32 --batch-size 128 --steps 12 --repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from deepimage.bench.report import header, spread

VARIANTS = {
    "default (auto)": [],
    "--precision fp32": ["--precision", "fp32"],
    "--precision bf16": ["--precision", "bf16"],
}


def run_once(args: argparse.Namespace, extra: list[str], out: Path, cache: str) -> dict:
    cmd = [
        sys.executable, "-m", "deepimage", "-q", "train", "--data", args.data,
        "--val-split", "0.01", "--model", args.model, "--size", str(args.size),
        "--crop", str(args.crop), "--batch-size", str(args.batch_size),
        "--max-steps", str(args.steps), "--augment", "crop_flip", "--workers", "2",
        "--checkpoint-every", "0", "--cache-dir", cache, "--out", str(out),
        "--no-progress", "--no-tensorboard", *extra,
    ]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    summary = json.loads((out / "summary.json").read_text())
    return {"wall_s": wall, "images_per_s": row["images_per_s"], "execution": summary["execution"]}


def main() -> None:
    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(here.parent.parent / "shared/datasets/cifar10/train"))
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--crop", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    header("deepimage train: default precision vs each precision forced by flag")
    print(f"data    : {args.data}, {args.model}, size {args.size}, crop {args.crop}, "
          f"batch {args.batch_size}, {args.steps} steps, crop + flip")  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="deepimage-precision-"))
    cache = str(work / "cache")
    run_once(args, ["--precision", "fp32", "--max-steps", "1"], work / "warm", cache)  # store
    results: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    for r in range(args.repeats):  # interleaved: load drifts hit every variant alike
        for i, (name, extra) in enumerate(VARIANTS.items()):
            results[name].append(run_once(args, extra, work / f"r{r}-{i}", cache))
    print(f"default resolves to: {results['default (auto)'][0]['execution']}")
    for name, runs in results.items():
        walls = [x["wall_s"] for x in runs]
        rates = [x["images_per_s"] for x in runs]
        print(f"{name:<17}: wall {spread(walls)} s   train {spread(rates)} images/s")
    base = {n: statistics.median(x["images_per_s"] for x in v) for n, v in results.items()}
    for name in ("--precision fp32", "--precision bf16"):
        print(f"default / {name:<17}: {base['default (auto)'] / base[name]:.2f}x images/s")
    print(json.dumps({n: round(v, 1) for n, v in base.items()}))


if __name__ == "__main__":
    main()
