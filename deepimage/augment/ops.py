"""Pure functions applying :class:`~deepimage.augment.params.AugmentParams` to images.

Geometry: crop, flip, rotation, stretch and lens distortion compose into one sampling grid
per image, so each output pixel is interpolated once (bilinear ``F.grid_sample``). The grid
of output pixel ``p`` (pixels from the output centre, x negated when mirrored) is

    source = window_centre + zoom * R(angle) * Stretch * p * (1 + k rho(p)^2)

where ``rho`` is 1 at the output corners; ``zoom`` keeps every sample inside the crop window,
so the output is always fully covered by image content. Images whose only geometry is the
crop and the flip are copied exactly, without interpolation.

Photometry: vignetting, colour cast, PCA lighting, clipping to 0..255 and the model's
normalisation run as one pass per image, written straight into the channels_last output.

Layout: an ``(n, C, C, 3)`` image is handled as ``(n, C, 3C)`` rows, and per-channel or
per-pixel factors as broadcast rows of length ``3C`` (grids as ``2C``), so no elementwise
loop runs over an innermost dimension of 3. On CPU images are processed one at a time: the
intermediates stay in cache and an image's result is bitwise the same whatever batch it is
in. On other devices the batch is processed at once.

Backends: ``torch`` (the code here; the device path, CUDA included) and ``cv2``
(:mod:`deepimage.augment.cv_backend`: OpenCV's warps and vectorised photometry, about twice
as fast per image on CPU, equal up to rounding the warped crop to uint8). ``auto`` picks
``cv2`` for CPU tensors when OpenCV is importable, else ``torch``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from deepimage.augment.params import AugmentParams, linear_part

BACKENDS = ("auto", "torch", "cv2")


@functools.lru_cache(maxsize=1)
def _have_cv2() -> bool:
    try:
        import cv2  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """``torch`` or ``cv2`` for images on ``device``: ``auto`` (or None) is ``cv2`` on CPU
    when OpenCV is importable, else ``torch``."""
    if backend in (None, "auto"):
        return "cv2" if device.type == "cpu" and _have_cv2() else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"unknown augmentation backend {backend!r}; known: {', '.join(BACKENDS)}")
    if backend == "cv2" and device.type != "cpu":
        raise ValueError(f"the cv2 augmentation backend runs on CPU, not {device.type}")
    return backend


@functools.lru_cache(maxsize=16)
def _base(crop: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Cached per-size maps: ``rho`` (C, C); interleaved grid bases ``p`` = (x, y),
    ``p_swapped`` = (y, x) and both times ``rho^2``, as (C, 2C); ``rho`` per channel (C, 3C)."""
    c = (crop - 1) / 2.0
    e = torch.arange(crop, dtype=torch.float64) - c
    px, py = e[None, :].expand(crop, crop), e[:, None].expand(crop, crop)
    rho2 = (px**2 + py**2) / max(2 * c * c, 1e-12)
    f32 = dict(dtype=torch.float32, device=device)
    return {
        "rho": rho2.sqrt().to(**f32),
        "p": torch.stack([px, py], -1).reshape(crop, 2 * crop).to(**f32),
        "p_swapped": torch.stack([py, px], -1).reshape(crop, 2 * crop).to(**f32),
        "p_rho2": (torch.stack([px, py], -1) * rho2[..., None]).reshape(crop, -1).to(**f32),
        "p_swapped_rho2": (torch.stack([py, px], -1) * rho2[..., None]).reshape(crop, -1).to(**f32),
        "rho_rgb": rho2.sqrt().repeat_interleave(3, 1).to(**f32),
    }


# --------------------------------------------------------------------------- geometry


