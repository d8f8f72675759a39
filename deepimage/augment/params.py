"""Augmentation settings and per-image parameter sampling on discrete grids (paper Table 1).

Every augmentation draws its parameters from a finite grid, so the number of possible changes
is exact and equals the paper's Table 1 with the default settings (crop 224 of 512):

=================  ==========================================================  =========
augmentation       discrete grid (defaults)                                    changes
=================  ==========================================================  =========
colour casting     each of R, G, B shifted by an integer in [-20, 20]; the      68,920
                   all-zero shift is no change: 41^3 - 1
vignetting         40 radii where darkening starts (0.10, 0.12, ..., 0.88 of     1,960
                   the half-diagonal) x 49 corner reductions (1.5%, ..., 73.5%)
lens distortion    2 types (barrel, pincushion) x 10 degrees (|k| = 0.02 ...       260
                   0.20) x 13 stretches (-6 ... +6 steps of 3%: vertical,
                   none, horizontal)
rotation           +-1, ..., +-10 degrees                                            20
flipping           kept or mirrored                                                   2
cropping           origins (top, left) in {0, ..., S - C - 1}^2: 288^2             82,944
=================  ==========================================================  =========

Each image's draws are ``keyed_uniform(seed, epoch, row)`` uniforms, fixed columns per
augmentation, mapped to a grid point by ``level = floor(u * n)``; so parameters are a pure
function of (seed, epoch, row), whatever the batch split, the workers or a resume. Sampling
(this module) and applying (:mod:`deepimage.augment.ops`) are separate: the returned
:class:`AugmentParams` can be inspected, edited and replayed.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from deepimage.rng import Stream, keyed_uniform

PAD_MODES = ("reflect", "constant")


@dataclass(frozen=True)
class Crop:
    """Random ``C x C`` crop of the ``S x S`` image, origins on the integer grid
    ``{0, ..., S - C - 1}`` per axis (``S - C`` positions, the paper's 288 for 224 of 512);
    ``random=False`` takes the centre crop.

    ``pad > 0`` first pads the image by ``pad`` pixels per side (``pad_mode`` ``reflect``
    mirrors the border without repeating it, ``constant`` adds black) and takes origins
    ``{0, ..., S + 2 pad - C}`` of the padded image: with ``C == S`` a translation by
    ``-pad .. pad`` pixels per axis (airbench's small translations).
    """

    random: bool = True
    pad: int = 0
    pad_mode: str = "reflect"


@dataclass(frozen=True)
class Flip:
    """Horizontal mirror with probability ``p``.

    ``alternate`` derandomizes it over epochs (airbench): image ``i`` is mirrored in even
    epochs when its own keyed coin (drawn once, from epoch 0's key) falls below ``p``, and in
    odd epochs exactly when it is not, so every image is seen both ways every two epochs.
    """

    p: float = 0.5
    alternate: bool = False


@dataclass(frozen=True)
class Rotation:
    """Rotation by ``+-step, +-2 step, ..., +-steps * step`` degrees with probability ``p``."""

    p: float = 0.5
    steps: int = 10
    step: float = 1.0


@dataclass(frozen=True)
class Lens:
    """Radial lens distortion plus stretching, with probability ``p``.

    Barrel or pincushion (equally likely) of degree ``d`` in ``1..degrees``: the output pixel
    at normalised radius ``rho`` (1 at the corners) samples the source at ``rho (1 + k rho^2)``,
    ``k = +-d * k_step`` (barrel: ``k > 0``, points move toward the centre). Stretch level
    ``l`` in ``-stretches..stretches``: ``l > 0`` widens the content horizontally by
    ``1 + l * stretch_step``, ``l < 0`` vertically, ``l = 0`` does not stretch.
    """

    p: float = 0.5
    degrees: int = 10
    k_step: float = 0.02
    stretches: int = 6
    stretch_step: float = 0.03


@dataclass(frozen=True)
class Vignette:
    """Darkening of the periphery with probability ``p``.

    Brightness factor ``1 - strength * clamp((rho - radius) / (1 - radius), 0, 1)^2`` at
    normalised radius ``rho`` (0 at the centre, 1 at the corners): ``radius`` sets the area the
    effect covers (``radii`` values from ``radius_start`` in ``radius_step`` steps) and
    ``strength`` the reduction at the corners (``strength_step * 1 ... strengths``).
    """

    p: float = 0.5
    radii: int = 40
    radius_start: float = 0.10
    radius_step: float = 0.02
    strengths: int = 49
    strength_step: float = 0.015


@dataclass(frozen=True)
class ColourCast:
    """Three Boolean draws (each true with probability ``p``) choose which of R, G, B are
    altered; an altered channel gets an integer in ``[-max_shift, max_shift]`` added."""

    p: float = 0.5
    max_shift: int = 20


@dataclass(frozen=True)
class Lighting:
    """AlexNet PCA lighting with probability ``p``: add ``eigvec @ (alpha * eigval)`` (0..1
    units, times 255) with ``alpha ~ N(0, std)`` per image, from the training set's RGB PCA.
    Continuous, so not part of Table 1."""

    p: float = 0.0
    std: float = 0.1


@dataclass(frozen=True)
class AugmentConfig:
    """Probability and range of every augmentation; the defaults are the paper's full set.

    Set an augmentation's ``p`` to 0 to turn it off (``ColourCast.p`` is per channel).
    """

    crop: Crop = field(default_factory=Crop)
    flip: Flip = field(default_factory=Flip)
    rotation: Rotation = field(default_factory=Rotation)
    lens: Lens = field(default_factory=Lens)
    vignette: Vignette = field(default_factory=Vignette)
    cast: ColourCast = field(default_factory=ColourCast)
    lighting: Lighting = field(default_factory=Lighting)

    def __post_init__(self) -> None:
        for name in ("flip", "rotation", "lens", "vignette", "cast", "lighting"):
            p = getattr(self, name).p
            if not 0 <= p <= 1:
                raise ValueError(f"augmentation {name!r}: p must be in [0, 1], got {p}")
        v = self.vignette
        if (
            v.radii < 1
            or v.strengths < 1
            or not 0 <= v.radius_start + v.radius_step * (v.radii - 1) < 1
        ):
            raise ValueError("augmentation 'vignette': needs radii and strengths >= 1, radii < 1")
        if (
            self.lens.degrees < 1
            or self.lens.stretches < 0
            or self.lens.degrees * self.lens.k_step >= 1 / 3
        ):
            raise ValueError("augmentation 'lens': needs degrees >= 1, stretches >= 0, |k| < 1/3")
        if self.crop.pad < 0 or self.crop.pad_mode not in PAD_MODES:
            raise ValueError(
                f"augmentation 'crop': needs pad >= 0 and pad_mode in {PAD_MODES}, "
                f"got {self.crop.pad}, {self.crop.pad_mode!r}"
            )
        if self.rotation.steps < 1 or self.cast.max_shift < 1:
            raise ValueError("augmentations 'rotation', 'cast': need steps, max_shift >= 1")

    def replace(self, **changes: dict[str, Any] | Any) -> AugmentConfig:
        """A copy with some augmentations changed: ``replace(flip={"p": 0})`` or a new object."""
        new = {}
        for name, value in changes.items():
            current = getattr(self, name)
            new[name] = dataclasses.replace(current, **value) if isinstance(value, dict) else value
        return dataclasses.replace(self, **new)


def augment_config_from_dict(data: dict[str, dict[str, Any]] | None) -> AugmentConfig:
    """An :class:`AugmentConfig` from a mapping such as ``{"rotation": {"p": 0.3}}``."""
    cfg = AugmentConfig()
    if not data:
        return cfg
    names = {f.name for f in dataclasses.fields(AugmentConfig)}
    for name, value in data.items():
        if name not in names:
            raise ValueError(f"unknown augmentation {name!r}; known: {', '.join(sorted(names))}")
        if not isinstance(value, dict):
            raise ValueError(f"augmentation {name!r}: expected a mapping of settings")
        keys = {f.name for f in dataclasses.fields(getattr(cfg, name))}
        bad = set(value) - keys
        if bad:
            raise ValueError(f"augmentation {name!r}: unknown keys {sorted(bad)}; known {keys}")
    return cfg.replace(**data)


# --------------------------------------------------------------------------- grids


def crop_origins(size: int, crop: int, pad: int = 0) -> np.ndarray:
    """Crop origins along one axis: ``0 .. S - C - 1`` (one origin, 0, when ``S == C``);
    with ``pad``, every origin ``0 .. S + 2 pad - C`` of the padded image."""
    if crop > size:
        raise ValueError(f"crop {crop} is larger than the images ({size})")
    if pad > 0:
        return np.arange(size + 2 * pad - crop + 1, dtype=np.int64)
    return np.arange(max(size - crop, 1), dtype=np.int64)


def rotation_angles(cfg: Rotation) -> np.ndarray:
    """The non-zero angles in degrees, ascending."""
    j = np.arange(1, cfg.steps + 1, dtype=np.float64)
    return np.concatenate([-j[::-1], j]) * cfg.step


def lens_ks(cfg: Lens) -> np.ndarray:
    """Radial coefficients: pincushion (negative) then barrel (positive), zero excluded."""
    d = np.arange(1, cfg.degrees + 1, dtype=np.float64) * cfg.k_step
    return np.concatenate([-d[::-1], d])


def stretch_levels(cfg: Lens) -> np.ndarray:
    """Signed stretch amounts: negative vertical, 0 none, positive horizontal."""
    return np.arange(-cfg.stretches, cfg.stretches + 1, dtype=np.float64) * cfg.stretch_step


def vignette_radii(cfg: Vignette) -> np.ndarray:
    return cfg.radius_start + cfg.radius_step * np.arange(cfg.radii, dtype=np.float64)


def vignette_strengths(cfg: Vignette) -> np.ndarray:
    return cfg.strength_step * np.arange(1, cfg.strengths + 1, dtype=np.float64)


def cast_values(cfg: ColourCast) -> np.ndarray:
    return np.arange(-cfg.max_shift, cfg.max_shift + 1, dtype=np.float64)


def pick(u: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Grid value ``values[floor(u * n)]`` for uniforms ``u`` in [0, 1)."""
    n = len(values)
    return values[np.minimum((u * n).astype(np.int64), n - 1)]


# --------------------------------------------------------------------------- parameters


@dataclass
class AugmentParams:
    """Parameters of one batch, one row per image (CPU tensors); zero means "not applied".

    ``zoom`` is derived: the largest scale at which the warped output stays inside the crop
    window, so no border ever shows. ``cast`` and ``light`` are RGB shifts in 0..255 units.
    """

    top: torch.Tensor  # int64 (B,)  crop origin in the S x S image (padded, with Crop.pad)
    left: torch.Tensor  # int64 (B,)
    flip: torch.Tensor  # bool (B,)
    angle: torch.Tensor  # float64 (B,) degrees, counter-clockwise
    lens_k: torch.Tensor  # float64 (B,) radial coefficient, > 0 barrel
    stretch: torch.Tensor  # float64 (B,) > 0 horizontal, < 0 vertical
    zoom: torch.Tensor  # float64 (B,)
    vignette_radius: torch.Tensor  # float64 (B,)
    vignette_strength: torch.Tensor  # float64 (B,) 0: no vignette
    cast: torch.Tensor  # float64 (B, 3) integer values
    light: torch.Tensor  # float64 (B, 3)

    def __len__(self) -> int:
        return len(self.top)

    def select(self, index: Any) -> AugmentParams:
        """The parameters of some rows (an index, slice, mask or index array)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return AugmentParams(**{k: v[index] for k, v in self.as_dict().items()})

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def warps(self) -> torch.Tensor:
        """Rows whose geometry needs interpolation (rotation, lens distortion or stretch)."""
        return (self.angle != 0) | (self.lens_k != 0) | (self.stretch != 0)

    @classmethod
    def identity(cls, n: int, size: int, crop: int) -> AugmentParams:
        """Centre crop and nothing else, for ``n`` images."""
        z = np.zeros(n)
        c = (size - crop) // 2
        return cls.from_numpy(
            top=np.full(n, c), left=np.full(n, c), flip=np.zeros(n, bool), angle=z, lens_k=z,
            stretch=z, zoom=np.ones(n), vignette_radius=z, vignette_strength=z,
            cast=np.zeros((n, 3)), light=np.zeros((n, 3)),
        )  # fmt: skip

    @classmethod
    def from_numpy(cls, **arrays: np.ndarray) -> AugmentParams:
        out = {}
        for f in dataclasses.fields(cls):
            a = np.asarray(arrays[f.name])
            dtype = np.int64 if f.name in ("top", "left") else (bool if f.name == "flip" else None)
            out[f.name] = torch.from_numpy(np.array(a, dtype=dtype or np.float64))  # a copy
        return cls(**out)


def fit_zoom(angle: np.ndarray, lens_k: np.ndarray, stretch: np.ndarray, crop: int) -> np.ndarray:
    """Largest zoom keeping every output pixel centre inside the ``crop x crop`` window.

    The inverse map of an output pixel at ``p`` (pixels from the window centre) is
    ``zoom * R(angle) * Stretch * p * (1 + k rho^2)``; it is monotone in the radius, so the
    extreme points lie on the output's outer ring of pixels, which is checked exactly.
    """
    n = len(angle)
    c = (crop - 1) / 2.0
    if c <= 0:
        return np.ones(n)
    e = np.arange(crop, dtype=np.float64) - c
    ring = np.concatenate(
        [
            np.stack([e, np.full(crop, -c)], 1),
            np.stack([e, np.full(crop, c)], 1),
            np.stack([np.full(crop, -c), e], 1),
            np.stack([np.full(crop, c), e], 1),
        ]
    )  # (4C, 2) as (x, y)
    zoom = np.ones(n)
    warped = np.flatnonzero((angle != 0) | (lens_k != 0) | (stretch != 0))
    if len(warped) == 0:
        return zoom
    a = linear_part(angle[warped], stretch[warped]).reshape(-1, 2)  # (2m, 2): rows x, y
    rho2 = (ring**2).sum(1) / (2 * c * c)
    g = 1.0 + lens_k[warped, None] * rho2[None, :]  # (m, 4C)
    pts = (a @ ring.T).reshape(len(warped), 2, -1) * g[:, None, :]
    zoom[warped] = c / np.abs(pts).max(axis=(1, 2))
    return zoom


def linear_part(angle: np.ndarray, stretch: np.ndarray) -> np.ndarray:
    """``R(angle) @ diag(1 / stretch_x, 1 / stretch_y)`` per image, float64 ``(n, 2, 2)``."""
    t = np.deg2rad(angle)
    cos, sin = np.cos(t), np.sin(t)
    sx = np.where(stretch > 0, 1.0 / (1.0 + np.abs(stretch)), 1.0)
    sy = np.where(stretch < 0, 1.0 / (1.0 + np.abs(stretch)), 1.0)
    a = np.empty((len(t), 2, 2))
    a[:, 0, 0], a[:, 0, 1] = cos * sx, -sin * sy
    a[:, 1, 0], a[:, 1, 1] = sin * sx, cos * sy
    return a


def _normal(u1: np.ndarray, u2: np.ndarray) -> np.ndarray:
    """Standard normal draws from two uniforms in [0, 1) (Box-Muller)."""
    return np.sqrt(-2.0 * np.log1p(-u1)) * np.cos(2.0 * math.pi * u2)


# uniforms each augmentation draws per image, in fixed columns of one keyed draw (so changing
# one augmentation's settings never changes another's draws)
UNIFORMS = {"crop": 2, "flip": 1, "rotation": 2, "lens": 3, "vignette": 3, "cast": 6, "lighting": 7}
_BOUNDS = np.cumsum([0, *UNIFORMS.values()])
_COLUMNS = {name: (int(_BOUNDS[i]), int(_BOUNDS[i + 1])) for i, name in enumerate(UNIFORMS)}
_TOTAL = int(_BOUNDS[-1])


def draw_uniforms(seed: int, epoch: int, rows: np.ndarray | list[int]) -> dict[str, np.ndarray]:
    """Each augmentation's keyed uniforms for ``rows``: ``{name: (n, k)}``, a pure function of
    (seed, epoch, row), one ``keyed_uniform`` stream per augmentation."""
    u = keyed_uniform(seed, epoch, np.asarray(rows, dtype=np.int64), _TOTAL, stream=Stream.AUGMENT)
    return {name: u[:, a:b] for name, (a, b) in _COLUMNS.items()}


def params_from_uniforms(
    cfg: AugmentConfig,
    u: dict[str, np.ndarray],
    size: int,
    crop: int,
    stats: dict[str, Any] | None = None,
) -> AugmentParams:
    """Map each augmentation's uniforms (see :data:`UNIFORMS`) to its grid point.

    A uniform ``u[:, 0] < p`` decides whether an augmentation applies; ``floor(u * n)`` picks
    one of ``n`` grid values. Enumerating the uniforms enumerates the sampler's support
    (:mod:`deepimage.augment.table`).
    """
    n = len(u["flip"])
    origins = crop_origins(size, crop, cfg.crop.pad)
    if cfg.crop.random:
        top, left = pick(u["crop"][:, 0], origins), pick(u["crop"][:, 1], origins)
    else:
        top = left = np.full(n, cfg.crop.pad + (size - crop) // 2, dtype=np.int64)

    flip = u["flip"][:, 0] < cfg.flip.p

    ur = u["rotation"]
    angle = np.where(ur[:, 0] < cfg.rotation.p, pick(ur[:, 1], rotation_angles(cfg.rotation)), 0.0)

    ul = u["lens"]
    on = ul[:, 0] < cfg.lens.p
    lens_k = np.where(on, pick(ul[:, 1], lens_ks(cfg.lens)), 0.0)
    stretch = np.where(on, pick(ul[:, 2], stretch_levels(cfg.lens)), 0.0)

    uv = u["vignette"]
    on = uv[:, 0] < cfg.vignette.p
    radius = np.where(on, pick(uv[:, 1], vignette_radii(cfg.vignette)), 0.0)
    strength = np.where(on, pick(uv[:, 2], vignette_strengths(cfg.vignette)), 0.0)

    uc = u["cast"]
    cast = np.where(uc[:, :3] < cfg.cast.p, pick(uc[:, 3:], cast_values(cfg.cast)), 0.0)

    light = np.zeros((n, 3))
    if cfg.lighting.p > 0:
        if stats is None or "eigval" not in stats:
            raise ValueError("PCA lighting needs the store's stats (eigval, eigvec)")
        ul = u["lighting"]
        alpha = cfg.lighting.std * _normal(ul[:, 1:4], ul[:, 4:7])
        alpha = np.where(ul[:, :1] < cfg.lighting.p, alpha, 0.0)
        eigval = np.asarray(stats["eigval"], dtype=np.float64)
        eigvec = np.asarray(stats["eigvec"], dtype=np.float64)
        light = 255.0 * (alpha * eigval[None, :]) @ eigvec.T

    zoom = fit_zoom(angle, lens_k, stretch, crop)
    return AugmentParams.from_numpy(
        top=top, left=left, flip=flip, angle=angle, lens_k=lens_k, stretch=stretch, zoom=zoom,
        vignette_radius=radius, vignette_strength=strength, cast=cast, light=light,
    )  # fmt: skip


def sample_params(
    cfg: AugmentConfig,
    seed: int,
    epoch: int,
    rows: np.ndarray | list[int],
    size: int,
    crop: int,
    stats: dict[str, Any] | None = None,
) -> AugmentParams:
    """Parameters for the images ``rows`` of ``epoch``: a pure function of (seed, epoch, row).

    ``stats`` are the store's pixel statistics (``eigval``, ``eigvec``), needed only when PCA
    lighting is on. An alternating flip (:class:`Flip`) takes its coin from epoch 0's key and
    inverts it in odd epochs.
    """
    u = draw_uniforms(seed, epoch, rows)
    if cfg.flip.alternate and epoch != 0:
        u["flip"] = draw_uniforms(seed, 0, rows)["flip"]
    params = params_from_uniforms(cfg, u, size, crop, stats)
    if cfg.flip.alternate and epoch % 2 == 1:
        params.flip = ~params.flip
    return params
