"""Robustness under image corruptions (paper 5.5), in the manner of ImageNet-C.

Each corruption maps a batch of ``(B, S, S, 3)`` uint8 source images to corrupted uint8
images of the same shape at a severity 1..5, before the centre crop or dense view. Colour
cast, vignetting, lens distortion and rotation reuse the training augmentation's pure
functions (:mod:`deepimage.augment.ops`) at parameters that grow with the severity, from
inside the training range (severity 1-2) to well beyond it (4-5); blur and noise are plain
torch. Per-image randomness (signs, noise) comes from ``(seed, row)``, so a corrupted image
is the same whatever batch it is in and however often it is evaluated.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from deepimage.augment.ops import geometry, photometric
from deepimage.augment.params import AugmentParams, fit_zoom
from deepimage.rng import row_generators

SEVERITIES = (1, 2, 3, 4, 5)
# parameter per severity 1..5; training's "deepimage" preset reaches cast 20, vignette
# strength 0.74, |k| 0.2 and 10 degrees
CAST = (10.0, 20.0, 30.0, 45.0, 60.0)  # RGB shift, 0..255 units, random sign per channel
VIGNETTE = (0.2, 0.35, 0.5, 0.65, 0.8)  # strength, radius 0.1
DISTORTION = (0.05, 0.1, 0.15, 0.2, 0.3)  # lens k, random sign (barrel or pincushion)
ROTATION = (5.0, 10.0, 15.0, 22.5, 30.0)  # degrees, random sign, zoomed to cover
BLUR = (1.0, 2.0, 3.0, 4.0, 6.0)  # Gaussian sigma in pixels, times S/224 above 224 (ImageNet-C)
NOISE = (0.08, 0.12, 0.18, 0.26, 0.38)  # Gaussian noise std, 0..1 units (ImageNet-C)


Corruption = Callable[[torch.Tensor, np.ndarray, int, int], torch.Tensor]


def _signs(seed: int, rows: np.ndarray, k: int) -> np.ndarray:
    """``(n, k)`` of +-1, a pure function of (seed, row)."""
    return np.stack([g.choice([-1.0, 1.0], size=k) for g in row_generators(seed, rows)])


def _params(n: int, size: int, **values: np.ndarray) -> AugmentParams:
    """Whole-image parameters (crop = S, no flip) with some fields set."""
    base = AugmentParams.identity(n, size, size).as_dict()
    arrays = {k: v.numpy() for k, v in base.items()}
    arrays.update(values)
    arrays["zoom"] = fit_zoom(arrays["angle"], arrays["lens_k"], arrays["stretch"], size)
    return AugmentParams.from_numpy(**arrays)


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.float().clamp_(0, 255).round_().to(torch.uint8)


def _photometric(images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
    # mean 0 and std 1/255 make the normalisation the identity on the 0..255 scale
    return _to_uint8(photometric(images, params, (0.0, 0.0, 0.0), (1 / 255,) * 3))


def cast(images: torch.Tensor, rows: np.ndarray, severity: int, seed: int) -> torch.Tensor:
    """A colour cast: every channel shifted by the severity's amount, with a random sign."""
    shift = _signs(seed, rows, 3) * CAST[severity - 1]
    return _photometric(images, _params(len(images), images.shape[1], cast=shift))


def vignette(images: torch.Tensor, rows: np.ndarray, severity: int, seed: int) -> torch.Tensor:
    """Darkened corners: brightness falls by the severity's strength towards the corners."""
    n = len(images)
    params = _params(n, images.shape[1], vignette_radius=np.full(n, 0.1),
                     vignette_strength=np.full(n, VIGNETTE[severity - 1]))  # fmt: skip
    return _photometric(images, params)


def _warped(images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
    return _to_uint8(geometry(images, params, images.shape[1]))


def distortion(images: torch.Tensor, rows: np.ndarray, severity: int, seed: int) -> torch.Tensor:
    """Lens distortion, barrel or pincushion at random, zoomed so no border shows."""
    k = _signs(seed, rows, 1)[:, 0] * DISTORTION[severity - 1]
    return _warped(images, _params(len(images), images.shape[1], lens_k=k))


def rotation(images: torch.Tensor, rows: np.ndarray, severity: int, seed: int) -> torch.Tensor:
    """Rotation either way by the severity's angle, zoomed so no border shows."""
    angle = _signs(seed, rows, 1)[:, 0] * ROTATION[severity - 1]
    return _warped(images, _params(len(images), images.shape[1], angle=angle))


def blur(images: torch.Tensor, rows: np.ndarray, severity: int, seed: int) -> torch.Tensor:
    """Gaussian blur: ImageNet-C's sigmas in pixels, scaled up with images larger than 224."""
    size = images.shape[1]
    sigma = BLUR[severity - 1] * max(1.0, size / 224)
    radius = max(1, int(np.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32, device=images.device)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = (kernel / kernel.sum()).repeat(3, 1, 1, 1)  # (3, 1, 1, K), depthwise
    x = images.permute(0, 3, 1, 2).float()
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), kernel, groups=3)
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), kernel.transpose(2, 3), groups=3)
    return _to_uint8(x.permute(0, 2, 3, 1))


