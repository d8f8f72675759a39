"""Deterministic synthetic image-classification data set for demos and end-to-end tests.

Each image shows one class shape or texture patch (circle, square, triangle, star, cross, ring,
hexagon, crescent, striped patch, checkered patch) at a random scale (down to ~12% of the frame),
position, rotation and aspect, in a random colour that says nothing about the class, on a
gradient / cloudy / noisy background with 1-3 distractor strokes or blobs. Small shapes make
input resolution matter; random colours make shape and texture, not colour, the signal.

Layout (ImageFolder): ``root/{train,val}/<class_id>/<i>.png``, ``root/class_names.txt`` and
``root/synthetic.json`` (written last; marks a complete set and records its parameters).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["CLASSES", "MARKER", "make_synthetic_dataset", "render_image"]

logger = logging.getLogger(__name__)

# Bump when the drawing changes, so existing sets are regenerated instead of reused.
GENERATOR_VERSION = 1
MARKER = "synthetic.json"
SPLITS = ("train", "val")
_OWN_ENTRIES = frozenset({*SPLITS, "class_names.txt", MARKER})

# (class id, readable name); the position in this list seeds the class's images.
CLASSES: tuple[tuple[str, str], ...] = (
    ("circle", "circle, disc"),
    ("square", "square, rotated square"),
    ("triangle", "triangle"),
    ("star", "five-pointed star"),
    ("cross", "cross, plus sign"),
    ("ring", "ring, annulus"),
    ("hexagon", "hexagon"),
    ("crescent", "crescent, moon"),
    ("stripes", "striped patch"),
    ("checker", "checkered patch"),
)

_SUPERSAMPLE = 2
_MIN_DIAMETER = 0.18  # fraction of the frame
_MAX_DIAMETER = 0.80
_MIN_CONTRAST = 110.0  # RGB distance between shape colour and background mean


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0.0, 255.0, 3)


def _rgb(colour: np.ndarray) -> tuple[int, int, int]:
    r, g, b = np.clip(np.rint(colour), 0, 255).astype(int).tolist()
    return r, g, b


@functools.lru_cache(maxsize=8)
def _unit_grid(s: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (yy, xx) in [0, 1], float32, read-only."""
    yy, xx = (np.mgrid[0:s, 0:s].astype(np.float32) + 0.5) / s
    yy.flags.writeable = False
    xx.flags.writeable = False
    return yy, xx


