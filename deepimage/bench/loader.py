"""The training input pipeline alone: decoded, augmented, normalised batches per second.

Three paths, each a torch ``DataLoader`` with the same worker processes and batch size, over
the same images in the same order, timed from creating the loader (worker start included,
as in every training epoch) to the last batch received by this process:

  deepimage          the training loader on CPU: workers read the store's rows, decode them
                     and run the augmentation preset, handing over float32 model input
  decode only        the same workers reading and decoding the same stored bytes into uint8
                     batches, nothing else: the limit of any pipeline on this store
  albumentations     the peer: a per-image ``Dataset`` reading the original JPEGs
                     (``cv2.imread``), resizing to S x S and applying the same augmentations
                     as far as albumentations has them (see :func:`albumentations_transform`),
                     batched by ``default_collate``

The paths run interleaved, ``--repeats`` times, each pass over at least ``--images`` images
(epochs of the store's rows, dropping each epoch's last incomplete batch). Medians, spread
and per-repeat ratios are printed; the last line is JSON.

    deepimage bench loader --data STORE --size 256 --crop 224 --workers 2 --batch-size 64
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from deepimage.augment.params import AugmentConfig
from deepimage.augment.pipeline import build_train_augment, preset_config
from deepimage.bench import report
from deepimage.bench.augment import user_vignette
from deepimage.bench.report import header, spread
from deepimage.data.loader import iterate_batches, train_batches
from deepimage.data.store import Store

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------- the peer


def albumentations_transform(cfg: AugmentConfig, size: int, crop: int, seed: int = 0) -> Any:
    """The preset's augmentations in albumentations 2.0.8, as close as it allows:

    ==============  ==================================================================
    resize          ``Resize(S, S)`` (the store's stretch resize, done here per image)
    crop, flip      ``RandomCrop(C, C)`` (the centre crop when the preset's crop is not
                    random), ``HorizontalFlip`` with the preset's p: the same
    rotation        ``Rotate(limit=steps * step)``: continuous angles, approximated
    lens, stretch   ``OpticalDistortion(distort_limit=degrees * k_step)`` then ``Affine``
                    scaling x and y by up to ``stretches * stretch_step``, together with
                    the preset's p: approximated (another distortion model)
    colour cast     ``RGBShift(max_shift)`` (continuous shifts): approximated
    vignetting      albumentations has none: a user-written radial mask (``Lambda``) with
                    the preset's radius and strength ranges: approximated
    PCA lighting    ``FancyPCA(alpha=std)`` (eigenvectors of each image, not the data
                    set's): approximated
    normalise       ``Normalize`` and ``ToTensorV2``: the same
    ==============  ==================================================================
    """
    import albumentations as A
    from albumentations.pytorch import ToTensorV2

    rng = np.random.default_rng(seed)
    v = cfg.vignette
    r_lo, r_hi = v.radius_start, v.radius_start + v.radius_step * (v.radii - 1)
    s_lo, s_hi = v.strength_step, v.strength_step * v.strengths

    def vignette(image: np.ndarray, **_: object) -> np.ndarray:
        if rng.random() >= v.p:
            return image
        h, w = image.shape[:2]
        mask = user_vignette(rng, h, w, (r_lo, r_hi), (s_lo, s_hi))[..., None]
        return np.clip(image * mask, 0, 255).astype(np.uint8)

    lens, stretch = cfg.lens, cfg.lens.stretches * cfg.lens.stretch_step
    ops: list[Any] = [
        A.Resize(size, size),
        A.RandomCrop(crop, crop) if cfg.crop.random else A.CenterCrop(crop, crop),
    ]
    if cfg.flip.p > 0:
        ops.append(A.HorizontalFlip(p=cfg.flip.p))
    if cfg.rotation.p > 0:
        ops.append(A.Rotate(limit=cfg.rotation.steps * cfg.rotation.step, p=cfg.rotation.p))
    if lens.p > 0:
        ops.append(A.Sequential([
            A.OpticalDistortion(distort_limit=lens.degrees * lens.k_step, p=1.0),
            A.Affine(scale={"x": (1.0, 1.0 + stretch), "y": (1.0, 1.0 + stretch)}, p=1.0),
        ], p=lens.p))  # fmt: skip
    if cfg.cast.p > 0:
        m = cfg.cast.max_shift
        ops.append(A.RGBShift(r_shift_limit=m, g_shift_limit=m, b_shift_limit=m, p=cfg.cast.p))
    if v.p > 0:
        ops.append(A.Lambda(image=vignette))
    if cfg.lighting.p > 0:
        ops.append(A.FancyPCA(alpha=cfg.lighting.std, p=cfg.lighting.p))
    ops += [A.Normalize(mean=MEAN, std=STD), ToTensorV2()]
    return A.Compose(ops, seed=seed)


class OriginalPhotos(Dataset):
    """The peer's dataset: item ``i`` is photo ``i`` read from its file and transformed."""

    def __init__(self, paths: list[str], transform: Callable[..., Any]) -> None:
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        import cv2

        bgr = cv2.imread(self.paths[i], cv2.IMREAD_COLOR)
        if bgr is None:
            raise FileNotFoundError(f"cannot read {self.paths[i]}")
        return self.transform(image=cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))["image"]


# --------------------------------------------------------------------------- timing


def timed(batches: Iterable[Any]) -> tuple[float, int]:
    """Seconds to receive every batch of ``batches`` (created inside the timer) and images."""
    start = time.perf_counter()
    n = 0
    for item in batches:
        n += len(item[0] if isinstance(item, tuple | list) else item)
    return time.perf_counter() - start, n


def run(
    data: str,
    size: int,
    crop: int,
    workers: int,
    batch_size: int,
    augment: str = "deepimage",
    repeats: int = 5,
    images: int = 2000,
    peer: bool = True,
) -> dict[str, Any]:
    store = Store.open(data)
    if size not in store.sizes:
        raise SystemExit(f"store {store.path} has sizes {store.sizes}, not {size}")
    cfg = preset_config(augment)
    rows = np.arange(len(store))
    per_epoch = len(rows) // batch_size * batch_size
    if per_epoch == 0:
        raise SystemExit(f"--batch-size {batch_size} exceeds the {len(rows)} images")
    epochs = max(1, math.ceil(images / per_epoch))
    aug = build_train_augment(cfg, size=size, crop=crop, seed=0, mean=MEAN, std=STD,
                              stats=store.stats)  # fmt: skip
    header(f"input pipeline: {store.path} ({store.encoding}), S={size}, crop {crop}, "
           f"{workers} workers, batch {batch_size}, augment {augment}")  # fmt: skip
    import cv2
    import simplejpeg

    line = f"opencv {cv2.__version__}, simplejpeg {simplejpeg.__version__}"
    paths: dict[str, Callable[[list[np.ndarray], int], Iterable[Any]]] = {
        "deepimage": lambda batches, rep: iterate_batches(
            store.path, size, batches, workers, transform=aug.for_epoch(rep)
        ),
        "decode only": lambda batches, rep: iterate_batches(store.path, size, batches, workers),
    }
    if peer:
        try:
            import albumentations
        except ImportError:
            raise SystemExit(
                "the peer needs albumentations: pip install albumentations==2.0.8"
            ) from None
        line += f", albumentations {albumentations.__version__}"
        missing = [p for p in store.paths if not Path(p).is_file()]
        if missing:
            raise SystemExit(f"the peer reads the original photos; not found: {missing[0]}")
        photos = OriginalPhotos(list(store.paths), albumentations_transform(cfg, size, crop))

        def albumentations_path(batches: list[np.ndarray], rep: int) -> Iterable[Any]:
            return DataLoader(photos, batch_size=batch_size, sampler=np.concatenate(batches),
                              num_workers=workers,
                              prefetch_factor=2 if workers else None)  # fmt: skip

        paths["albumentations"] = albumentations_path
    print(f"peers   : {line}")
    print(f"passes  : {epochs} epochs of {per_epoch} images each, {repeats} repeats")
    first = train_batches(rows, batch_size, 0, 0)[:1]
    for fn in paths.values():  # warm-up: imports, page cache, lazy initialisations
        timed(fn(first, 0))
    rates: dict[str, list[float]] = {k: [] for k in paths}
    names = list(paths)
    for rep in range(repeats):
        batches = [b for e in range(epochs) for b in train_batches(rows, batch_size, rep, e)]
        for name in names[rep % len(names) :] + names[: rep % len(names)]:  # rotate the order
            seconds, n = timed(paths[name](batches, rep))
            rates[name].append(n / seconds)
    med = {k: statistics.median(v) for k, v in rates.items()}
    print()
    for name, values in rates.items():
        print(f"  {name:<16}: {spread(values)} images/s")

    def ratio(a: str, b: str) -> float:
        value, text = report.ratio(rates, a, b)
        print(f"  {f'{a} / {b}':<34}: {text}")
        return value

    print()
    result: dict[str, Any] = {
        "store": str(store.path),
        "encoding": store.encoding,
        "size": size,
        "crop": crop,
        "workers": workers,
        "batch_size": batch_size,
        "augment": augment,
        "repeats": repeats,
        "images_per_repeat": epochs * per_epoch,
        "images_per_s": round(med["deepimage"], 1),
        "decode_limit_images_per_s": round(med["decode only"], 1),
        "vs_decode_limit": round(ratio("deepimage", "decode only"), 3),
    }
    if peer:
        result["albumentations_images_per_s"] = round(med["albumentations"], 1)
        result["vs_albumentations"] = round(ratio("deepimage", "albumentations"), 3)
    return result


def main(args: Any) -> int:
    result = run(args.data, args.size, args.crop, args.workers, args.batch_size, args.augment,
                 args.repeats, args.images, args.peer)  # fmt: skip
    print(json.dumps(result))
    return 0
