"""Preparation at scale: time and peak memory per image as the number of images grows, the
time to index 1.28 M paths, and an estimate of ImageNet-1k's store size and preparation time.

1. Writes a folder of ``--images`` small JPEGs (``--classes`` class folders of 64x48 noisy
   gradients) under ``--tmp`` and prepares subsets of it (``--subsets``, each a stratified
   ``path,label`` CSV) with :func:`~deepimage.data.prepare.prepare_store` in a child process,
   one per run, so that the child's peak RSS (``getrusage``) is that run's alone. It reports
   the time per image and the peak RSS of the preparing process: after indexing (the index),
   and its peak while preparing; the part above the index must not grow with the number of
   images, and the time per image must stay flat. Decoding workers are reported apart.
2. Creates ``--index-paths`` empty files in 1000 class folders and times ``scan_folder`` on
   them (and the source fingerprint that every ``prepare`` computes: one ``stat`` per file).
3. Prepares the 500 full-size photos of ``imagenet-sample`` at 256, at 512, and at both
   (``--workers`` processes, JPEG at quality 90) and scales the per-image time and bytes to
   ImageNet-1k's 1,281,167 training images.

Everything is written under a temporary folder in ``--tmp`` and removed at the end. The last
line printed is JSON.

    python benchmarks/prepare_scale.py [--images 200000 --subsets 12500 50000 200000]
        [--repeats 3 --workers 2 --index-paths 1281167]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

IMAGENET_TRAIN = 1_281_167
SAMPLE = Path(__file__).resolve().parents[2] / "shared/datasets/imagenet-sample"


# --------------------------------------------------------------------------- the folder


def write_jpegs(root: Path, n: int, classes: int, seed: int = 0) -> float:
    """``n`` 64x48 JPEGs (a noisy gradient, its colour set by the class) in ``classes``
    folders ``root/c0000/...``; returns the seconds it took."""
    import simplejpeg

    began = time.perf_counter()
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, 64, dtype=np.float32)[None, :, None]
    for c in range(classes):
        folder = root / f"c{c:04d}"
        folder.mkdir(parents=True)
        colour = rng.uniform(40, 215, 3).astype(np.float32)
        count = n // classes + (c < n % classes)
        for k in range(count):
            noise = rng.integers(0, 40, (48, 64, 3), dtype=np.uint8)
            img = np.clip(colour * (0.5 + ramp) + noise, 0, 255).astype(np.uint8)
            blob = simplejpeg.encode_jpeg(img, quality=90, colorspace="RGB")
            (folder / f"{k:06d}.jpg").write_bytes(blob)
    return time.perf_counter() - began


def write_subset(root: Path, n: int, classes: int, csv_path: Path) -> None:
    """A ``path,label`` CSV of the first ``n / classes`` images of each class folder."""
    per_class = n // classes
    with open(csv_path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["path", "label"])
        for c in range(classes):
            for k in range(per_class + (c < n % classes)):
                out.writerow([str(root / f"c{c:04d}" / f"{k:06d}.jpg"), f"c{c:04d}"])


# --------------------------------------------------------------------------- one preparation


def proc_status(key: str) -> int:
    """A ``/proc/self/status`` memory figure (``VmRSS``, ``VmHWM``) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def reset_peak_rss() -> None:
    """Start ``VmHWM`` again from the current RSS. A process's peak RSS (and ``ru_maxrss``)
    starts at its parent's when it is forked, so it must be reset to measure this process."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def child(args: argparse.Namespace) -> None:
    """In a fresh process: index, prepare, and print times and peak RSS as JSON."""
    from deepimage.data.index import load_index
    from deepimage.data.prepare import prepare_store

    reset_peak_rss()
    rss_start = proc_status("VmRSS")
    t0 = time.perf_counter()
    index = load_index(args.child)
    t1 = time.perf_counter()
    rss_index = proc_status("VmHWM")
    reset_peak_rss()
    store = prepare_store(
        index,
        args.out,
        args.sizes,
        workers=args.workers,
        progress=False,
        encoding=args.encoding,
        quality=90,
        shard_bytes=int(args.shard_mb * 2**20),
    )
    t2 = time.perf_counter()
    shards = store.manifest["shards"]
    result = {
        "n": len(index),
        "kept": len(store),
        "index_s": t1 - t0,
        "prepare_s": t2 - t1,
        "rss_start": rss_start,
        "rss_index": rss_index,
        "rss_peak": max(proc_status("VmHWM"), rss_index),
        "rss_workers": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
        "bytes": {s: sum(d["bytes"] for d in v) for s, v in shards.items()},
        "shards": sum(len(v) for v in shards.values()),
    }
    print(json.dumps(result))


def prepare_once(
    source: Path, out: Path, sizes: list[int], workers: int, encoding: str, shard_mb: float
) -> dict:
    """Run :func:`child` in a subprocess; remove the store afterwards."""
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--child", str(source), "--out", str(out),
        "--sizes", *map(str, sizes), "--workers", str(workers), "--encoding", encoding,
        "--shard-mb", str(shard_mb),
    ]  # fmt: skip
    began = time.perf_counter()
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - began
    shutil.rmtree(out)
    return result


# --------------------------------------------------------------------------- indexing


def index_listing(root: Path, n: int, classes: int = 1000) -> dict:
    """Time ``scan_folder`` (and the source fingerprint) on ``n`` empty ``.JPEG`` files."""
    from deepimage.data.index import scan_folder
    from deepimage.data.prepare import source_fingerprint

    began = time.perf_counter()
    for c in range(classes):
        folder = root / f"n{c:08d}"
        folder.mkdir(parents=True)
        for k in range(n // classes + (c < n % classes)):
            os.close(os.open(folder / f"n{c:08d}_{k}.JPEG", os.O_CREAT | os.O_WRONLY, 0o644))
    create_s = time.perf_counter() - began
    rss0 = proc_status("VmRSS")
    t0 = time.perf_counter()
    index = scan_folder(root)
    t1 = time.perf_counter()
    source_fingerprint(index)
    t2 = time.perf_counter()
    rss1 = proc_status("VmRSS")
    found = len(index)
    del index
    shutil.rmtree(root)
    return {
        "paths": found,
        "classes": classes,
        "create_s": create_s,
        "index_s": t1 - t0,
        "fingerprint_s": t2 - t1,
        "index_rss_growth": rss1 - rss0,
    }


# --------------------------------------------------------------------------- the report


def mib(n: float) -> str:
    return f"{n / 2**20:.0f}"


def med(values: list[float]) -> float:
    return statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200_000)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--subsets", type=int, nargs="+", default=[12_500, 50_000, 200_000])
    parser.add_argument("--repeats", type=int, default=3, help="repeats of each subset")
    parser.add_argument("--largest-repeats", type=int, default=1, help="of the largest subset")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--encoding", default="jpeg")
    parser.add_argument("--shard-mb", type=float, default=64)
    parser.add_argument("--index-paths", type=int, default=IMAGENET_TRAIN)
    parser.add_argument("--sample", default=str(SAMPLE))
    parser.add_argument("--sample-repeats", type=int, default=3)
    parser.add_argument("--tmp", default=tempfile.gettempdir())
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    from deepimage.bench.report import header

    header("deepimage prepare at scale: time and peak RSS per image, indexing, ImageNet estimate")
    work = Path(tempfile.mkdtemp(prefix="deepimage-scale-", dir=args.tmp))
    try:
        report = run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report))


def run(args: argparse.Namespace, work: Path) -> dict:
    report: dict = {"cpu": None}
    from deepimage.bench.report import cpu_line

    report["cpu"] = cpu_line()
    # 1. subsets of a folder of small JPEGs
    folder = work / "jpegs"
    gen_s = write_jpegs(folder, args.images, args.classes)
    print(f"\nwrote {args.images} JPEGs of 64x48 in {args.classes} folders in {gen_s:.0f} s")
    subsets = sorted(n for n in args.subsets if n <= args.images)
    runs: dict[int, list[dict]] = {n: [] for n in subsets}
    for n in subsets:
        write_subset(folder, n, args.classes, work / f"subset-{n}.csv")
    for r in range(max(args.repeats, args.largest_repeats)):  # interleaved
        for n in subsets:
            want = args.largest_repeats if n == subsets[-1] else args.repeats
            if r < want:
                runs[n].append(
                    prepare_once(work / f"subset-{n}.csv", work / "store", args.sizes,
                                 args.workers, args.encoding, args.shard_mb)
                )  # fmt: skip
    print(
        f"\nprepare --sizes {' '.join(map(str, args.sizes))} --encoding {args.encoding} "
        f"--workers {args.workers} --shard-mb {args.shard_mb:g}, one process per run "
        "(medians; ms and RSS of the preparing process, workers apart)"
    )
    print(
        f"{'images':>8} {'runs':>4} {'ms/image':>9} {'(min-max)':>13} {'index MiB':>9} "
        f"{'peak MiB':>8} {'peak-index':>10} {'peak B/img':>10} {'workers MiB':>11} "
        f"{'index s':>7} {'shards':>6}"
    )
    rows = []
    for n in subsets:
        rs = runs[n]
        ms = [1e3 * x["prepare_s"] / x["n"] for x in rs]
        row = {
            "images": n,
            "runs": len(rs),
            "ms_per_image": med(ms),
            "ms_per_image_min": min(ms),
            "ms_per_image_max": max(ms),
            "rss_index": med([x["rss_index"] for x in rs]),
            "rss_peak": med([x["rss_peak"] for x in rs]),
            "rss_above_index": med([x["rss_peak"] - x["rss_index"] for x in rs]),
            "rss_peak_per_image": med([x["rss_peak"] / x["n"] for x in rs]),
            "rss_workers": med([x["rss_workers"] for x in rs]),
            "index_s": med([x["index_s"] for x in rs]),
            "shards": rs[0]["shards"],
        }
        rows.append(row)
        print(
            f"{n:>8} {len(rs):>4} {row['ms_per_image']:>9.3f} "
            f"{f'{min(ms):.3f}-{max(ms):.3f}':>13} {mib(row['rss_index']):>9} "
            f"{mib(row['rss_peak']):>8} {mib(row['rss_above_index']):>10} "
            f"{row['rss_peak_per_image']:>10.0f} {mib(row['rss_workers']):>11} "
            f"{row['index_s']:>7.2f} {row['shards']:>6}"
        )
    big, small = rows[-1], rows[0]
    ratios = {
        "images": big["images"] / small["images"],
        "ms_per_image": big["ms_per_image"] / small["ms_per_image"],
        "rss_peak": big["rss_peak"] / small["rss_peak"],
        "rss_above_index": big["rss_above_index"] / max(small["rss_above_index"], 1),
        "rss_peak_per_image": big["rss_peak_per_image"] / small["rss_peak_per_image"],
    }
    print(
        f"largest/smallest ({ratios['images']:.0f}x the images): time per image "
        f"{ratios['ms_per_image']:.2f}x, peak RSS {ratios['rss_peak']:.2f}x, peak RSS above "
        f"the index {ratios['rss_above_index']:.2f}x, peak RSS per image "
        f"{ratios['rss_peak_per_image']:.2f}x"
    )
    report["subsets"] = {"rows": rows, "ratios": ratios, "sizes": args.sizes,
                         "workers": args.workers, "encoding": args.encoding}  # fmt: skip
    shutil.rmtree(folder)

    # 2. indexing 1.28 M paths
    listing = index_listing(work / "listing", args.index_paths)
    print(
        f"\nindex {listing['paths']:,} empty files in {listing['classes']} class folders: "
        f"scan_folder {listing['index_s']:.1f} s "
        f"({1e6 * listing['index_s'] / listing['paths']:.1f} us/path), "
        f"source fingerprint (one stat per file) {listing['fingerprint_s']:.1f} s, "
        f"index memory {mib(listing['index_rss_growth'])} MiB "
        f"({listing['index_rss_growth'] / listing['paths']:.0f} B/path); "
        f"creating the files took {listing['create_s']:.0f} s"
    )
    report["index"] = listing

    # 3. ImageNet-1k estimate from imagenet-sample
    report["imagenet"] = imagenet_estimate(args, work)
    return report


def imagenet_estimate(args: argparse.Namespace, work: Path) -> dict:
    """Prepare the sample at 256, 512 and both; scale per-image time and bytes to ImageNet."""
    sample = Path(args.sample)
    photos = sorted(p for p in sample.iterdir() if p.suffix.lower() in (".jpeg", ".jpg"))
    source = work / "sample.csv"  # flat folder, <wnid>_<name>.JPEG: the wnid is the label
    with open(source, "w", newline="") as f:
        csv.writer(f).writerows([str(p), p.name.split("_")[0]] for p in photos)
    mean_bytes = sum(p.stat().st_size for p in photos) / len(photos)
    cases = {"256": [256], "512": [512], "256+512": [256, 512]}
    runs: dict[str, list[dict]] = {k: [] for k in cases}
    for _ in range(args.sample_repeats):
        for name, sizes in cases.items():
            run = prepare_once(source, work / "store", sizes, args.workers, "jpeg", 1024)
            runs[name].append(run)
    print(
        f"\nImageNet-1k ({IMAGENET_TRAIN:,} training images) estimated from {sample.name} "
        f"({len(photos)} full-size photos of {mean_bytes / 1e3:.0f} kB on average, JPEG quality "
        f"90, {args.workers} workers, median of {args.sample_repeats}):"
    )
    print(
        f"{'sizes':>8} {'ms/image':>9} {'(min-max)':>13} {'bytes/image':>12} "
        f"{'store GB':>9} {'raw GB':>7} {'hours':>6}"
    )
    out = {}
    for name, rs in runs.items():
        n = rs[0]["kept"]
        ms = [1e3 * x["prepare_s"] / x["n"] for x in rs]
        per_size = {s: b / n for s, b in rs[0]["bytes"].items()}
        per_image = sum(per_size.values())
        raw = sum(3 * s * s for s in cases[name])
        row = {
            "ms_per_image": med(ms),
            "ms_min": min(ms),
            "ms_max": max(ms),
            "bytes_per_image": per_size,
            "store_bytes": per_image * IMAGENET_TRAIN,
            "raw_bytes": raw * IMAGENET_TRAIN,
            "hours": med(ms) * IMAGENET_TRAIN / 3.6e6,
            "images": n,
        }
        out[name] = row
        print(
            f"{name:>8} {row['ms_per_image']:>9.2f} {f'{min(ms):.2f}-{max(ms):.2f}':>13} "
            f"{per_image:>12,.0f} {row['store_bytes'] / 1e9:>9.1f} {row['raw_bytes'] / 1e9:>7.0f} "
            f"{row['hours']:>6.1f}"
        )
    print(
        "store GB = bytes/image x 1,281,167; hours = ms/image x 1,281,167 on this machine "
        f"with {args.workers} workers, reading the photos from a warm page cache"
    )
    return {"sample_images": len(photos), "sample_mean_bytes": mean_bytes, "cases": out}


if __name__ == "__main__":
    main()