def pad_images(images: torch.Tensor, pad: int, mode: str = "reflect") -> torch.Tensor:
    """``(n, S, S, 3)`` images padded by ``pad`` pixels per side to ``(n, S + 2 pad, ...)``,
    any dtype, on their device: ``reflect`` mirrors about the border pixel (not repeating
    it, as ``numpy.pad``'s ``reflect``), ``constant`` adds zeros."""
    if pad <= 0:
        return images
    n, h, w = images.shape[:3]
    if mode == "constant":
        out = images.new_zeros((n, h + 2 * pad, w + 2 * pad, *images.shape[3:]))
        out[:, pad : pad + h, pad : pad + w] = images
        return out
    if mode != "reflect":
        raise ValueError(f"unknown pad mode {mode!r}; known: reflect, constant")
    if pad >= min(h, w):
        raise ValueError(f"reflect padding {pad} needs images larger than {pad} pixels")

    def index(length: int) -> torch.Tensor:
        i = torch.arange(-pad, length + pad, device=images.device).abs()
        return torch.where(i >= length, 2 * (length - 1) - i, i)

    return images[:, index(h)][:, :, index(w)]


def grid_coefficients(
    params: AugmentParams,
    crop: int,
    scale: np.ndarray | None = None,
    offset: np.ndarray | None = None,
    in_size: tuple[int | np.ndarray, int | np.ndarray] | None = None,
) -> np.ndarray:
    """Per-image ``(n, 7)`` float64 ``[a00, a01, a10, a11, bx, by, k]`` of the sampling grid.

    ``grid = A @ (p (1 + k rho^2)) + b`` in ``grid_sample``'s normalised coordinates
    (``align_corners=True``) of the input tensor. The input's pixel coordinates are
    ``scale * X + offset`` (per axis, ``(n, 2)`` as x, y) of the ``S x S`` image's ``X``; the
    default input is the crop window itself (``scale = 1``, ``offset = -origin``, ``C x C``);
    ``in_size`` is the input's (height, width), one for all or one per image.
    """
    n = len(params)
    c = (crop - 1) / 2.0
    top = params.top.numpy().astype(np.float64)
    left = params.left.numpy().astype(np.float64)
    if scale is None or offset is None or in_size is None:
        scale = np.ones((n, 2))
        offset = -np.stack([left, top], 1)
        in_size = (crop, crop)
    h_in, w_in = np.asarray(in_size[0], np.float64), np.asarray(in_size[1], np.float64)
    norm = 2.0 / np.maximum(np.stack([w_in - 1, h_in - 1], -1), 1.0)  # x, y: (2,) or (n, 2)
    a = linear_part(params.angle.numpy(), params.stretch.numpy())
    a = a * params.zoom.numpy()[:, None, None]
    a[:, :, 0] *= np.where(params.flip.numpy(), -1.0, 1.0)[:, None]
    a = a * (scale * norm)[:, :, None]
    centre = np.stack([left + c, top + c], 1)
    b = (scale * centre + offset) * norm - 1.0
    return np.concatenate([a.reshape(n, 4), b, params.lens_k.numpy()[:, None]], 1)


def _grid_rows(coef: np.ndarray, crop: int, device: torch.device) -> torch.Tensor:
    """``(5, n, 1, 2C)`` rows of the grid's coefficients: the diagonal and cross terms, the
    shift, and the diagonal and cross terms times ``k``."""
    n = len(coef)
    rows = np.empty((5, n, 1, 2 * crop), dtype=np.float32)
    rows[0] = np.tile(coef[:, [0, 3]], crop)[:, None]  # a00, a11: times (px, py)
    rows[1] = np.tile(coef[:, [1, 2]], crop)[:, None]  # a01, a10: times (py, px)
    rows[2] = np.tile(coef[:, [4, 5]], crop)[:, None]  # bx, by
    rows[3] = rows[0] * coef[:, 6, None, None]
    rows[4] = rows[1] * coef[:, 6, None, None]
    return torch.from_numpy(rows).to(device)


def _grid(rows: torch.Tensor, k: np.ndarray, crop: int) -> torch.Tensor:
    """``shift + diag p + cross p' + k (diag p rho^2 + cross p' rho^2)`` as (n, C, C, 2)."""
    base = _base(crop, rows.device)
    diag, cross, shift, diag_k, cross_k = rows
    grid = torch.addcmul(shift, base["p"], diag).addcmul_(base["p_swapped"], cross)
    if k.any():
        grid.addcmul_(base["p_rho2"], diag_k).addcmul_(base["p_swapped_rho2"], cross_k)
    return grid.view(len(k), crop, crop, 2)