def noise(images: torch.Tensor, rows: np.ndarray, severity: int, seed: int) -> torch.Tensor:
    """Additive Gaussian noise, independent per pixel, seeded per image."""
    std = NOISE[severity - 1] * 255
    shape = tuple(images.shape[1:])
    draws = [torch.from_numpy(g.standard_normal(shape, dtype=np.float32)) for g in
             row_generators(seed, rows)]  # fmt: skip
    z = torch.stack(draws).to(images.device) if draws else torch.zeros_like(images, dtype=float)
    return _to_uint8(images.float() + std * z)


CORRUPTIONS: dict[str, Corruption] = {
    "cast": cast,
    "vignette": vignette,
    "distortion": distortion,
    "rotation": rotation,
    "blur": blur,
    "noise": noise,
}


def parse_corruptions(text: str | Sequence[str]) -> list[str]:
    """``"cast,blur"`` (or a list, or ``"all"``) as known corruption names, in order."""
    items = text.split(",") if isinstance(text, str) else [p for t in text for p in t.split(",")]
    names = [t.strip() for t in items if t.strip()]
    if names == ["all"]:
        return list(CORRUPTIONS)
    unknown = [n for n in names if n not in CORRUPTIONS]
    if unknown or not names:
        raise ValueError(
            f"unknown corruption {unknown[0] if unknown else '(none)'!r}; "
            f"known: {', '.join(CORRUPTIONS)}, all"
        )
    return list(dict.fromkeys(names))


def parse_severities(text: str | Sequence[int | str]) -> list[int]:
    """``"1..5"``, ``"3"``, ``"1,3,5"`` or a list, as severities in 1..5."""
    if isinstance(text, str):
        if ".." in text:
            lo, _, hi = text.partition("..")
            values = list(range(int(lo), int(hi) + 1)) if lo.isdigit() and hi.isdigit() else []
        else:
            values = [int(v) for v in text.split(",") if v.strip().isdigit()]
    else:
        values = [int(v) for v in text]
    if not values or any(v not in SEVERITIES for v in values):
        raise ValueError(
            f"--severity: expected severities in 1..5 such as '1..5' or '3', got {text!r}"
        )
    return sorted(set(values))


def corrupt(
    images: torch.Tensor, rows: np.ndarray | torch.Tensor, name: str, severity: int, seed: int = 0
) -> torch.Tensor:
    """``images`` (B, S, S, 3) uint8 under corruption ``name`` at ``severity`` (1..5)."""
    if severity not in SEVERITIES:
        raise ValueError(f"corruption severity must be in 1..5, got {severity}")
    rows = rows.numpy() if isinstance(rows, torch.Tensor) else np.asarray(rows)
    return CORRUPTIONS[name](images, rows, severity, seed)


def summarise(
    clean: float, table: dict[str, dict[int, float]], severities: Sequence[int]
) -> dict[str, object]:
    """Accuracy per corruption and severity, mean per corruption, and the overall mean."""
    per = {name: float(np.mean([row[s] for s in severities])) for name, row in table.items()}
    return {
        "severities": list(severities),
        "clean_top1": clean,
        "top1": {name: {str(s): row[s] for s in severities} for name, row in table.items()},
        "mean_top1": per,
        "mean": float(np.mean(list(per.values()))) if per else None,
    }


def format_table(summary: dict[str, object]) -> str:
    """The corruption table as aligned text: one row per corruption, one column per severity."""
    severities = summary["severities"]
    head = (
        f"{'corruption':<12}" + "".join(f"{'s' + str(s):>8}" for s in severities) + f"{'mean':>8}"
    )
    lines = [
        head,
        f"{'clean':<12}" + " " * 8 * len(severities) + f"{100 * summary['clean_top1']:>7.2f}%",
    ]
    for name, row in summary["top1"].items():
        cells = "".join(f"{100 * row[str(s)]:>7.2f}%" for s in severities)
        lines.append(f"{name:<12}{cells}{100 * summary['mean_top1'][name]:>7.2f}%")
    lines.append(f"{'mean':<12}" + " " * 8 * len(severities) + f"{100 * summary['mean']:>7.2f}%")
    return "\n".join(lines)
