"""Training augmentation presets behind one call: uint8 batch in, model-ready tensor out.

``build_train_augment`` returns a callable ``(images, rows, epoch) -> x`` where ``images`` is a
``(B, S, S, 3)`` uint8 batch already on the training device, ``rows`` the images' store rows
(their identity for the keyed random draws) and ``x`` the normalised float ``(B, 3, C, C)``
input, channels_last in memory. Every parameter is a pure function of (seed, epoch, row).

Presets (:data:`PRESETS`): ``deepimage`` the paper's full set (section 4.1, Table 1; the
training default), ``alexnet`` crop, flip and PCA lighting, ``crop_flip``, ``airbench``
(alternating flips and translations by up to 2 pixels of reflect-padded images, the CIFAR-10
recipe of Jordan, arXiv 2404.00498) and ``none`` (centre crop).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from deepimage.augment.ops import (
    _Normalise,
    apply_crops,
    apply_params,
    apply_to_sources,
    pad_images,
    resolve_backend,
)
from deepimage.augment.params import (
    AugmentConfig,
    AugmentParams,
    ColourCast,
    Crop,
    Flip,
    Lens,
    Lighting,
    Rotation,
    Vignette,
    sample_params,
)
from deepimage.data.loader import worker_empty

TrainAugment = Callable[[torch.Tensor, np.ndarray, int], torch.Tensor]

_OFF = {
    "rotation": Rotation(p=0.0),
    "lens": Lens(p=0.0),
    "vignette": Vignette(p=0.0),
    "cast": ColourCast(p=0.0),
    "lighting": Lighting(p=0.0),
}

PRESETS: dict[str, AugmentConfig] = {
    "deepimage": AugmentConfig(),
    "alexnet": AugmentConfig(**{**_OFF, "lighting": Lighting(p=1.0)}),
    "crop_flip": AugmentConfig(**_OFF),
    "airbench": AugmentConfig(
        crop=Crop(pad=2, pad_mode="reflect"), flip=Flip(alternate=True), **_OFF
    ),
    "none": AugmentConfig(crop=Crop(random=False), flip=Flip(p=0.0), **_OFF),
}


def _use_count(t: torch.Tensor) -> int:
    """How many tensors share ``t``'s memory (0 where torch cannot tell)."""
    try:
        return int(torch._C._storage_Use_Count(t.untyped_storage()._cdata))
    except (AttributeError, RuntimeError):
        return 0


def preset_config(preset: str | AugmentConfig) -> AugmentConfig:
    """The :class:`AugmentConfig` of a preset name (or the config itself)."""
    if isinstance(preset, AugmentConfig):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"unknown augmentation preset {preset!r}; known: {', '.join(PRESETS)}")
    return PRESETS[preset]