def sampling_grid(coef: np.ndarray, crop: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``(n, C, C, 2)`` float32 grid from :func:`grid_coefficients`."""
    return _grid(_grid_rows(coef, crop, torch.device(device)), coef[:, 6], crop)


def crop_windows(
    images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, crop: int, flip: torch.Tensor
) -> torch.Tensor:
    """Exact ``(n, C, C, 3)`` uint8 crops of ``(n, S, S, 3)`` images, mirrored where ``flip``."""
    dev = images.device
    if len(images) == 1:
        t, lf = int(top[0]), int(left[0])
        w = images[:, t : t + crop, lf : lf + crop]
        return w.flip(2) if bool(flip[0]) else w
    ar = torch.arange(crop, device=dev)
    rows = top.to(dev)[:, None] + ar[None, :]
    cols = left.to(dev)[:, None] + ar[None, :]
    cols = torch.where(flip.to(dev)[:, None], cols.flip(1), cols)
    batch = torch.arange(len(images), device=dev)[:, None, None]
    return images[batch, rows[:, :, None], cols[:, None, :]]


def warp(
    images: torch.Tensor, coef: np.ndarray, crop: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Bilinear warp of ``(n, H, W, 3)`` uint8 inputs by :func:`grid_coefficients`: float32
    ``(n, C, C, 3)`` in 0..255 (border samples clamp, though the zoom keeps all inside)."""
    return _warp(images, sampling_grid(coef, crop, images.device), out)


def _warp(images: torch.Tensor, grid: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    x = images.permute(0, 3, 1, 2).float()
    y = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)
    if out is None:
        return y.permute(0, 2, 3, 1).contiguous()
    return out.copy_(y.permute(0, 2, 3, 1))


def _geometry(
    images: torch.Tensor, params: AugmentParams, coef: np.ndarray, warps: np.ndarray, crop: int
) -> torch.Tensor:
    no_flip = torch.zeros(len(images), dtype=torch.bool)
    if not warps.any():
        return crop_windows(images, params.top, params.left, crop, params.flip)
    if warps.all():
        return warp(crop_windows(images, params.top, params.left, crop, no_flip), coef, crop)
    out = torch.empty((len(images), crop, crop, 3), dtype=torch.float32, device=images.device)
    for mask in (warps, ~warps):
        idx = torch.from_numpy(np.flatnonzero(mask))
        on_dev = idx.to(images.device)
        sub = _geometry(images[on_dev], params.select(idx), coef[mask], mask[mask], crop)
        out[on_dev] = sub.float()
    return out


def geometry(images: torch.Tensor, params: AugmentParams, crop: int) -> torch.Tensor:
    """Crop, flip and warp ``(n, S, S, 3)`` uint8 images to ``(n, C, C, 3)``: the exact uint8
    crops when no image needs interpolation, else float32 in 0..255."""
    coef = grid_coefficients(params, crop)
    return _geometry(images, params, coef, params.warps().numpy(), crop)


# --------------------------------------------------------------------------- photometry


def vignette_factor(
    radius: torch.Tensor, strength: torch.Tensor, crop: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """``(n, C, C)`` brightness factors ``1 - s * clamp((rho - r0) / (1 - r0), 0, 1)^2``."""
    rho = _base(crop, torch.device(device))["rho"]
    return _vignette(rho, radius, strength)


def _vignette(rho: torch.Tensor, radius: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
    r0 = radius.to(rho.device, torch.float32)[:, None, None]
    s = strength.to(rho.device, torch.float32)[:, None, None]
    t = torch.addcmul(-r0 / (1 - r0), rho, 1 / (1 - r0)).clamp_(0, 1)
    return t.mul_(t).mul_(-s).add_(1.0)


@functools.lru_cache(maxsize=64)
def _ramp_rgb(crop: int, radius: float, device: torch.device) -> torch.Tensor:
    """``clamp((rho - r0) / (1 - r0), 0, 1)^2`` as (C, 3C) rows, cached per radius."""
    t = _base(crop, device)["rho_rgb"].sub(radius).div_(1.0 - radius).clamp_(0, 1)
    return t.mul_(t)


class _Normalise:
    """Per-channel ``scale`` and ``shift`` of the model normalisation as (3C,) rows."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.scale = np.array([1.0 / (255.0 * s) for s in std], dtype=np.float32)
        self.shift = np.array([-m / s for m, s in zip(mean, std)], dtype=np.float32)
        self._rows: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}
        self._matrix: np.ndarray | None = None

    def matrix(self) -> np.ndarray:
        """``(3, 4)`` float32 ``[diag(scale) | shift]`` (the cv2 backend's normalisation)."""
        if self._matrix is None:
            from deepimage.augment.cv_backend import normalise_matrix

            self._matrix = normalise_matrix(self.scale, self.shift)
        return self._matrix

    def rows(self, crop: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (crop, device)
        if key not in self._rows:
            self._rows[key] = (
                torch.from_numpy(np.tile(self.scale, crop)).to(device),
                torch.from_numpy(np.tile(self.shift, crop)).to(device),
            )
        return self._rows[key]


def _rgb_rows(params: AugmentParams, crop: int, device: torch.device) -> torch.Tensor:
    """``(n, 1, 3C)`` rows of each image's RGB shift (cast plus lighting)."""
    rgb = (params.cast + params.light).numpy().astype(np.float32)
    return torch.from_numpy(np.tile(rgb, crop)[:, None]).to(device)


def _photometric(
    x: torch.Tensor,
    rgb_rows: torch.Tensor | None,
    radius: np.ndarray,
    strength: np.ndarray,
    norm: _Normalise,
    out: torch.Tensor,
) -> torch.Tensor:
    """``x`` and ``out`` (n, C, 3C); ``rgb_rows`` (n, 1, 3C) or None when all zero;
    ``radius`` and ``strength`` (n,) numpy."""
    n, crop, dev = x.shape[0], x.shape[1], x.device
    scale, shift = norm.rows(crop, dev)
    has_vig = bool(strength.any())
    if rgb_rows is None and not has_vig:
        return torch.addcmul(shift, x, scale, out=out)
    if not has_vig:
        y = torch.add(x, rgb_rows, out=out if x.dtype == torch.float32 else None)
    elif n == 1 and dev.type == "cpu":  # x * (1 - s ramp) + rgb, the ramp cached
        ramp = _ramp_rgb(crop, float(radius[0]), dev)
        base = rgb_rows if rgb_rows is not None else torch.zeros((), device=dev)
        y = torch.addcmul(base, x, ramp, value=-float(strength[0])).add_(x)
    else:
        rho = _base(crop, dev)["rho_rgb"]
        v = _vignette(rho, torch.from_numpy(radius), torch.from_numpy(strength))
        y = torch.addcmul(rgb_rows, x, v) if rgb_rows is not None else x * v
    y.clamp_(0, 255)
    return torch.addcmul(shift, y, scale, out=out)


def _rgb(params: AugmentParams) -> np.ndarray:
    return (params.cast + params.light).numpy()


def photometric(
    x: torch.Tensor,
    params: AugmentParams,
    mean: Sequence[float],
    std: Sequence[float],
) -> torch.Tensor:
    """Vignette, colour cast, PCA lighting, clip to 0..255 and normalise ``(n, C, C, 3)``
    images (uint8 or float 0..255) into float32 ``(n, C, C, 3)``:

    ``(clip(x * vignette + cast + light, 0, 255) / 255 - mean) / std``
    """
    n, crop = x.shape[0], x.shape[1]
    out = torch.empty((n, crop, crop, 3), dtype=torch.float32, device=x.device)
    rgb = _rgb_rows(params, crop, x.device) if bool(_rgb(params).any()) else None
    _photometric(
        x.reshape(n, crop, 3 * crop),
        rgb,
        params.vignette_radius.numpy(),
        params.vignette_strength.numpy(),
        _Normalise(mean, std),
        out.view(n, crop, 3 * crop),
    )
    return out


# --------------------------------------------------------------------------- the pipeline


def apply_params(
    images: torch.Tensor,
    params: AugmentParams,
    crop: int,
    mean: Sequence[float],
    std: Sequence[float],
    norm: _Normalise | None = None,
    out: torch.Tensor | None = None,
    per_image: bool | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """The whole augmentation of ``(B, S, S, 3)`` uint8 images: float32 ``(B, 3, C, C)``
    normalised, channels_last in memory (written into ``out``, ``(B, C, C, 3)``, if given).

    ``backend`` as :func:`resolve_backend`. On the torch backend ``per_image`` (default: on
    CPU only) processes one image at a time instead of the batch.
    """
    b, dev = len(images), images.device
    norm = norm or _Normalise(mean, std)
    if out is None:
        out = torch.empty((b, crop, crop, 3), dtype=torch.float32, device=dev)
    if resolve_backend(backend, dev) == "cv2":
        pixels = images.numpy()
        top, left = params.top.numpy(), params.left.numpy()
        crops = [pixels[i, t : t + crop, lf : lf + crop] for i, t, lf in zip(range(b), top, left)]
        return _apply_crops_cv2(crops, params, crop, norm, out)
    rows_out = out.view(b, crop, 3 * crop)
    coef = grid_coefficients(params, crop)
    warps = params.warps().numpy()
    has_rgb = _rgb(params).any(1)
    rgb = _rgb_rows(params, crop, dev) if has_rgb.any() else None
    radius = params.vignette_radius.numpy()
    strength = params.vignette_strength.numpy()
    if not (dev.type == "cpu" if per_image is None else per_image):
        x = _geometry(images, params, coef, warps, crop)
        _photometric(x.reshape(b, crop, 3 * crop), rgb, radius, strength, norm, rows_out)
        return out.permute(0, 3, 1, 2)
    grid_rows = _grid_rows(coef, crop, dev)
    top, left, flip = params.top.numpy(), params.left.numpy(), params.flip.numpy()
    for i in range(b):
        t, lf = int(top[i]), int(left[i])
        s = slice(i, i + 1)
        win = images[s, t : t + crop, lf : lf + crop]
        if warps[i]:  # warped into the output, then the photometric pass there in place
            x = _warp(win, _grid(grid_rows[:, s], coef[s, 6], crop), out=out[s])
        else:
            x = win.flip(2) if flip[i] else win
        rgb_i = rgb[s] if has_rgb[i] else None
        _photometric(x.reshape(1, crop, 3 * crop), rgb_i, radius[s], strength[s], norm, rows_out[s])
    return out.permute(0, 3, 1, 2)


def _apply_crops_cv2(
    crops: Sequence[np.ndarray],
    params: AugmentParams,
    crop: int,
    norm: _Normalise,
    out: torch.Tensor,
) -> torch.Tensor:
    from deepimage.augment.cv_backend import augment_crops, pixel_matrices

    local = dataclasses.replace(
        params, top=torch.zeros_like(params.top), left=torch.zeros_like(params.left)
    )
    coef = grid_coefficients(local, crop)
    augment_crops(
        crops, pixel_matrices(coef, crop, crop), coef[:, 6], params.warps().numpy(),
        params.flip.numpy(), _rgb(params), params.vignette_radius.numpy(),
        params.vignette_strength.numpy(), norm.matrix(), out.numpy(),
    )  # fmt: skip
    return out.permute(0, 3, 1, 2)


def apply_crops(
    crops: Sequence[np.ndarray],
    params: AugmentParams,
    crop: int,
    norm: _Normalise,
    out: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """:func:`apply_params` given each image's ``C x C`` uint8 crop window (``(C, C, 3)``
    arrays, e.g. views into a store's memmap) instead of whole images: every warp stays
    inside its window, so nothing else is read. Always on CPU."""
    if out is None:
        out = torch.empty((len(crops), crop, crop, 3), dtype=torch.float32)
    if resolve_backend(backend, out.device) == "cv2":
        return _apply_crops_cv2(crops, params, crop, norm, out)
    windows = torch.from_numpy(np.stack(crops)) if len(crops) else torch.empty(0, crop, crop, 3)
    zero = torch.zeros_like(params.top)
    local = dataclasses.replace(params, top=zero, left=zero)
    return apply_params(windows, local, crop, (), (), norm, out, backend=backend)


def frame_for_source(
    params: AugmentParams,
    size: int,
    height: float | np.ndarray,
    width: float | np.ndarray,
    mode: str = "stretch",
) -> tuple[np.ndarray, np.ndarray]:
    """``(scale, offset)``, each ``(n, 2)`` as (x, y), mapping ``S x S`` pixel coordinates to
    those of ``height x width`` sources (scalars or one per image), as the store's resize
    would (``stretch``, or ``shorter`` side + centre crop)."""
    n = len(params)
    h = np.broadcast_to(np.asarray(height, np.float64), (n,))
    w = np.broadcast_to(np.asarray(width, np.float64), (n,))
    if mode == "stretch":
        f = np.stack([w / size, h / size], 1)
        box = np.zeros((n, 2))
    else:
        side = np.minimum(w, h)
        f = np.stack([side / size, side / size], 1)
        box = np.stack([(w - side) / 2.0, (h - side) / 2.0], 1)
    return f, 0.5 * f - 0.5 + box


def apply_to_sources(
    images: Sequence[torch.Tensor],
    params: AugmentParams,
    size: int,
    crop: int,
    norm: _Normalise,
    mode: str = "stretch",
    out: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Augment decoded ``(H, W, 3)`` uint8 images of any sizes as if each had been resized to
    ``S x S`` first: the resize is folded into the sampling grid, so there is one
    interpolation in all. Returns float32 ``(B, 3, C, C)`` normalised, channels_last (written
    into ``out``, ``(B, C, C, 3)``, if given); ``backend`` as :func:`resolve_backend`."""
    b = len(images)
    if out is None:
        dev = images[0].device if b else torch.device("cpu")
        out = torch.empty((b, crop, crop, 3), dtype=torch.float32, device=dev)
    radius = params.vignette_radius.numpy()
    strength = params.vignette_strength.numpy()
    # each source's frame and the part of it under the crop window (+1 pixel to interpolate)
    hw = np.array([img.shape[:2] for img in images], dtype=np.float64).reshape(b, 2)
    scale, offset = frame_for_source(params, size, hw[:, 0], hw[:, 1], mode)
    origin = np.stack([params.left.numpy(), params.top.numpy()], 1).astype(np.float64)
    lo, hi = scale * origin + offset, scale * (origin + crop - 1) + offset
    start = np.maximum(np.floor(lo).astype(np.int64) - 1, 0)
    stop = np.minimum(np.ceil(hi).astype(np.int64) + 2, hw[:, ::-1].astype(np.int64))
    size_in = (stop - start)[:, ::-1].T  # (height, width) of each source's part
    coef = grid_coefficients(params, crop, scale, offset - start, size_in)
    if resolve_backend(backend, out.device) == "cv2":
        from deepimage.augment.cv_backend import augment_crops, pixel_matrices

        parts = [img.numpy()[y0:y1, x0:x1] for img, (x0, y0), (x1, y1) in zip(images, start, stop)]
        augment_crops(
            parts, pixel_matrices(coef, size_in[0], size_in[1]), coef[:, 6], np.ones(b, bool),
            params.flip.numpy(), _rgb(params), radius, strength, norm.matrix(), out.numpy(),
        )  # fmt: skip
        return out.permute(0, 3, 1, 2)
    has_rgb = _rgb(params).any(1)
    rgb = _rgb_rows(params, crop, out.device) if has_rgb.any() else None
    grid_rows = _grid_rows(coef, crop, out.device)
    for i, image in enumerate(images):
        s = slice(i, i + 1)
        (x0, y0), (x1, y1) = start[i], stop[i]
        _warp(image[None, y0:y1, x0:x1], _grid(grid_rows[:, s], coef[s, 6], crop), out[s])
        rows = out[s].view(1, crop, 3 * crop)
        _photometric(rows, rgb[s] if has_rgb[i] else None, radius[s], strength[s], norm, rows)
    return out.permute(0, 3, 1, 2)
