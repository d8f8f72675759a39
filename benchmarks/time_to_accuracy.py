"""Time to accuracy on CIFAR-10 through deepimage's own commands, for several seeds.

For each seed it runs ``deepimage train --config configs/cifar10-94.yaml`` on a store that
``deepimage prepare`` wrote once (its time is shown apart and added to every seed's wall
time), then ``deepimage evaluate RUN --data TEST`` with no ``--tta`` flag, so the run's
recorded test-time augmentation applies. It reports the test top-1 (mean, spread), the wall
time of each seed from the first command to the final evaluation, the FLOPs counted with
``torch.utils.flop_counter`` (forward + backward per training image times the images seen,
plus every validation and test forward), the sustained GFLOP/s and its fraction of this
machine's peak, measured in the same run: a dense 2048 x 2048 fp32 matmul, and the best of
fp32 and bf16.

    python benchmarks/time_to_accuracy.py --seeds 0 1 2
        [--train ../shared/datasets/cifar10/train --test ../shared/datasets/cifar10/test]
        [--config configs/cifar10-94.yaml] [--work DIR] [-- extra train flags, e.g. --epochs 2]

The last line of output is the result as JSON.
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

import torch
from torch.utils.flop_counter import FlopCounterMode

from deepimage.bench.report import cpu_line, header, machine, versions
from deepimage.config import resolve_config

DEEPIMAGE = [sys.executable, "-m", "deepimage", "-q"]


def matmul_gflops(dtype: torch.dtype, n: int = 2048, seconds: float = 3.0) -> float:
    """Best GFLOP/s of an ``n x n`` matmul (2 n^3 FLOPs) in ``dtype`` over ``seconds`` of
    repeats (at least 5)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)  # warm-up
    best, spent, count = float("inf"), 0.0, 0
    while spent < seconds or count < 5:
        start = time.perf_counter()
        torch.mm(a, b)
        took = time.perf_counter() - start
        best, spent, count = min(best, took), spent + took, count + 1
    return 2 * n**3 / best / 1e9


def measure_peak() -> dict[str, float]:
    return {"fp32": matmul_gflops(torch.float32), "bf16": matmul_gflops(torch.bfloat16)}


def model_flops(cfg_path: str, num_classes: int = 10, batch: int = 32) -> dict[str, float]:
    """FLOPs per image of the recipe's network: a training step (forward + backward) and a
    forward pass, counted by ``torch.utils.flop_counter`` on a batch."""
    from deepimage.models import get_model

    cfg = resolve_config(cfg_path)
    model = get_model(cfg.model, num_classes, image_size=cfg.crop, width=cfg.width)
    x = torch.randn(batch, 3, cfg.crop, cfg.crop)
    labels = torch.zeros(batch, dtype=torch.long)
    with FlopCounterMode(display=False) as train_count:
        loss = torch.nn.functional.cross_entropy(model(x), labels)
        loss.backward()
    model.eval()
    with FlopCounterMode(display=False) as eval_count, torch.no_grad():
        model(x)
    return {
        "train_per_image": train_count.get_total_flops() / batch,
        "forward_per_image": eval_count.get_total_flops() / batch,
    }


def tta_views(tta: list[str]) -> int:
    """Forward passes per test image under the recorded test-time views (centre crops)."""
    crops = 3 if "shift" in tta else 1
    return crops * (2 if "flip" in tta else 1)


def run(cmd: list[str], log: Path) -> float:
    """Run a command with its output in ``log``; its wall seconds."""
    start = time.perf_counter()
    with log.open("w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({done.returncode}); see {log}")
    return time.perf_counter() - start


