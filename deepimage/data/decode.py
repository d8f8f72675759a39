"""Robust image decoding and the one resize function used everywhere.

Real folders hold corrupt, empty, truncated and mislabelled files, images in every Pillow
mode, EXIF-rotated photos and the occasional decompression bomb. :func:`open_image` turns
all of these into either an RGB image or a :class:`DecodeError` with a one-line reason, so
callers can skip a bad file instead of crashing. :func:`resize_image` is shared by the
store, evaluation and prediction so that training and test images are resized identically.
"""

from __future__ import annotations

import io
import logging
import os
import re
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 178_956_970  # 2x Pillow's default MAX_IMAGE_PIXELS
RESAMPLE = Image.Resampling.BILINEAR  # antialiased when downscaling (filter support scales)
REDUCING_GAP = 2.0  # box-reduce by an integer factor first while >= 2x the target: fast, sharp

ResizeMode = Literal["stretch", "shorter"]
RESIZE_MODES: tuple[str, ...] = get_args(ResizeMode)

ImageSource = str | os.PathLike[str] | bytes

_pillow_limit_lock = threading.Lock()


class DecodeError(Exception):
    """An image file cannot be decoded; ``str(err)`` is a short one-line reason."""


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def check_mode(mode: str) -> str:
    """Return ``mode`` if it is a known :data:`ResizeMode`, else raise ``ValueError``."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {', '.join(RESIZE_MODES)}; got {mode!r}")
    return mode


def _open_lazy(source: ImageSource, max_pixels: int | None) -> Image.Image:
    """``Image.open`` (header only) with Pillow's bomb guard replaced by ``max_pixels``."""
    if isinstance(source, bytes | bytearray | memoryview):
        if len(source) == 0:
            raise DecodeError("empty file")
        fp: io.BytesIO | str = io.BytesIO(source)
    else:
        fp = os.fspath(source)
        try:
            if os.path.getsize(fp) == 0:
                raise DecodeError("empty file")
        except FileNotFoundError:
            raise DecodeError("file not found") from None
        except OSError as e:
            raise DecodeError(f"cannot read file: {e.strerror or e}") from None
    try:
        with warnings.catch_warnings():
            # The size check below is authoritative; Pillow's warning level is lower than ours.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            pillow_cap = Image.MAX_IMAGE_PIXELS
            if max_pixels is not None and (pillow_cap is None or max_pixels <= 2 * pillow_cap):
                im = Image.open(fp)
            else:  # Pillow would refuse images our cap allows: lift its limit for this call
                with _pillow_limit_lock:
                    Image.MAX_IMAGE_PIXELS = None
                    try:
                        im = Image.open(fp)
                    finally:
                        Image.MAX_IMAGE_PIXELS = pillow_cap
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        found = re.search(r"\((\d+) pixels\)", str(e))
        count = f"{found.group(1)} pixels, " if found else ""
        raise DecodeError(f"too many pixels ({count}over the decompression bomb limit)") from None
    except UnidentifiedImageError:
        raise DecodeError("not an image (unknown or corrupt format)") from None
    except FileNotFoundError:
        raise DecodeError("file not found") from None
    except OSError as e:
        raise DecodeError(f"cannot open: {_reason(e)}") from None
    except Exception as e:  # Pillow plugins raise many types on garbage headers
        raise DecodeError(f"corrupt header: {_reason(e)}") from None
    w, h = im.size
    if w <= 0 or h <= 0:
        im.close()
        raise DecodeError(f"invalid image size {w}x{h}")
    if max_pixels is not None and w * h > max_pixels:
        im.close()
        raise DecodeError(f"too many pixels: {w}x{h} = {w * h} > max_pixels {max_pixels}")
    return im


