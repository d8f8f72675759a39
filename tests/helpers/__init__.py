"""Helpers shared across the test suite (importable, not tests).

- photos whose class can be read off their pixels (:func:`photo`) and small runs fitted to
  that class (:func:`make_run`), so a test can check a top-1 answer against the photo
  itself: a preprocessing error (channels swapped, wrong crop or normalisation) or answers
  handed to the wrong request change it;
- image folders (:func:`write_flat_folder`, :func:`write_noise_folder`,
  :func:`write_photo_folder`; the messy folder is in :mod:`tests.helpers.messy`), encoded
  files (:func:`jpeg_bytes`, :func:`png_bomb`);
- ``deepimage train`` in a child process (:func:`train_cmd`, :func:`env`);
- the relative weight error the multi-process tests compare with (:func:`max_relative_error`);
- :func:`wait_until`, the one way a test waits for something to happen.
"""

from __future__ import annotations

import io
import os
import struct
import sys
import time
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image

from deepimage.models import get_model
from deepimage.runs import WEIGHTS, RunMeta, save_weights

T = TypeVar("T")

# --------------------------------------------------------------------------- photos


def photo(seed: int, size: tuple[int, int] = (64, 48), classes: int = 3) -> Image.Image:
    """A smooth random colour image (compresses like a photo) whose strongest channel gives
    its class ``photo_class(seed, classes)``: R for class 0, G for 1, B for 2."""
    if not 1 <= classes <= 3:
        raise ValueError("colour photos tell at most 3 classes apart")
    gen = np.random.default_rng(seed)
    small = gen.integers(0, 90, (6, 8, 3), dtype=np.uint8)
    small[..., photo_class(seed, classes)] += 160
    return Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)


def photo_class(seed: int, classes: int = 3) -> int:
    """The class of :func:`photo` ``seed``: the index of its dominant colour channel."""
    return seed % classes


def jpeg_bytes(img: Image.Image, quality: int = 90, **kwargs: Any) -> bytes:
    """``img`` encoded as a JPEG file."""
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality, **kwargs)
    return buf.getvalue()


def photo_jpeg(seed: int, size: tuple[int, int] = (64, 48)) -> bytes:
    """:func:`photo` ``seed`` (of 3 classes) as JPEG bytes."""
    return jpeg_bytes(photo(seed, size))


def write_photo_folder(root: Path, counts: dict[str, int], size: int = 36) -> Path:
    """ImageFolder of :func:`photo` PNGs: class folder ``i`` (in ``counts`` order) holds
    ``counts[name]`` photos of colour class ``i``."""
    names = list(counts)
    seed = 0
    for label, name in enumerate(names):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(counts[name]):
            while photo_class(seed, len(names)) != label:
                seed += 1
            photo(seed, (size + i, size), len(names)).save(root / name / f"{i:03d}.png")
            seed += 1
    return root


def png_bomb(
    width: int = 60_000, height: int = 60_000, bit_depth: int = 8, color_type: int = 2
) -> bytes:
    """A small PNG whose header claims ``width x height`` pixels (a decompression bomb).

    Opening it is cheap and decoding it fails: a reader must refuse it from the header alone.
    """

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def write_flat_folder(root: Path, counts: dict[str, int], size: int = 12) -> Path:
    """ImageFolder with ``counts[class]`` flat-colour PNGs per class, colours all distinct."""
    k = 0
    for c, n in counts.items():
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            color = (17 * k % 256, 53 * k % 256, 101 * k % 256)
            Image.new("RGB", (size + i, size), color).save(root / c / f"{i:03d}.png")
            k += 1
    return root


def write_noise_folder(
    root: Path, classes: int = 4, per_class: int = 18, size: int = 40, prefix: str = "class"
) -> Path:
    """ImageFolder of seeded noise PNGs, ``prefix{c}`` per class, each class with a learnable
    colour bias (channel ``c % 3`` raised)."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"{prefix}{c}").mkdir(parents=True)
        for i in range(per_class):
            base = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            base[:, :, c % 3] = (base[:, :, c % 3] // 2) + 100
            Image.fromarray(base).save(root / f"{prefix}{c}" / f"{i}.png")
    return root


# --------------------------------------------------------------------------- training runs


def train_cmd(data: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    """``python -m deepimage train`` of a tiny VGG (width 1/16, 40/32 px) for 3 epochs."""
    return [
        sys.executable, "-m", "deepimage", "-q", "train",
        "--data", str(data), "--out", str(out), "--cache-dir", str(cache),
        "--model", "vgg16_deepimage", "--width", "0.0625", "--size", "40", "--crop", "32",
        "--epochs", "3", "--batch-size", "8", "--checkpoint-every", "1", "--workers", "2",
        "--lr", "0.05", "--no-progress", "--no-tensorboard", *extra,
    ]  # fmt: skip


TIMINGS = ("images_per_s", "epoch_s", "train_s")
"""metrics.jsonl keys that measure wall time: they differ between otherwise equal runs."""


def env() -> dict[str, str]:
    """The environment for child training processes: one intra-op thread each, so every
    process of a comparison computes with the same thread count."""
    e = dict(os.environ)
    e["OMP_NUM_THREADS"] = "1"
    return e


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |got - ref| / max |ref|`` in float64."""
    ref = ref.double()
    return float((got.double() - ref).abs().max() / ref.abs().max().clamp(min=1e-12))