def main() -> None:
    here = Path(__file__).resolve().parent
    cifar = here.parent.parent / "shared/datasets/cifar10"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train", default=str(cifar / "train"))
    parser.add_argument("--test", default=str(cifar / "test"))
    parser.add_argument("--config", default=str(here.parent / "configs/cifar10-94.yaml"))
    parser.add_argument("--work", default=None, help="folder for stores and runs (default: temp)")
    parser.add_argument("--target", type=float, default=0.94, help="top-1 goal (fraction)")
    parser.add_argument("extra", nargs="*", help="flags passed on to deepimage train (after --)")
    args = parser.parse_args()
    header("time to accuracy: " + Path(args.config).name)
    work = Path(args.work or tempfile.mkdtemp(prefix="tta-"))
    work.mkdir(parents=True, exist_ok=True)

    peak = measure_peak()
    best = max(peak, key=peak.get)
    print(f"peak (2048^2 matmul): fp32 {peak['fp32']:.1f} GFLOP/s, bf16 {peak['bf16']:.1f} "
          f"GFLOP/s; best {best}")  # fmt: skip

    cfg = resolve_config(args.config)
    stores = {"train": work / "store-train", "test": work / "store-test"}
    prepare_s = 0.0
    for split, src in (("train", args.train), ("test", args.test)):
        if not (stores[split] / "manifest.json").exists():
            cmd = [*DEEPIMAGE, "prepare", src, "--sizes", str(cfg.size), "--out",
                   str(stores[split]), "--no-progress"]  # fmt: skip
            prepare_s += run(cmd, work / f"prepare-{split}.log")
    print(f"store preparation: {prepare_s:.1f} s (train and test; shared by the seeds)")

    flops = model_flops(args.config)
    results = []
    for seed in args.seeds:
        out = work / f"seed{seed}"
        train_cmd = [
            *DEEPIMAGE, "train", "--config", args.config, "--data", str(stores["train"]),
            "--val", str(stores["test"]), "--out", str(out), "--seed", str(seed),
            "--no-progress", "--no-tensorboard", *args.extra,
        ]  # fmt: skip
        train_s = run(train_cmd, work / f"train-{seed}.log")
        eval_cmd = [
            *DEEPIMAGE, "evaluate", str(out), "--data", str(stores["test"]),
            "--out", str(out / "test"), "--batch-size", "1000", "--no-progress",
        ]  # fmt: skip
        eval_s = run(eval_cmd, work / f"evaluate-{seed}.log")
        metrics = json.loads((out / "test" / "metrics.json").read_text())
        summary = json.loads((out / "summary.json").read_text())
        history = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        images_seen = summary["steps"] * resolve_config(out / "config.yaml").batch_size
        n_test = metrics["n_images"]
        total = (flops["train_per_image"] * images_seen
                 + flops["forward_per_image"] * n_test * len(history)  # per-epoch validation
                 + flops["forward_per_image"] * n_test * tta_views(metrics["tta"]))  # fmt: skip
        compute_s = train_s + eval_s
        row = {
            "seed": seed, "top1": metrics["top1"], "tta": metrics["tta"],
            "prepare_s": prepare_s, "train_s": train_s, "evaluate_s": eval_s,
            "wall_s": prepare_s + compute_s, "epochs": summary["epochs"],
            "epoch_s": [h.get("epoch_s") for h in history],
            "val_top1": [h.get("val_top1") for h in history],
            "pflop": total / 1e15, "gflops_per_s": total / compute_s / 1e9,
            "fraction_of_fp32_peak": total / compute_s / 1e9 / peak["fp32"],
            "fraction_of_best_peak": total / compute_s / 1e9 / peak[best],
            "precision": summary["execution"].get("precision"),
        }  # fmt: skip
        results.append(row)
        print(f"seed {seed}: top-1 {100 * row['top1']:.2f}%  wall {row['wall_s'] / 60:.1f} min "
              f"(prepare {prepare_s:.0f} s, train {train_s:.0f} s, evaluate {eval_s:.0f} s)  "
              f"{row['pflop']:.3f} PFLOP  {row['gflops_per_s']:.1f} GFLOP/s = "
              f"{100 * row['fraction_of_fp32_peak']:.0f}% of fp32 peak, "
              f"{100 * row['fraction_of_best_peak']:.0f}% of {best} peak (start)")  # fmt: skip

    after = measure_peak()  # again at the end: a busy machine lowers either measurement
    if any(after[k] > peak[k] for k in peak):
        peak = {k: max(peak[k], after[k]) for k in peak}
        best = max(peak, key=peak.get)
        for r in results:
            r["fraction_of_fp32_peak"] = r["gflops_per_s"] / peak["fp32"]
            r["fraction_of_best_peak"] = r["gflops_per_s"] / peak[best]
    print(f"peak at the end: fp32 {after['fp32']:.1f}, bf16 {after['bf16']:.1f} GFLOP/s; "
          f"fractions use the higher of the two measurements")  # fmt: skip
    if any(r["fraction_of_best_peak"] > 1 for r in results):
        print("warning: above the measured peak; the machine was busy during the matmuls")
    top1 = [r["top1"] for r in results]
    walls = [r["wall_s"] / 60 for r in results]
    spread = statistics.stdev(top1) if len(top1) > 1 else 0.0
    print(f"\n{'seed':>5} {'top-1':>8} {'minutes':>8} {'PFLOP':>7} {'of peak':>8}")
    for r in results:
        print(f"{r['seed']:>5} {100 * r['top1']:>7.2f}% {r['wall_s'] / 60:>8.1f} "
              f"{r['pflop']:>7.3f} {100 * r['fraction_of_best_peak']:>7.0f}%")  # fmt: skip
    print(f"mean top-1 {100 * statistics.mean(top1):.2f}% (sd {100 * spread:.2f}, min "
          f"{100 * min(top1):.2f}, max {100 * max(top1):.2f}); median wall "
          f"{statistics.median(walls):.1f} min; target {100 * args.target:.1f}%: "
          f"{'reached' if statistics.mean(top1) >= args.target else 'not reached'}")  # fmt: skip
    print(json.dumps({
        "config": args.config, "machine": machine(), "cpu": cpu_line(), "versions": versions(),
        "peak_gflops": peak, "flops_per_image": flops, "prepare_s": prepare_s,
        "top1_mean": statistics.mean(top1), "top1_sd": spread, "runs": results,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