def _sixteen_bit_to_u8(values: np.ndarray) -> np.ndarray:
    """Scale 0..65535 to 0..255 with rounding (65535 -> 255, 32768 -> 128)."""
    return ((values.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def _range_to_u8(values: np.ndarray) -> np.ndarray:
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros(values.shape, np.uint8)
    scaled = (values.astype(np.float64) - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _high_depth_to_l(im: Image.Image) -> Image.Image:
    """Greyscale 16-bit / 32-bit int / float images to 8-bit ``L`` by scaling, not clipping."""
    values = np.asarray(im)
    if im.mode.startswith("I;16"):
        out = _sixteen_bit_to_u8(values)
    elif im.mode == "I":
        if values.size and values.min() >= 0 and values.max() <= 65535:
            out = _sixteen_bit_to_u8(values)  # the usual source: 16-bit PNG/TIFF/PGM
        else:
            out = _range_to_u8(values)
    else:  # "F"
        finite = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        if finite.size and finite.min() >= 0.0 and finite.max() <= 1.0:
            out = np.clip(np.rint(finite * 255.0), 0, 255).astype(np.uint8)
        elif finite.size and finite.min() >= 0.0 and finite.max() <= 255.0:
            out = np.clip(np.rint(finite), 0, 255).astype(np.uint8)
        else:
            out = _range_to_u8(finite)
    return Image.fromarray(np.ascontiguousarray(out), mode="L")


def _on_white(im: Image.Image) -> Image.Image:
    rgba = im.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparency is composited on white."""
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _high_depth_to_l(im).convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return _on_white(im)
    if mode == "P":
        return _on_white(im) if "transparency" in im.info else im.convert("RGB")
    if mode in ("RGB", "L", "1") and "transparency" in im.info:  # PNG tRNS colour key
        return _on_white(im)
    return im.convert("RGB")  # L, 1, CMYK, YCbCr, RGBX, ...


def open_image(
    source: ImageSource,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    draft_size: int | None = None,
) -> Image.Image:
    """Decode ``source`` (a path or the file's bytes) to an RGB image, EXIF orientation applied.

    The pixel count from the header is checked against ``max_pixels`` before any pixel is
    decoded. With ``draft_size``, JPEGs at least twice that size in both dimensions are
    decoded at a reduced scale (libjpeg DCT scaling) that keeps both sides >= ``draft_size``.
    Raises :class:`DecodeError` for empty, truncated, corrupt, oversized or non-image files.
    """
    im = _open_lazy(source, max_pixels)
    with im:  # closes the file (not the pixels) on exit, also for multi-frame files
        if draft_size is not None and im.format == "JPEG":
            try:
                im.draft("RGB", (draft_size, draft_size))
            except Exception as e:  # draft is an optimisation only
                logger.debug("JPEG draft failed: %s", _reason(e))
        try:
            im.load()
        except Exception as e:
            text = " ".join(str(e).split())
            if "truncated" in text or isinstance(e, EOFError):
                raise DecodeError(f"truncated file: {text}") from None
            raise DecodeError(f"cannot decode: {_reason(e)}") from None
        try:
            ImageOps.exif_transpose(im, in_place=True)
        except Exception as e:  # broken EXIF: keep the pixels as stored
            logger.debug("ignoring unreadable EXIF orientation: %s", _reason(e))
        try:
            return to_rgb(im)
        except Exception as e:
            raise DecodeError(f"cannot convert mode {im.mode} to RGB: {_reason(e)}") from None


def resize_pil(img: Image.Image, size: int, mode: ResizeMode = "stretch") -> Image.Image:
    """Resize to ``size`` x ``size``: ``stretch`` ignores the aspect ratio; ``shorter`` scales
    the shorter side to ``size`` and centre-crops (done in one resampling pass via ``box``)."""
    check_mode(mode)
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    w, h = img.size
    if mode == "stretch":
        if (w, h) == (size, size):
            return img
        return img.resize((size, size), RESAMPLE, reducing_gap=REDUCING_GAP)
    side = min(w, h)
    left, top = (w - side) / 2.0, (h - side) / 2.0
    box = (left, top, left + side, top + side)
    if (w, h) == (size, size):
        return img
    return img.resize((size, size), RESAMPLE, box=box, reducing_gap=REDUCING_GAP)


def resize_image(
    img: Image.Image | np.ndarray, size: int, mode: ResizeMode = "stretch"
) -> np.ndarray:
    """Resize an image (Pillow image or ``(H, W, 3)`` uint8 array) to a ``(size, size, 3)``
    uint8 array; the single resize used by the store, evaluation and prediction."""
    if isinstance(img, np.ndarray):
        img = Image.fromarray(np.ascontiguousarray(img, dtype=np.uint8))
    if img.mode != "RGB":
        img = to_rgb(img)
    return _as_array(resize_pil(img, size, mode))


resize_array = resize_image


def _as_array(img: Image.Image) -> np.ndarray:
    arr = np.asarray(img, dtype=np.uint8)
    if not arr.flags.writeable or not arr.flags.c_contiguous:
        arr = np.array(arr, dtype=np.uint8, order="C")
    return arr


def decode_image(
    source: ImageSource,
    size: int | None = None,
    *,
    mode: ResizeMode = "stretch",
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Decode to a contiguous ``(H, W, 3)`` uint8 array; with ``size``, exactly
    ``(size, size, 3)`` using :func:`resize_image`. Raises :class:`DecodeError`."""
    check_mode(mode)
    img = open_image(source, max_pixels=max_pixels, draft_size=size)
    if size is None:
        return _as_array(img)
    return _as_array(resize_pil(img, size, mode))


def describe_source(source: ImageSource) -> str:
    """A short printable name for ``source`` (its path, or ``<N bytes>``)."""
    if isinstance(source, bytes | bytearray | memoryview):
        return f"<{len(source)} bytes>"
    return str(Path(source))


# --------------------------------------------------------------------------- stored JPEGs

JPEG_QUALITY = 90


def encode_jpeg(image: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """``(H, W, 3)`` uint8 RGB -> baseline JPEG bytes (libjpeg-turbo via simplejpeg, 4:2:0,
    accurate integer DCT)."""
    import simplejpeg

    return simplejpeg.encode_jpeg(
        np.ascontiguousarray(image, dtype=np.uint8),
        quality=int(quality),
        colorspace="RGB",
        colorsubsampling="420",
        fastdct=False,
    )


def decode_jpeg(data: bytes | bytearray | memoryview, out: np.ndarray | None = None) -> np.ndarray:
    """JPEG bytes -> ``(H, W, 3)`` uint8 RGB, decoded into ``out`` when given.

    libjpeg-turbo via simplejpeg: of the bindings measured (README, "Stored JPEGs") the
    fastest on CPU, maintained, and it decodes straight into the caller's buffer.
    Deterministic (accurate integer IDCT, fancy upsampling): the same bytes give the same
    pixels in every process and on every run. Raises :class:`DecodeError` for bytes that are
    not a decodable JPEG of ``out``'s shape.
    """
    import simplejpeg

    try:
        h, w, _, _ = simplejpeg.decode_jpeg_header(data)
        if out is not None and out.shape != (h, w, 3):
            raise DecodeError(f"JPEG is {w}x{h}, expected {out.shape[1]}x{out.shape[0]}")
        return simplejpeg.decode_jpeg(data, colorspace="RGB", buffer=out)
    except ValueError as e:
        raise DecodeError(f"cannot decode JPEG: {_reason(e)}") from None


def decode_jpegs_on_device(blobs: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """JPEG byte tensors (1-D uint8, on CPU; pinned is best) -> ``(B, H, W, 3)`` uint8 RGB on
    ``device``, decoded there as one batch (``torchvision.io.decode_jpeg``: nvjpeg on CUDA).

    The images must share one size (a store's rows do). The same bytes give the same pixels
    on the same kind of device; they differ from :func:`decode_jpeg`'s by IDCT rounding.
    """
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():  # torchvision 0.29 marks its decoders deprecated
        warnings.simplefilter("ignore")
        try:
            images = decode_jpeg(list(blobs), mode=ImageReadMode.RGB, device=device)
        except RuntimeError as e:
            raise DecodeError(f"cannot decode JPEG on {device}: {_reason(e)}") from None
    return torch.stack(images).permute(0, 2, 3, 1)
