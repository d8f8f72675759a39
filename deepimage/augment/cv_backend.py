"""The CPU backend: each image warped and photometrically adjusted with OpenCV.

The same augmentation as the torch path of :mod:`deepimage.augment.ops`: the same
parameters, the same sampling grid ``A (p (1 + k rho^2)) + b`` and the same photometric
formula ``(clip(x * vignette + cast + light, 0, 255) / 255 - mean) / std``. It differs from
``F.grid_sample`` by interpolation rounding only: the warped crop is rounded to uint8 before
the (float32) photometric pass, so at most half a grey level with OpenCV 5 (older OpenCV
kernels also put samples on a 1/32-pixel grid). Crops without a warp are copied exactly, as
on the torch path, and an image's result never depends on its batch.

Per warped image the source is widened to RGBA (OpenCV's bilinear SIMD kernels are about
twice as fast on four channels as on three); a grid that is affine (crop, flip, rotation,
stretch, a folded resize) is one ``cv2.warpAffine``; with lens distortion the two float maps
are affine combinations of cached ``p (1 + k rho^2)`` planes (there are few ``k``), applied
by ``cv2.remap``. The photometric pass is a few vectorised OpenCV calls ending in one
``cv2.transform`` that normalises per channel.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import cv2
import numpy as np

_AFFINE = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP


def pixel_matrices(
    coef: np.ndarray, height: np.ndarray | int, width: np.ndarray | int
) -> np.ndarray:
    """``(n, 2, 3)`` float64 ``[A | b]`` of :func:`~deepimage.augment.ops.grid_coefficients`
    rows in pixel coordinates of inputs of ``height x width`` (one for all or per image):
    ``grid_sample``'s ``align_corners=True`` maps -1 and 1 to pixels 0 and size - 1."""
    n = len(coef)
    size = np.stack(np.broadcast_arrays(np.asarray(width, np.float64), height), -1)
    half = np.broadcast_to(np.maximum(size - 1.0, 1.0) / 2.0, (n, 2))
    m = np.empty((n, 2, 3))
    m[:, :, :2] = coef[:, :4].reshape(n, 2, 2) * half[:, :, None]
    m[:, :, 2] = (coef[:, 4:6] + 1.0) * half
    return m


def _frozen(a: np.ndarray) -> np.ndarray:
    """``a`` made read-only: cached maps are shared by every call."""
    a.setflags(write=False)
    return a


@functools.lru_cache(maxsize=32)
def _radial(crop: int, k: float) -> tuple[np.ndarray, np.ndarray]:
    """``p (1 + k rho^2)`` as two ``(C, C)`` float32 planes (x, y): output pixel offsets
    from the centre, radially distorted (``rho`` is 1 at the corners)."""
    c = (crop - 1) / 2.0
    e = np.arange(crop, dtype=np.float64) - c
    px, py = np.meshgrid(e, e)
    g = 1.0 + k * (px**2 + py**2) / max(2 * c * c, 1e-12)
    return _frozen((px * g).astype(np.float32)), _frozen((py * g).astype(np.float32))


