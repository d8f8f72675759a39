"""Batches of uint8 images from a prepared store, in an order fixed by (seed, epoch).

The sampler is a pure function: the permutation of an epoch depends only on the seed and the
epoch number, so a resumed run (or, later, a run on any number of processes) walks the same
global sequence of images. Loader workers open the store themselves and read (and, for a
JPEG store, decode) the rows; only the store's path crosses the process boundary, never its
pixels.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from deepimage.rng import Stream, keyed_uniform, permutation


def epoch_order(rows: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """``rows`` shuffled by a permutation that depends only on (seed, epoch)."""
    return np.asarray(rows)[permutation(seed, epoch, len(rows), Stream.EPOCH_ORDER)]


def train_batches(
    rows: np.ndarray, batch_size: int, seed: int, epoch: int, drop_last: bool = True
) -> list[np.ndarray]:
    """The epoch's batches of store rows; the last incomplete batch is dropped by default."""
    order = epoch_order(rows, seed, epoch)
    n = len(order) // batch_size * batch_size if drop_last else len(order)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def eval_batches(rows: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Consecutive batches covering every row exactly once."""
    rows = np.asarray(rows)
    return [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]


def stratified_split(
    labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split row numbers into (train, val) with ``fraction`` of every class in val.

    Which rows go to val depends only on (seed, row), so adding images to a class does not
    reshuffle the others.
    """
    labels = np.asarray(labels)
    rows = np.arange(len(labels))
    if fraction <= 0:
        return rows, rows[:0]
    score = keyed_uniform(seed, -1, rows, 1, stream=Stream.VAL_SPLIT)[:, 0]
    val = []
    for c in np.unique(labels):
        members = rows[labels == c]
        k = int(round(len(members) * fraction))
        k = min(max(k, 1), len(members) - 1) if len(members) > 1 else 0
        val.append(members[np.argsort(score[members], kind="stable")[:k]])
    val_rows = np.sort(np.concatenate(val)) if val else rows[:0]
    return np.setdiff1d(rows, val_rows), val_rows


class StoreBatches(Dataset):
    """Dataset whose item ``i`` is a whole batch: (uint8 images BHWC, labels, rows)."""

    def __init__(self, store_path: str | Path, size: int, batches: Sequence[np.ndarray]):
        self.store_path = str(store_path)
        self.size = size
        self.batches = list(batches)
        self._store = None

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from deepimage.data.store import Store

        if self._store is None:
            self._store = Store.open(self.store_path)
        rows = np.asarray(self.batches[i])
        images = self._store.read(self.size, rows)  # in file order, CRC-checked, decoded
        return (
            torch.from_numpy(images),
            torch.from_numpy(np.asarray(self._store.labels)[rows].astype(np.int64)),
            torch.from_numpy(rows.astype(np.int64)),
        )

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_store"] = None
        return state


def read_windows(
    images: np.ndarray,
    rows: np.ndarray,
    top: np.ndarray,
    left: np.ndarray,
    crop: int,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """The ``(B, C, C, 3)`` uint8 windows ``images[row, top:top + C, left:left + C]`` of a
    store's ``(N, S, S, 3)`` images (a memmap): only the crop windows, which are all that an
    augmentation reads, instead of whole images (a fifth of the bytes at 224 of 512).
    Rows are read in file order; ``out`` is filled when given."""
    rows, pixels = np.asarray(rows), np.asarray(images)  # plain views index faster
    if out is None:
        out = np.empty((len(rows), crop, crop, pixels.shape[-1]), dtype=pixels.dtype)
    for i in np.argsort(rows, kind="stable"):
        t, lf = int(top[i]), int(left[i])
        out[i] = pixels[rows[i], t : t + crop, lf : lf + crop]
    return out


def iterate_batches(
    store_path: str | Path,
    size: int,
    batches: Sequence[np.ndarray],
    workers: int = 0,
    pin_memory: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield the given batches in order, read ahead by ``workers`` processes.

    A :class:`~deepimage.data.index.DataError` in a worker (e.g. a corrupt shard) is raised
    here with its own one-line message.
    """
    if not batches:
        return iter(())
    dataset = StoreBatches(store_path, size, batches)
    workers = min(workers, len(batches))
    loader = DataLoader(
        dataset,
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=4 if workers else None,
        # An explicit generator keeps the loader from drawing on the global RNG, which
        # would otherwise shift dropout masks between runs with different worker counts.
        generator=torch.Generator().manual_seed(0),
        persistent_workers=False,
    )
    return _one_line_errors(iter(loader))


def _one_line_errors(it: Iterator) -> Iterator:
    """Re-raise a worker's DataError with its own message instead of torch's wrapper text."""
    from deepimage.data.index import DataError

    try:
        yield from it
    except DataError as e:
        stop = getattr(it, "_shutdown_workers", None)  # now, not when collected
        if stop is not None:
            stop()
        lines = [line for line in str(e).splitlines() if line.strip()]
        if len(lines) > 1 and lines[0].startswith("Caught "):  # DataLoader's re-raise
            last = lines[-1].split(": ", 1)[-1]
            raise type(e)(last) from None
        raise


class DeviceCache:
    """Training images held in device memory, batches gathered there (paper 3.1).

    "We also use device memory to cache the training data if there is free memory space on
    the device after the model is loaded." Every rank holds all training rows: the global
    order of images is the same for any number of processes, so any rank may need any image.
    Batches come out exactly as from :func:`iterate_batches`, but already on the device.
    """

    def __init__(self, store_path: str | Path, size: int, rows: np.ndarray, device) -> None:
        from deepimage.data.store import Store

        store = Store.open(store_path)
        self.rows = np.unique(np.asarray(rows))
        images = store.read(size, self.rows)
        self.images = torch.from_numpy(images).to(device)
        self.labels = torch.from_numpy(np.asarray(store.labels)[self.rows].astype(np.int64))
        self.labels = self.labels.to(device)

    @staticmethod
    def nbytes(n_rows: int, size: int) -> int:
        """Device bytes needed for ``n_rows`` images of ``size x size x 3`` uint8."""
        return n_rows * size * size * 3

    def iterate(
        self, batches: Sequence[np.ndarray]
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for batch in batches:
            batch = np.asarray(batch)
            pos = torch.from_numpy(np.searchsorted(self.rows, batch)).to(self.images.device)
            yield self.images[pos], self.labels[pos], torch.from_numpy(batch.astype(np.int64))