@dataclass
class Augment:
    """A configured augmentation: ``augment(images, rows, epoch)`` for a uint8 batch,
    ``params`` to sample (and inspect or replay) and ``apply`` to apply given parameters,
    ``sources`` for decoded photos of any size (the resize folded into the warp).

    On CPU the output buffer of one call is reused by the next once nothing refers to the
    previous result any more; use one instance per thread.

    ``backend`` is ``auto``, ``torch`` or ``cv2`` (see :func:`.ops.resolve_backend`): ``auto``
    runs OpenCV's warps for images on CPU and torch's on other devices.
    """

    config: AugmentConfig
    size: int
    crop: int
    seed: int
    mean: Sequence[float]
    std: Sequence[float]
    stats: dict[str, Any] | None = None
    backend: str = "auto"

    def __post_init__(self) -> None:
        resolve_backend(self.backend, torch.device("cpu"))  # a known name
        if self.crop > self.size:
            raise ValueError(f"crop {self.crop} is larger than the images ({self.size})")
        if self.config.lighting.p > 0 and (not self.stats or "eigval" not in self.stats):
            raise ValueError("PCA lighting needs the store's stats (eigval, eigvec)")
        self._norm = _Normalise(self.mean, self.std)
        self._buffer: tuple[torch.Tensor, int] | None = None
        self._windows: np.ndarray | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_buffer"] = state["_windows"] = None  # a worker process allocates its own
        return state

    def params(self, rows: np.ndarray | Sequence[int], epoch: int) -> AugmentParams:
        return sample_params(self.config, self.seed, epoch, rows, self.size, self.crop, self.stats)

    def apply(self, images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        if images.shape[1:] != (self.size, self.size, 3):
            raise ValueError(
                f"expected (B, {self.size}, {self.size}, 3) uint8 images, got {tuple(images.shape)}"
            )
        out = self._output(len(images), images.device)
        images = pad_images(images, self.config.crop.pad, self.config.crop.pad_mode)
        return apply_params(
            images, params, self.crop, self.mean, self.std, self._norm, out, backend=self.backend
        )

    def _no_pad(self, what: str) -> None:
        if self.config.crop.pad > 0:
            raise ValueError(f"{what} cannot pad before cropping: use Augment.apply")

    def apply_windows(self, windows: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """:meth:`apply` to the ``(B, C, C, 3)`` crop windows ``images[b, top:top + C,
        left:left + C]`` alone (e.g. from :func:`deepimage.data.loader.read_windows`): the
        same result, as every warp stays inside its crop window, without reading the rest."""
        self._no_pad("apply_windows")
        if windows.shape[1:] != (self.crop, self.crop, 3):
            raise ValueError(
                f"expected (B, {self.crop}, {self.crop}, 3) uint8 windows, "
                f"got {tuple(windows.shape)}"
            )
        zero = torch.zeros_like(params.top)
        local = dataclasses.replace(params, top=zero, left=zero)
        out = self._output(len(windows), windows.device)
        return apply_params(
            windows, local, self.crop, self.mean, self.std, self._norm, out, backend=self.backend
        )

    def from_store(
        self, images: np.ndarray, rows: np.ndarray | Sequence[int], epoch: int
    ) -> torch.Tensor:
        """Augment ``images[rows]`` of a store's ``(N, S, S, 3)`` uint8 array (its memmap) on
        CPU, reading only each image's crop window (into a reused buffer, in file order):
        the same result as :meth:`__call__` on the whole images."""
        from deepimage.data.loader import read_windows

        if images.shape[1:] != (self.size, self.size, 3):
            raise ValueError(
                f"expected (N, {self.size}, {self.size}, 3) uint8 images, got {images.shape}"
            )
        rows = np.asarray(rows)
        p = self.params(rows, epoch)
        if self.config.crop.pad > 0:  # the windows reach into the padding: whole images
            return self.apply(torch.from_numpy(np.ascontiguousarray(images[rows])), p)
        shape = (len(rows), self.crop, self.crop, 3)
        if self._windows is None or self._windows.shape[0] < len(rows):
            self._windows = np.empty(shape, np.uint8)
        windows = read_windows(
            images, rows, p.top.numpy(), p.left.numpy(), self.crop, self._windows[: len(rows)]
        )
        out = self._output(len(rows), torch.device("cpu"))
        return apply_crops(list(windows), p, self.crop, self._norm, out, backend=self.backend)

    def _output(self, n: int, device: torch.device) -> torch.Tensor:
        """The output buffer of the previous call when nothing refers to it any more, else a
        new one: a fresh (B, C, C, 3) float tensor costs page faults on every batch."""
        shape = (n, self.crop, self.crop, 3)
        if device.type == "cpu":  # in a loader worker: shared memory, reused once let go
            buf = worker_empty(shape, torch.float32)
            if buf is not None:
                return buf
        if device.type == "cpu" and self._buffer is not None:
            buf, count = self._buffer
            if buf.shape == shape and _use_count(buf) == count:
                return buf
        buf = torch.empty(shape, dtype=torch.float32, device=device)
        if device.type == "cpu":
            count = _use_count(buf)
            self._buffer = (buf, count) if count > 0 else None
        return buf

    def __call__(self, images: torch.Tensor, rows: np.ndarray, epoch: int) -> torch.Tensor:
        return self.apply(images, self.params(rows, epoch))

    def for_epoch(self, epoch: int) -> Callable[[torch.Tensor, np.ndarray], torch.Tensor]:
        """This augmentation at ``epoch`` as ``(images, rows) -> x``: a loader transform,
        run in the loader's worker processes (it pickles without its buffers)."""
        return functools.partial(self, epoch=epoch)

    def sources(
        self,
        images: Sequence[torch.Tensor],
        rows: np.ndarray | Sequence[int],
        epoch: int,
        mode: str = "stretch",
    ) -> torch.Tensor:
        """Decoded ``(H, W, 3)`` uint8 images of any sizes (e.g. ``open_image(path,
        draft_size=S)`` as arrays) -> ``(B, 3, C, C)``, as if each had been resized to S x S
        first (``mode`` as the store's) and then augmented: one interpolation in all.

        The resize is bilinear without the store's antialiasing; decoded with Pillow's
        ``draft`` (reduced DCT scale) a photo is under 2 S per side, so this aliases little.
        """
        self._no_pad("Augment.sources")
        p = self.params(rows, epoch)
        out = self._output(len(images), images[0].device if len(images) else torch.device("cpu"))
        return apply_to_sources(
            images, p, self.size, self.crop, self._norm, mode, out, backend=self.backend
        )


def build_train_augment(
    preset: str | AugmentConfig,
    *,
    size: int,
    crop: int,
    seed: int,
    mean: Sequence[float],
    std: Sequence[float],
    stats: dict[str, Any] | None = None,
    device: torch.device | None = None,
    backend: str = "auto",
) -> Augment:
    """The preset's augmentation; ``stats`` are the store's pixel statistics (PCA lighting).

    ``device`` is accepted for the trainer's call; the augmentation runs wherever the images
    are (CPU or CUDA), with ``backend`` ``auto`` picking OpenCV on CPU and torch elsewhere.
    """
    cfg = preset_config(preset)
    return Augment(cfg, size, crop, seed, tuple(mean), tuple(std), stats, backend)
