"""The number of possible changes of each augmentation (paper Table 1), counted by enumerating
the sampler: every cell of each augmentation's uniforms is fed through
:func:`~deepimage.augment.params.params_from_uniforms` and the distinct results are counted.

Rotation, lens distortion, vignetting and colour casting count the changes that differ from
the unaltered image (the sampler's "applied" branch; a cast of 0 on all three channels is no
change); flipping counts both outcomes and cropping every origin, as in the paper.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from deepimage.augment.params import (
    UNIFORMS,
    AugmentConfig,
    AugmentParams,
    cast_values,
    crop_origins,
    lens_ks,
    params_from_uniforms,
    rotation_angles,
    stretch_levels,
    vignette_radii,
    vignette_strengths,
)

NAMES = {
    "cast": "Color casting",
    "vignette": "Vignetting",
    "lens": "Lens distortion",
    "rotation": "Rotation",
    "flip": "Flipping",
    "crop": "Cropping",
}
PAPER = {"cast": 68920, "vignette": 1960, "lens": 260, "rotation": 20, "flip": 2, "crop": 82944}


def _cells(n: int) -> np.ndarray:
    """Midpoints of ``n`` equal cells of [0, 1)."""
    return (np.arange(n) + 0.5) / n


def _bool_cells(p: float) -> np.ndarray:
    """One uniform on each side of ``p``, where both sides exist."""
    return np.array([p / 2, (1 + p) / 2]) if 0 < p < 1 else np.array([0.5])


def enumerate_support(
    cfg: AugmentConfig, name: str, size: int, crop: int
) -> tuple[AugmentParams, np.ndarray]:
    """The sampler's results over every cell of augmentation ``name``'s uniforms (the others
    at "not applied"), and a column of its parameters per result."""
    axes: list[np.ndarray]
    if name == "crop":
        n = len(crop_origins(size, crop, cfg.crop.pad))
        axes = [_cells(n), _cells(n)]
    elif name == "flip":
        axes = [_bool_cells(cfg.flip.p)]
    elif name == "rotation":
        axes = [np.zeros(1), _cells(len(rotation_angles(cfg.rotation)))]
    elif name == "lens":
        axes = [np.zeros(1), _cells(len(lens_ks(cfg.lens))), _cells(len(stretch_levels(cfg.lens)))]
    elif name == "vignette":
        v = cfg.vignette
        axes = [np.zeros(1), _cells(len(vignette_radii(v))), _cells(len(vignette_strengths(v)))]
    elif name == "cast":
        b, vals = _bool_cells(cfg.cast.p), _cells(len(cast_values(cfg.cast)))
        axes = [b, b, b, vals, vals, vals]
    else:
        raise ValueError(f"no Table 1 entry for {name!r}; known: {', '.join(NAMES)}")
    grid = np.array(list(itertools.product(*axes)), dtype=np.float64)
    m = len(grid)
    u = {k: np.full((m, d), 0.999999) for k, d in UNIFORMS.items()}  # "not applied"
    u[name] = grid
    params = params_from_uniforms(cfg, u, size, crop)
    columns = {
        "crop": ["top", "left"],
        "flip": ["flip"],
        "rotation": ["angle"],
        "lens": ["lens_k", "stretch"],
        "vignette": ["vignette_radius", "vignette_strength"],
        "cast": ["cast"],
    }[name]
    values = np.concatenate(
        [getattr(params, c).numpy().astype(np.float64).reshape(m, -1) for c in columns], 1
    )
    return params, values


def count(cfg: AugmentConfig, name: str, size: int = 512, crop: int = 224) -> int:
    """Distinct changes augmentation ``name`` can make (see the module docstring)."""
    _, values = enumerate_support(cfg, name, size, crop)
    distinct = np.unique(values, axis=0)
    if name in ("crop", "flip"):
        return len(distinct)
    return int((distinct != 0).any(1).sum())  # the unaltered image is no change


def table(cfg: AugmentConfig | None = None, size: int = 512, crop: int = 224) -> dict[str, int]:
    """Table 1 for ``cfg`` (default: the paper's set) with ``crop x crop`` crops of
    ``size x size`` images: ``{name: count}`` plus ``"product"``."""
    cfg = cfg or AugmentConfig()
    counts = {name: count(cfg, name, size, crop) for name in NAMES}
    counts["product"] = math.prod(counts.values())
    return counts


def format_table(counts: dict[str, int], size: int = 512, crop: int = 224) -> str:
    lines = [f"{'Augmentation':<16} {'possible changes':>22}   paper"]
    for name, label in NAMES.items():
        paper = f"{PAPER[name]:,}"
        lines.append(f"{label:<16} {counts[name]:>22,}   {paper}")
    lines.append(f"{'Product':<16} {counts['product']:>22,}   {math.prod(PAPER.values()):,}")
    lines.append(f"(cropping: {crop}x{crop} crops of a {size}x{size} image)")
    return "\n".join(lines)
