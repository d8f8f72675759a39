"""Augmentation throughput per CPU core: deepimage against albumentations and torchvision.

Every path turns the photos of a folder into model-ready float tensors (224 x 224 crops of
images resized to S, normalised) with the paper's augmentations: crop, flip, rotation,
lens distortion with stretching, colour cast and vignetting, each peer configured with the
same probabilities and ranges. One process, one thread (``torch.set_num_threads(1)``,
``cv2.setNumThreads(0)``); files are read into memory first, so no path waits on the disk.

  decode only        deepimage's decoder (Pillow, full size), and cv2.imdecode: the limit
  deepimage JPEG     decode (reduced-size DCT where the photo is >= 2 S) + one warp that folds
                     the resize into the augmentation grid + one photometric pass (the
                     default backend on CPU: OpenCV, see deepimage.augment.cv_backend)
  albumentations     cv2.imdecode + SmallestMaxSize, RandomCrop, HorizontalFlip, Rotate,
                     RGBShift, OpticalDistortion, a user-written vignette, Normalize
  torchvision v2     decode_jpeg + Resize, RandomCrop, RandomHorizontalFlip, RandomRotation,
                     user-written cast, vignette and lens distortion, ToDtype, Normalize
  deepimage store    batches of 64 from the prepared uint8 store (no decode), reading only
                     each image's crop window into a reused buffer; also whole images on
                     the torch backend (F.grid_sample, the device path), as before

Paths run interleaved, 64 photos at a time, over all photos ``--repeats`` times; medians,
spread and ratios are printed, and the last line is JSON.

    deepimage bench augment --data ../shared/datasets/imagenet-sample --size 256
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from deepimage.augment.pipeline import build_train_augment
from deepimage.bench import report
from deepimage.bench.report import header, spread
from deepimage.data.decode import open_image

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
EXTS = {".jpg", ".jpeg", ".JPEG", ".JPG", ".png"}


# --------------------------------------------------------------------------- peers


def user_vignette(
    rng: np.random.Generator,
    h: int,
    w: int,
    radius: tuple[float, float] = (0.1, 0.88),
    strength: tuple[float, float] = (0.015, 0.735),
) -> np.ndarray:
    """The vignette a user writes: a radial darkening mask, random area and strength."""
    yy, xx = np.ogrid[:h, :w]
    r = np.sqrt(
        ((yy - (h - 1) / 2) ** 2 + (xx - (w - 1) / 2) ** 2) / (((h - 1) ** 2 + (w - 1) ** 2) / 4)
    )
    r0, s = rng.uniform(*radius), rng.uniform(*strength)
    return (1 - s * np.clip((r - r0) / (1 - r0), 0, 1) ** 2).astype(np.float32)


def albumentations_path(size: int, crop: int) -> Callable[[bytes], torch.Tensor]:
    import albumentations as A
    import cv2
    from albumentations.pytorch import ToTensorV2

    rng = np.random.default_rng(0)

    def vignette(image: np.ndarray, **_: object) -> np.ndarray:
        if rng.random() >= 0.5:
            return image
        mask = user_vignette(rng, *image.shape[:2])[..., None]
        return np.clip(image * mask, 0, 255).astype(np.uint8)

    t = A.Compose(
        [
            A.SmallestMaxSize(max_size=size),
            A.RandomCrop(crop, crop),
            A.HorizontalFlip(p=0.5),
            A.Rotate(limit=10, p=0.5),
            A.OpticalDistortion(distort_limit=0.2, p=0.5),
            A.RGBShift(r_shift_limit=20, g_shift_limit=20, b_shift_limit=20, p=0.875),
            A.Lambda(image=vignette),
            A.Normalize(mean=MEAN, std=STD),
            ToTensorV2(),
        ]
    )

    def run(data: bytes) -> torch.Tensor:
        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        return t(image=cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))["image"]

    return run


def torchvision_path(size: int, crop: int) -> Callable[[bytes], torch.Tensor]:
    import torch.nn.functional as F
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms import v2

    gen = torch.Generator().manual_seed(0)

    def rand() -> float:
        return float(torch.rand((), generator=gen))

    def cast(img: torch.Tensor) -> torch.Tensor:
        shift = torch.randint(-20, 21, (3, 1, 1), generator=gen)
        shift = shift * (torch.rand(3, 1, 1, generator=gen) < 0.5)
        return (img.to(torch.int16) + shift).clamp_(0, 255).to(torch.uint8)

    def vignette(img: torch.Tensor) -> torch.Tensor:
        if rand() >= 0.5:
            return img
        mask = torch.from_numpy(user_vignette(np.random.default_rng(), *img.shape[1:]))
        return (img * mask).clamp_(0, 255).to(torch.uint8)

    def lens(img: torch.Tensor) -> torch.Tensor:
        if rand() >= 0.5:
            return img
        k = (rand() * 2 - 1) * 0.2
        h, w = img.shape[1:]
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        g = 1 + k * (xs**2 + ys**2) / 2
        grid = torch.stack([xs * g, ys * g], -1)[None] / (1 + max(k, 0))
        out = F.grid_sample(img[None].float(), grid, align_corners=True)[0]
        return out.round_().to(torch.uint8)

    t = v2.Compose(
        [
            v2.Resize(size, antialias=True),
            v2.RandomCrop(crop),
            v2.RandomHorizontalFlip(),
            v2.RandomApply([v2.RandomRotation(10)], p=0.5),
            v2.Lambda(lens),
            v2.Lambda(cast),
            v2.Lambda(vignette),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(MEAN, STD),
        ]
    )

    def run(data: bytes) -> torch.Tensor:
        return t(decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                             mode=ImageReadMode.RGB))  # fmt: skip

    return run


# --------------------------------------------------------------------------- deepimage


def deepimage_jpeg_path(size: int, crop: int) -> Callable[[list[bytes], np.ndarray], torch.Tensor]:
    """What a loader worker does with a batch of files: decode each (reduced-size DCT where
    the photo is at least 2 S), then one warp per image that folds in the resize."""
    augment = build_train_augment("deepimage", size=size, crop=crop, seed=0, mean=MEAN, std=STD)

    def run(blobs: list[bytes], rows: np.ndarray) -> torch.Tensor:
        with warnings.catch_warnings():  # Pillow's array is read-only; the warp only reads
            warnings.simplefilter("ignore", UserWarning)
            images = [torch.from_numpy(np.asarray(open_image(b, draft_size=size))) for b in blobs]
        return augment.sources(images, rows, 0)

    return run


def decode_pil(data: bytes) -> np.ndarray:
    return np.asarray(open_image(data))


def decode_cv2(data: bytes) -> np.ndarray:
    import cv2

    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)


# --------------------------------------------------------------------------- timing


def per_image(fn: Callable[[bytes], object]) -> Callable[[list[bytes], np.ndarray, int], None]:
    def run(blobs: list[bytes], rows: np.ndarray, epoch: int) -> None:
        for b in blobs:
            fn(b)

    return run


def store_path(
    store: Path, size: int, crop: int, backend: str = "auto", batch: int = 64
) -> Callable[[list[bytes], np.ndarray, int], None]:
    """Augment the rows of the prepared store as one batch: on the default backend reading
    only each image's crop window (``Augment.from_store``); on the torch backend reading
    whole images into a reused buffer (as the loader does) and warping with grid_sample."""
    from deepimage.data.store import Store

    st = Store.open(store)
    images = st.images(size)
    augment = build_train_augment(
        "deepimage", size=size, crop=crop, seed=0, mean=MEAN, std=STD, stats=st.stats,
        backend=backend,
    )  # fmt: skip
    buf = np.empty((batch, size, size, 3), np.uint8)

    def run(blobs: list[bytes], rows: np.ndarray, epoch: int) -> None:
        if backend == "torch":
            out = buf[: len(rows)]
            np.take(images, rows, axis=0, out=out)
            x = augment(torch.from_numpy(out), rows, epoch)
        else:
            x = augment.from_store(images, rows, epoch)
        del x

    return run


def prepare(files: list[Path], size: int, cache: Path) -> Path:
    from deepimage.data.index import DatasetIndex, Sample
    from deepimage.data.prepare import prepare_store

    index = DatasetIndex(str(files[0].parent), ["all"], [Sample(str(f), 0) for f in files])
    out = cache / f"store-{size}"
    # Raw pixels in one shard: Store.images maps them, and crop windows are read alone.
    prepare_store(
        index, out, [size], workers=0, progress=False, encoding="raw", shard_bytes=1 << 62
    )
    return out


def run(data: str, size: int, crop: int = 224, repeats: int = 5, limit: int | None = None) -> dict:
    import cv2

    torch.set_num_threads(1)
    cv2.setNumThreads(0)
    files = sorted(p for p in Path(data).iterdir() if p.suffix in EXTS)[:limit]
    if not files:
        raise SystemExit(f"no images in {data}")
    blobs = [f.read_bytes() for f in files]
    header(f"augmentation per core, {len(files)} photos from {data}, S={size}, crop {crop}")
    try:
        import albumentations

        print(f"peers   : albumentations {albumentations.__version__}, opencv {cv2.__version__}")
        peers = {"albumentations": albumentations_path(size, crop)}
    except ImportError:
        print("peers   : albumentations not installed (pip install albumentations==2.0.8)")
        peers = {}
    peers["torchvision v2"] = torchvision_path(size, crop)
    jpeg = deepimage_jpeg_path(size, crop)
    name_store = "deepimage from store (batches of 64)"
    name_torch = "deepimage from store, torch backend"
    paths: dict[str, Callable[[list[bytes], np.ndarray, int], None]] = {
        "decode only (Pillow, deepimage's decoder)": per_image(decode_pil),
        "decode only (cv2.imdecode)": per_image(decode_cv2),
        "deepimage from JPEG": lambda blobs, rows, epoch: jpeg(blobs, rows),
    }
    for name, fn in peers.items():
        paths[name] = per_image(fn)
    chunks = [
        (blobs[i : i + 64], np.arange(i, min(i + 64, len(blobs)))) for i in range(0, len(blobs), 64)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        prepared = prepare(files, size, Path(tmp))
        paths[name_store] = store_path(prepared, size, crop)
        paths[name_torch] = store_path(prepared, size, crop, "torch")
        for fn in paths.values():  # warm-up
            fn(*chunks[0], 0)
        rates: dict[str, list[float]] = {k: [] for k in paths}
        for epoch in range(repeats):
            spent = dict.fromkeys(paths, 0.0)
            # interleaved chunk by chunk, so drifts in machine load hit every path alike
            for chunk, rows in chunks:
                for name, fn in paths.items():
                    start = time.perf_counter()
                    fn(chunk, rows, epoch)
                    spent[name] += time.perf_counter() - start
            for name in paths:
                rates[name].append(len(blobs) / spent[name])
    med = {k: statistics.median(v) for k, v in rates.items()}
    print()
    for name, values in rates.items():
        print(f"  {name:<42}: {spread(values)} images/s")

    def ratio(a: str, b: str) -> str:
        return report.ratio(rates, a, b)[1]

    dec = "decode only (Pillow, deepimage's decoder)"
    print()
    print(f"  deepimage JPEG / decode only (Pillow)   : {ratio('deepimage from JPEG', dec)}")
    print(f"  deepimage JPEG / decode only (cv2)      : "
          f"{ratio('deepimage from JPEG', 'decode only (cv2.imdecode)')}")  # fmt: skip
    for peer in peers:
        for label, name in (
            ("deepimage JPEG", "deepimage from JPEG"),
            ("deepimage store", name_store),
            ("store, torch backend", name_torch),
        ):
            print(f"  {f'{label} / {peer}':<40}: {ratio(name, peer)}")
    result = {
        "size": size,
        "crop": crop,
        "images": len(files),
        "repeats": repeats,
        "images_per_s": round(med["deepimage from JPEG"], 1),
        "decode_images_per_s": round(med[dec], 1),
        "decode_cv2_images_per_s": round(med["decode only (cv2.imdecode)"], 1),
        "store_images_per_s": round(med[name_store], 1),
        "store_torch_images_per_s": round(med[name_torch], 1),
    }
    for peer in peers:
        result[peer.split()[0] + "_images_per_s"] = round(med[peer], 1)
    if "albumentations" in peers:
        result["jpeg_vs_decode"] = round(med["deepimage from JPEG"] / med[dec], 3)
        result["store_vs_albumentations"] = round(med[name_store] / med["albumentations"], 2)
    assert all(math.isfinite(v) for v in med.values())
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="folder of photos")
    parser.add_argument("--size", type=int, default=256, help="S (default 256)")
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--limit", type=int, default=None, help="use the first N photos")
    args = parser.parse_args(argv)
    print(json.dumps(run(args.data, args.size, args.crop, args.repeats, args.limit)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