def _background(rng: np.random.Generator, s: int) -> Image.Image:
    """RGB (s, s) background: linear/radial gradient, smooth clouds or coarse noise."""
    kind = int(rng.choice(4, p=[0.35, 0.35, 0.15, 0.15]))  # mostly smooth
    if kind in (0, 1):  # smooth, so computed at half size and upsampled
        yy, xx = _unit_grid(s // 2)
        if kind == 0:  # linear gradient in a random direction
            phi = rng.uniform(0, 2 * math.pi)
            t = xx * math.cos(phi) + yy * math.sin(phi)
            t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        else:  # radial gradient around a random centre
            cx, cy = rng.uniform(0, 1, 2)
            t = np.minimum(np.hypot(xx - cx, yy - cy) / rng.uniform(0.5, 1.2), 1.0)
        c0 = _random_colour(rng).astype(np.float32)
        c1 = np.clip(c0 + rng.uniform(-80, 80, 3), 0, 255).astype(np.float32)
        half = Image.fromarray((c0 + (c1 - c0) * t[..., None]).astype(np.uint8))
        return half.resize((s, s), Image.Resampling.BILINEAR)
    base = _random_colour(rng)
    if kind == 2:  # smooth "clouds": a coarse random grid upsampled
        g = int(rng.integers(3, 8))
        grid = np.clip(base + rng.normal(0, 30, (g, g, 3)), 0, 255).astype(np.uint8)
        return Image.fromarray(grid).resize((s, s), Image.Resampling.BICUBIC)
    # solid colour with blocky pixel noise at output resolution
    small = np.clip(base + rng.normal(0, 14, (s // 2, s // 2, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(small).resize((s, s), Image.Resampling.NEAREST)


def _place(
    points: np.ndarray, r: float, theta: float, cx: float, cy: float, aspect: float = 1.0
) -> list[tuple[float, float]]:
    """Scale unit-size local points (N, 2) by r (x also by aspect), rotate, translate."""
    p = points * np.array([r * aspect, r])
    c, s = math.cos(theta), math.sin(theta)
    x = p[:, 0] * c - p[:, 1] * s + cx
    y = p[:, 0] * s + p[:, 1] * c + cy
    return list(zip(x.tolist(), y.tolist()))


def _ngon(n: int, radii: np.ndarray | float = 1.0, phase: float = 0.0) -> np.ndarray:
    a = phase + np.arange(n) * 2 * math.pi / n
    r = np.broadcast_to(np.asarray(radii, dtype=np.float64), a.shape)
    return np.stack([r * np.cos(a), r * np.sin(a)], axis=1)


_CROSS = np.array(
    [[-1, -1], [-1, -3], [1, -3], [1, -1], [3, -1], [3, 1], [1, 1], [1, 3], [-1, 3], [-1, 1],
     [-3, 1], [-3, -1]],
    dtype=np.float64,
)  # fmt: skip


def _texture_mask(kind: str, rng: np.random.Generator, s: int, geo: tuple) -> Image.Image:
    """Stripes or checkerboard inside a rotated square or disc patch, as an "L" mask."""
    r, theta, cx, cy = geo
    x0, y0 = max(int(cx - r) - 1, 0), max(int(cy - r) - 1, 0)
    x1, y1 = min(int(cx + r) + 2, s), min(int(cy + r) + 2, s)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5
    c, sn = math.cos(theta), math.sin(theta)
    u = ((xx - cx) * c + (yy - cy) * sn) / r
    v = (-(xx - cx) * sn + (yy - cy) * c) / r
    if rng.random() < 0.5:
        h = 0.75  # square patch, half side relative to r
        region = (np.abs(u) < h) & (np.abs(v) < h)
    else:
        h = 1.0
        region = u * u + v * v < 1.0
    if kind == "stripes":
        n = int(rng.choice([5, 7, 9]))
        pattern = np.floor((u + h) * n / (2 * h)).astype(np.int64) % 2 == 0
    else:
        n = int(rng.integers(3, 6))
        cells = np.floor((u + h) * n / (2 * h)) + np.floor((v + h) * n / (2 * h))
        pattern = cells.astype(np.int64) % 2 == 0
    mask = np.zeros((s, s), dtype=np.uint8)
    mask[y0:y1, x0:x1] = (region & pattern) * np.uint8(255)
    return Image.fromarray(mask)


def _shape_mask(kind: str, rng: np.random.Generator, s: int) -> Image.Image:
    """ "L" mask (s, s) of one class shape at a random scale, place, aspect and angle."""
    diameter = math.exp(rng.uniform(math.log(_MIN_DIAMETER), math.log(_MAX_DIAMETER))) * s
    r = diameter / 2
    cx, cy = rng.uniform(r + 1, s - r - 1, 2)
    theta = rng.uniform(0, 2 * math.pi)
    if kind in ("stripes", "checker"):
        return _texture_mask(kind, rng, s, (r, theta, cx, cy))

    aspect = rng.uniform(0.85, 1.0)
    img = Image.new("L", (s, s), 0)
    draw = ImageDraw.Draw(img)
    if kind == "circle":
        draw.polygon(_place(_ngon(64), r, theta, cx, cy, aspect), fill=255)
    elif kind == "square":
        draw.polygon(_place(_ngon(4, phase=math.pi / 4), r, theta, cx, cy, aspect), fill=255)
    elif kind == "triangle":
        radii = rng.uniform(0.9, 1.1, 3)
        draw.polygon(_place(_ngon(3, radii), r, theta, cx, cy, aspect), fill=255)
    elif kind == "star":
        radii = np.tile([1.0, rng.uniform(0.38, 0.5)], 5)
        draw.polygon(_place(_ngon(10, radii), r, theta, cx, cy), fill=255)
    elif kind == "cross":
        arm = rng.uniform(0.22, 0.36)  # half-width of an arm relative to r
        pts = _CROSS * arm
        pts = np.where(np.abs(pts) > arm + 1e-9, np.sign(pts), pts)  # arms end at r
        draw.polygon(_place(pts, r, theta, cx, cy, aspect), fill=255)
    elif kind == "ring":
        draw.polygon(_place(_ngon(64), r, theta, cx, cy, aspect), fill=255)
        inner = rng.uniform(0.5, 0.7)
        draw.polygon(_place(_ngon(64, inner), r, theta, cx, cy, aspect), fill=0)
    elif kind == "hexagon":
        draw.polygon(_place(_ngon(6), r, theta, cx, cy, aspect), fill=255)
    elif kind == "crescent":
        draw.polygon(_place(_ngon(64), r, theta, cx, cy), fill=255)
        cut = _ngon(64, rng.uniform(0.75, 0.9)) + np.array([rng.uniform(0.35, 0.55), 0.0])
        draw.polygon(_place(cut, r, theta, cx, cy), fill=0)
    else:
        raise ValueError(f"unknown shape {kind!r}")
    return img


def _draw_distractor(draw: ImageDraw.ImageDraw, rng: np.random.Generator, s: int) -> None:
    """A thin line, zigzag, open arc or irregular splat: clutter that is no class shape."""
    kind = int(rng.integers(4))
    colour = (*_rgb(_random_colour(rng)), int(rng.uniform(0.35, 0.75) * 255))  # translucent
    width = int(rng.integers(1, 3)) * _SUPERSAMPLE
    if kind == 0:
        pts = rng.uniform(0, s, (2, 2))
        draw.line([tuple(p) for p in pts.tolist()], fill=colour, width=width)
    elif kind == 1:
        start = rng.uniform(0, s, 2)
        steps = rng.normal(0, s * 0.15, (int(rng.integers(3, 6)), 2))
        pts = np.vstack([start, start + np.cumsum(steps, axis=0)])
        draw.line([tuple(p) for p in pts.tolist()], fill=colour, width=width, joint="curve")
    elif kind == 2:
        cx, cy = rng.uniform(0, s, 2)
        rad = rng.uniform(0.1, 0.35) * s
        a0 = rng.uniform(0, 360)
        box = [cx - rad, cy - rad, cx + rad, cy + rad]
        draw.arc(box, a0, a0 + rng.uniform(40, 160), fill=colour, width=width)
    else:
        r = rng.uniform(0.025, 0.06) * s
        cx, cy = rng.uniform(r, s - r, 2)
        n = int(rng.integers(7, 12))
        pts = _ngon(n, rng.uniform(0.35, 1.0, n), rng.uniform(0, 2 * math.pi))
        draw.polygon(_place(pts, r, 0.0, cx, cy), fill=colour)


def render_image(class_index: int, rng: np.random.Generator, image_size: int) -> np.ndarray:
    """Draw one image of class ``CLASSES[class_index]``: (image_size, image_size, 3) uint8.

    Drawn at twice the size and box-downscaled for anti-aliasing; all randomness from ``rng``.
    """
    s = image_size * _SUPERSAMPLE
    canvas = _background(rng, s)
    draw = ImageDraw.Draw(canvas, "RGBA")  # blends translucent fills onto the RGB canvas
    for _ in range(int(rng.integers(0, 3))):
        _draw_distractor(draw, rng, s)

    mask = _shape_mask(CLASSES[class_index][0], rng, s)
    box = mask.getbbox() or (0, 0, s, s)
    mask = mask.crop(box)
    under = np.asarray(canvas.crop(box), dtype=np.float32)[np.asarray(mask) > 127]
    bg_mean = under.mean(axis=0) if len(under) else np.full(3, 127.5)
    # a colour that stands out from the background under the shape (not tied to the class)
    colour = _random_colour(rng)
    for _ in range(20):
        if np.linalg.norm(colour - bg_mean) >= _MIN_CONTRAST:
            break
        colour = _random_colour(rng)
    # gentle shading across the shape, so it is not a flat fill
    phi = rng.uniform(0, 2 * math.pi)
    strength = rng.uniform(0.0, 0.4)
    yy, xx = _unit_grid(s)
    x0, y0, x1, y1 = box
    ramp = xx[y0:y1, x0:x1] * math.cos(phi) + yy[y0:y1, x0:x1] * math.sin(phi)
    shade = 1.0 + strength * (ramp - 0.5)
    fill = np.clip(colour.astype(np.float32) * shade[..., None], 0, 255).astype(np.uint8)
    canvas.paste(Image.fromarray(fill), (x0, y0), mask)

    # box downscale (anti-aliasing), then mild sensor noise
    small = np.asarray(canvas.reduce(_SUPERSAMPLE), dtype=np.float32)
    small = small + rng.normal(0.0, rng.uniform(2.0, 6.0), small.shape).astype(np.float32)
    return np.clip(np.rint(small), 0, 255).astype(np.uint8)


def _params(n_train: int, n_val: int, image_size: int, seed: int) -> dict[str, Any]:
    return {
        "generator_version": GENERATOR_VERSION,
        "classes": [c for c, _ in CLASSES],
        "n_train_per_class": n_train,
        "n_val_per_class": n_val,
        "image_size": image_size,
        "seed": seed,
    }


def _is_complete(root: Path, params: dict[str, Any]) -> bool:
    try:
        marker = json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        return False
    if marker.get("params") != params:
        return False
    for split, n in zip(SPLITS, (params["n_train_per_class"], params["n_val_per_class"])):
        for class_id in params["classes"]:
            folder = root / split / class_id
            if not folder.is_dir() or sum(1 for _ in folder.glob("*.png")) != n:
                return False
    return True


def _generate(out: Path, params: dict[str, Any]) -> None:
    size, seed = params["image_size"], params["seed"]
    lines = [f"{class_id} {name}\n" for class_id, name in CLASSES]
    (out / "class_names.txt").write_text("".join(lines))
    for split_id, split in enumerate(SPLITS):
        n = params[f"n_{split}_per_class"]
        for class_index, (class_id, _) in enumerate(CLASSES):
            folder = out / split / class_id
            folder.mkdir(parents=True)
            for i in range(n):
                rng = np.random.default_rng([seed, split_id, class_index, i])
                pixels = render_image(class_index, rng, size)
                Image.fromarray(pixels).save(
                    folder / f"{i:05d}.png", format="PNG", compress_level=1
                )
    marker = {"params": params, "class_names": dict(CLASSES)}
    (out / MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def make_synthetic_dataset(
    root: str | Path,
    *,
    n_train_per_class: int = 150,
    n_val_per_class: int = 40,
    image_size: int = 96,
    seed: int = 0,
) -> Path:
    """Create (or reuse) the synthetic ImageFolder data set at ``root`` and return its path.

    Same arguments give byte-identical files. If ``root`` already holds a complete set made
    with the same arguments it is returned untouched. The set is written to a temporary folder
    next to ``root`` and renamed into place, so ``root`` is never seen half-written. An existing
    ``root`` is replaced only if it is empty or holds nothing but a previous synthetic set.
    """
    if n_train_per_class < 1 or n_val_per_class < 1:
        raise ValueError("n_train_per_class and n_val_per_class must be >= 1")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")
    root = Path(root).expanduser().absolute()
    params = _params(n_train_per_class, n_val_per_class, image_size, seed)
    if _is_complete(root, params):
        logger.debug("synthetic data set at %s is up to date", root)
        return root
    if root.exists():
        if not root.is_dir():
            raise FileExistsError(f"{root} exists and is not a folder")
        entries = {p.name for p in root.iterdir()}
        if not entries <= _OWN_ENTRIES:
            raise FileExistsError(f"{root} exists and is not a synthetic data set; not replacing")

    n_images = len(CLASSES) * (n_train_per_class + n_val_per_class)
    logger.info(
        "generating synthetic data set: %d images of %dpx in %s", n_images, image_size, root
    )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the data set is meant to be shared
        _generate(tmp, params)
        if _is_complete(root, params):  # another process finished the same set meanwhile
            return root
        if root.exists():
            shutil.rmtree(root)
        try:
            os.rename(tmp, root)
        except OSError:
            # another process finished the same set first
            if not _is_complete(root, params):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return root