def warp(src: np.ndarray, matrix: np.ndarray, k: float, crop: int, dst: np.ndarray) -> np.ndarray:
    """Bilinear ``(C, C, 3)`` uint8 warp of ``src`` (``(h, w, 3)`` uint8, a view is fine) into
    ``dst``: output pixel offset ``p`` from the centre samples ``matrix @ (p (1 + k rho^2), 1)``.

    OpenCV's bilinear warps of four-channel images are about twice as fast as of three (SIMD
    kernels), so the source is widened to RGBA for the warp: the extra pass costs far less.
    """
    rgba = cv2.cvtColor(src, cv2.COLOR_RGB2RGBA)
    if k == 0.0:
        c = (crop - 1) / 2.0
        m = matrix.copy()
        m[:, 2] -= m[:, :2].sum(1) * c  # from offsets p to output pixel indices p + c
        warped = cv2.warpAffine(
            rgba, m, (crop, crop), flags=_AFFINE, borderMode=cv2.BORDER_REPLICATE
        )
    else:
        qx, qy = _radial(crop, float(k))
        (a00, a01, bx), (a10, a11, by) = matrix.tolist()
        map_x = cv2.addWeighted(qx, a00, qy, a01, bx)
        map_y = cv2.addWeighted(qx, a10, qy, a11, by)
        warped = cv2.remap(rgba, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return cv2.cvtColor(warped, cv2.COLOR_RGBA2RGB, dst=dst)


@functools.lru_cache(maxsize=64)
def _ramp(crop: int, radius: float) -> np.ndarray:
    """``clamp((rho - r0) / (1 - r0), 0, 1)^2`` as ``(C, C, 3)`` float32, cached per radius."""
    c = (crop - 1) / 2.0
    e = np.arange(crop, dtype=np.float64) - c
    rho = np.sqrt((e[None, :] ** 2 + e[:, None] ** 2) / max(2 * c * c, 1e-12))
    t = np.clip((rho - radius) / (1.0 - radius), 0.0, 1.0) ** 2
    return _frozen(np.repeat(t[:, :, None], 3, 2).astype(np.float32))


def normalise_matrix(scale: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """``(3, 4)`` float32 ``[diag(scale) | shift]`` for ``cv2.transform``."""
    m = np.zeros((3, 4), np.float32)
    m[[0, 1, 2], [0, 1, 2]] = scale
    m[:, 3] = shift
    return m


def photometric(
    x: np.ndarray,
    rgb: Sequence[float],
    radius: float,
    strength: float,
    norm: np.ndarray,
    out: np.ndarray,
    scratch: np.ndarray,
    scratch_u8: np.ndarray,
) -> np.ndarray:
    """``(clip(x * vignette + rgb, 0, 255) * scale + shift)`` of a ``(C, C, 3)`` uint8 crop
    (a view is fine) into ``out`` (float32); ``norm`` from :func:`normalise_matrix`,
    ``scratch`` a ``(2, C, C, 3)`` float32 and ``scratch_u8`` a ``(C, C, 3)`` uint8 work
    buffer.

    Every pass but the last works in the scratch buffers, which stay in the CPU caches from
    one image to the next; ``out`` is written once. Without a vignette an integer shift (a
    colour cast) is added with uint8 saturation, which is the clip exactly; clips that
    cannot bind are skipped."""
    crop = x.shape[0]
    r, g, b = rgb
    has_rgb = r != 0.0 or g != 0.0 or b != 0.0
    y = scratch[0]
    if strength == 0.0 and has_rgb and r.is_integer() and g.is_integer() and b.is_integer():
        # the raising and the lowering channels apart: OpenCV's saturating uint8 add is
        # vectorised for non-negative scalars only (a negative one is about 50x slower)
        cv2.add(x, (max(r, 0.0), max(g, 0.0), max(b, 0.0), 0.0), dst=scratch_u8)
        cv2.subtract(scratch_u8, (max(-r, 0.0), max(-g, 0.0), max(-b, 0.0), 0.0), dst=scratch_u8)
        np.copyto(y, scratch_u8)
        return cv2.transform(y, norm, dst=out)
    if strength != 0.0:
        ramp = _ramp(crop, float(radius))  # 1 - s ramp, reading the ramp once:
        v = cv2.addWeighted(ramp, -strength, ramp, 0.0, 1.0, dst=scratch[1])
        cv2.multiply(x, v, dst=y, dtype=cv2.CV_32F)
        if has_rgb:
            cv2.add(y, (r, g, b, 0.0), dst=y)
    elif has_rgb:
        cv2.add(x, (r, g, b, 0.0), dst=y, dtype=cv2.CV_32F)
    else:
        np.copyto(y, x)
    if max(r, g, b) > 0.0 or strength < 0.0:  # x * vignette <= 255 for 0 <= strength
        cv2.threshold(y, 255.0, 255.0, cv2.THRESH_TRUNC, dst=y)
    if min(r, g, b) < 0.0 or strength > 1.0:  # x * vignette >= 0 for strength <= 1
        cv2.threshold(y, 0.0, 0.0, cv2.THRESH_TOZERO, dst=y)
    return cv2.transform(y, norm, dst=out)


def augment_crops(
    sources: Sequence[np.ndarray],
    matrices: np.ndarray,
    ks: np.ndarray,
    warps: np.ndarray,
    flips: np.ndarray,
    rgb: np.ndarray,
    radius: np.ndarray,
    strength: np.ndarray,
    norm: np.ndarray,
    out: np.ndarray,
) -> np.ndarray:
    """Augment image ``i`` from ``sources[i]`` (uint8 RGB) into ``out[i]`` (``(n, C, C, 3)``
    float32).

    A warped image samples its source through ``matrices[i]`` and ``ks[i]`` (see
    :func:`warp`); any other source is the exact ``C x C`` crop, mirrored where ``flips``.
    """
    crop = out.shape[1]
    tile = np.empty((crop, crop, 3), np.uint8)
    scratch_u8 = np.empty((crop, crop, 3), np.uint8)
    scratch = np.empty((2, crop, crop, 3), np.float32)
    rgb, radius, strength = np.asarray(rgb, np.float64).tolist(), radius.tolist(), strength.tolist()
    for i, (src, k) in enumerate(zip(sources, np.asarray(ks, np.float64).tolist())):
        if warps[i]:
            x = warp(src, matrices[i], k, crop, tile)
        else:
            x = cv2.flip(src, 1, dst=tile) if flips[i] else src
        photometric(x, rgb[i], radius[i], strength[i], norm, out[i], scratch, scratch_u8)
    return out