def max_relative_error(
    got: Mapping[str, torch.Tensor] | Path, ref: Mapping[str, torch.Tensor] | Path
) -> float:
    """The largest :func:`relative_error` over the floating-point tensors of two state dicts
    (or run folders' ``model.safetensors``); the other tensors must be equal.

    A bias is measured against its layer's scale, the larger of its own and its weight's
    largest magnitude: biases start at zero and their gradient sums a whole batch's positions
    that nearly cancel, so after a few steps an early conv bias can be 5e-6 in size, and the
    same 1e-8 that fp32 summation order leaves on the weights (a ten-millionth of their scale)
    would read as 2e-3 of the bias alone."""
    from safetensors.torch import load_file

    if isinstance(got, Path):
        got = load_file(got / "model.safetensors")
    if isinstance(ref, Path):
        ref = load_file(ref / "model.safetensors")
    assert got.keys() == ref.keys()
    worst = 0.0
    for key, value in ref.items():
        if value.is_floating_point():
            scale = value.double().abs().max()
            weight = ref.get(key[: -len("bias")] + "weight") if key.endswith("bias") else None
            if weight is not None:
                scale = max(scale, weight.double().abs().max())
            err = (got[key].double() - value.double()).abs().max() / scale.clamp(min=1e-12)
            worst = max(worst, float(err))
        else:
            assert torch.equal(got[key], value), f"{key} differs"
    return worst


# --------------------------------------------------------------------------- models


def _model_input(images: np.ndarray, crop: int, mean, std) -> torch.Tensor:
    """Centre crop and normalise ``(B, S, S, 3)`` uint8 images by hand."""
    top = (images.shape[1] - crop) // 2
    x = images[:, top : top + crop, top : top + crop].astype(np.float32) / 255
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


def colour_model(
    num_classes: int,
    *,
    size: int,
    crop: int,
    model: str = "vgg16_deepimage",
    seed: int = 0,
    **kwargs: Any,
) -> torch.nn.Module:
    """A small ``model`` whose last layer is fitted to tell :func:`photo` colour classes apart.

    The trunk keeps its seeded random weights; the last linear layer is fitted by ridge
    regression on the features of 240 prototype photos (a closed-form linear probe), so the
    top-1 answer differs from photo to photo and follows the dominant colour (every one of
    300 other photos right at sizes 40 and 48).
    """
    torch.manual_seed(seed)
    net = get_model(model, num_classes=num_classes, image_size=crop, **kwargs).eval()
    seeds = np.arange(10_000, 10_240)
    images = np.stack([np.asarray(photo(int(s), (size, size), num_classes)) for s in seeds])
    labels = torch.from_numpy(np.array([photo_class(int(s), num_classes) for s in seeds]))
    last = [m for m in net.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        x = _model_input(images, crop, net.mean, net.std)
        feats = _features(net, x, last)
        mu = feats.mean(0)
        f = (feats - mu).double()
        target = torch.nn.functional.one_hot(labels, num_classes).double() * 2 - 1
        gram = f @ f.T + 1e-3 * torch.eye(len(f), dtype=f.dtype) * f.pow(2).sum(1).mean()
        w = (f.T @ torch.linalg.solve(gram, target)).T.float()  # ridge regression
        scores = (feats - mu) @ w.T
        w = w * (4.0 / scores.std())
        last.weight.copy_(w)
        last.bias.copy_(-(w @ mu))
    return net


def _features(net: torch.nn.Module, x: torch.Tensor, last: torch.nn.Linear) -> torch.Tensor:
    """The inputs of ``last`` in one forward pass of ``net``."""
    seen: list[torch.Tensor] = []
    handle = last.register_forward_hook(lambda _m, args, _out: seen.append(args[0].detach()))
    try:
        net(x)
    finally:
        handle.remove()
    return seen[0].flatten(1)


def make_run(
    path: Path,
    classes: list[str],
    *,
    size: int = 40,
    crop: int = 32,
    width: float = 0.125,
    seed: int = 0,
    names: dict[str, str] | None = None,
    model: str = "vgg16_deepimage",
) -> Path:
    """A finished run folder (fp32, stretch resize) holding a :func:`colour_model`."""
    net = colour_model(len(classes), size=size, crop=crop, model=model, seed=seed, width=width)
    meta = {
        "model": model,
        "model_kwargs": {"width": width},
        "classes": list(classes),
        "class_names": dict(names or {}),
        "size": size,
        "crop": crop,
        "resize_mode": "stretch",
        "mean": list(net.mean),
        "std": list(net.std),
        "precision": "fp32",
    }
    path.mkdir(parents=True, exist_ok=True)
    save_weights(path / WEIGHTS, net, RunMeta.from_dict(meta, path))
    return path


def save_weights_v1(path: Path, net: torch.nn.Module, meta: dict[str, Any]) -> None:
    """Weights written as the first versions did: ``meta`` as given (keys may be missing)
    in the safetensors metadata and, for a run folder, ``model.json``. Folders written so
    must keep opening."""
    import json

    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    save_file(tensors, str(path), metadata={"deepimage": json.dumps(meta)})
    if path.name == WEIGHTS:
        (path.parent / "model.json").write_text(json.dumps(meta, indent=2) + "\n")


# --------------------------------------------------------------------------- waiting


def free_port() -> int:
    """A TCP port free on the loopback interface (for a server or a process group)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(
    condition: Callable[[], T],
    timeout: float,
    what: str,
    alive: Callable[[], bool] | None = None,
    interval: float = 0.02,
) -> T:
    """Poll ``condition`` until it returns a true value, and return that value.

    Raises :class:`TimeoutError` naming ``what`` after ``timeout`` seconds, or
    :class:`AssertionError` as soon as ``alive`` (e.g. "the child process still runs") fails.
    Exceptions from ``condition`` count as "not yet" (a file half written, a server not up).
    """
    deadline = time.monotonic() + timeout
    while True:
        if alive is not None:
            assert alive(), f"gave up waiting for {what}: the process ended"
        try:
            value = condition()
        except Exception:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)
