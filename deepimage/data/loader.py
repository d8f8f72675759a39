"""Batches of uint8 images from a prepared store, in an order fixed by (seed, epoch).

The sampler is a pure function: the permutation of an epoch depends only on the seed and the
epoch number, so a resumed run (or, later, a run on any number of processes) walks the same
global sequence of images. Loader workers open the store themselves and read (and, for a
JPEG store, decode) the rows; only the store's path crosses the process boundary, never its
pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

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


BatchTransform = Callable[[torch.Tensor, np.ndarray], torch.Tensor]


def decode_on_device(device: torch.device | str, encoding: str) -> bool:
    """Whether batches of a store with ``encoding`` are decoded on ``device`` itself: JPEG
    rows on CUDA (nvjpeg, :func:`~deepimage.data.decode.decode_jpegs_on_device`); on CPU the
    loader workers decode."""
    return torch.device(device).type == "cuda" and encoding == "jpeg"


InputPath = Literal["cache", "device-decode", "worker-augment", "worker-decode"]


def input_path(device: torch.device | str, encoding: str, cached: bool) -> InputPath:
    """Where a training batch is decoded and augmented, by device and store encoding:

    ``cache``           the device cache (:class:`DeviceCache`) decodes; augmented on device
    ``device-decode``   CUDA and a JPEG store: workers read the bytes (pinned), the GPU
                        decodes them as one batch (nvjpeg) and augments (torch backend)
    ``worker-augment``  CPU: the workers decode and augment; the training process only trains
    ``worker-decode``   other devices: the workers decode, the device augments
    """
    device = torch.device(device)
    if cached:
        return "cache"
    if decode_on_device(device, encoding):
        return "device-decode"
    return "worker-augment" if device.type == "cpu" else "worker-decode"


class BatchSlots:
    """Batch buffers in shared memory that loader workers fill and reuse once the training
    process has let go of them.

    A fresh shared buffer per batch costs a page fault per 4 KiB page, in the worker and
    again in the training process: on a virtual machine as much time as augmenting the batch.
    Each worker owns ``per_worker`` slots and a flag per slot, in shared memory, says whether
    the slot is busy. A worker sets the flag when it takes a free slot; the training process
    (:func:`iterate_batches`) clears it once nothing there refers to the batch any more: no
    tensor, view or array on its memory (the memory's use count tells). Neither side ever
    waits on the other: a worker that finds no free slot takes fresh memory. A slot's memory
    crosses to the training process once; later batches in it are sent as a
    :class:`SlotRef` (its shape and strides) and viewed there, mapping no new pages.
    """

    def __init__(self, workers: int, per_worker: int) -> None:
        self.busy = torch.zeros((workers, per_worker), dtype=torch.uint8).share_memory_()
        self.taken = -1  # the slot of the batch being made in this worker, -1 for none
        self._storages: dict[int, torch.UntypedStorage] = {}  # this worker's slots
        self._sent: set[int] = set()  # slots whose memory the training process holds

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "taken": -1, "_storages": {}, "_sent": set()}

    def empty(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """A ``shape`` tensor in a free slot of this worker (fresh memory if none is free)."""
        info = get_worker_info()
        wid = info.id if info is not None else 0
        busy = self.busy[wid].numpy()
        nbytes = int(np.prod(shape)) * dtype.itemsize
        for k in np.flatnonzero(busy == 0).tolist():
            slot = wid * len(busy) + k
            storage = self._storages.get(slot)
            if storage is None or storage.nbytes() < nbytes:
                storage = self._storages[slot] = torch.UntypedStorage._new_shared(nbytes)
                self._sent.discard(slot)
            busy[k] = 1
            self.taken = slot
            return torch.empty(0, dtype=dtype).set_(storage, 0, tuple(shape))
        return shared_empty(shape, dtype)

    def handed_over(self, images: Any) -> tuple[Any, int]:
        """What a worker sends for ``images``: a :class:`SlotRef` when they lie in the slot
        taken for this batch and its memory was sent before, else the tensor itself; and
        the slot (-1 for none)."""
        slot, self.taken = self.taken, -1
        if slot < 0:
            return images, -1
        storage = self._storages[slot]
        if not isinstance(images, torch.Tensor) or images.untyped_storage().data_ptr() != (
            storage.data_ptr()
        ):  # the result is elsewhere: the slot is free again
            self.busy.view(-1)[slot] = 0
            return images, -1
        if slot in self._sent:
            return SlotRef(tuple(images.shape), images.stride(), images.dtype), slot
        self._sent.add(slot)
        return images, slot


class SlotRef:
    """A batch in a slot whose memory the training process already holds: its layout."""

    def __init__(self, shape: tuple[int, ...], stride: tuple[int, ...], dtype: torch.dtype):
        self.shape, self.stride, self.dtype = shape, stride, dtype

    def view(self, storage: torch.UntypedStorage) -> torch.Tensor:
        return torch.empty(0, dtype=self.dtype).set_(storage, 0, self.shape, self.stride)


def shared_empty(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """A tensor in fresh shared memory, as ``default_collate`` makes a worker's batch:
    handing it to the training process then copies nothing."""
    nbytes = int(np.prod(shape)) * dtype.itemsize
    return torch.empty(0, dtype=dtype).set_(torch.UntypedStorage._new_shared(nbytes), 0, shape)


_slots: BatchSlots | None = None  # the slots of the batch being made in this worker


def worker_empty(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor | None:
    """In a loader worker, a tensor in shared memory for a batch's result (a reused slot
    under :func:`iterate_batches`); None in the training process, which allocates (and
    reuses) its own buffers."""
    if get_worker_info() is None:
        return None
    return _slots.empty(shape, dtype) if _slots is not None else shared_empty(shape, dtype)


class StoreBatches(Dataset):
    """Dataset whose item ``i`` is a whole batch: (images, labels, rows).

    ``images`` are the decoded ``(B, S, S, 3)`` uint8 rows, or ``transform(those, rows)``
    (e.g. the training augmentation, run in the worker), or with ``encoded`` the rows' JPEG
    bytes as 1-D uint8 tensors, for a decoder on the training device.
    """

    def __init__(
        self,
        store_path: str | Path,
        size: int,
        batches: Sequence[np.ndarray],
        transform: BatchTransform | None = None,
        encoded: bool = False,
        slots: BatchSlots | None = None,
    ):
        self.store_path = str(store_path)
        self.size = size
        self.batches = list(batches)
        self.transform = transform
        self.encoded = encoded
        self.slots = slots
        self._store = None
        self._buffer: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> tuple[Any, torch.Tensor, torch.Tensor, int]:
        """The batch and, with ``slots``, the slot that holds it (-1 for none)."""
        global _slots
        from deepimage.data.store import Store

        if self._store is None:
            self._store = Store.open(self.store_path)
        rows = np.asarray(self.batches[i])
        labels = torch.from_numpy(np.asarray(self._store.labels)[rows].astype(np.int64))
        _slots = self.slots
        try:
            if self.encoded:
                blobs = self._store.read_encoded(self.size, rows)
                images: Any = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
            elif self.transform is None:  # CRC-checked, decoded
                shape = (len(rows), self.size, self.size, 3)
                images = worker_empty(shape, torch.uint8)
                if images is None:
                    images = torch.from_numpy(self._store.read(self.size, rows))
                else:
                    self._store.read(self.size, rows, out=images.numpy())
            else:  # decoded into a reused buffer: only the transform's result leaves
                shape = (len(rows), self.size, self.size, 3)
                if self._buffer is None or self._buffer.shape != shape:
                    self._buffer = np.empty(shape, np.uint8)
                pixels = self._store.read(self.size, rows, out=self._buffer)
                images = self.transform(torch.from_numpy(pixels), rows)
            slot = -1
            if self.slots is not None:
                images, slot = self.slots.handed_over(images)
        finally:
            _slots = None
            if self.slots is not None and self.slots.taken >= 0:  # failed: free it again
                self.slots.busy.view(-1)[self.slots.taken] = 0
                self.slots.taken = -1
        return images, labels, torch.from_numpy(rows.astype(np.int64)), slot

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_store"] = state["_buffer"] = None
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
    transform: BatchTransform | None = None,
    encoded: bool = False,
) -> Iterator[tuple[Any, torch.Tensor, torch.Tensor]]:
    """Yield the given batches in order, read ahead by ``workers`` processes.

    With ``transform`` the workers also apply it (decoding and augmentation off the training
    process); with ``encoded`` they yield JPEG bytes (see :class:`StoreBatches`). Either way a
    batch depends only on its rows, never on the number of workers. A
    :class:`~deepimage.data.index.DataError` in a worker (e.g. a corrupt shard) is raised
    here with its own one-line message.
    """
    if not batches:
        return iter(())
    workers = min(workers, len(batches))
    prefetch = 2 if transform is not None else 4
    # a worker's batches alive at once: those it reads ahead, and the two the consumer may
    # hold (the one it works on and, while it asks for the next, the one before)
    slots = BatchSlots(workers, prefetch + 2) if workers and not (encoded or pin_memory) else None
    dataset = StoreBatches(store_path, size, batches, transform, encoded, slots)
    loader = DataLoader(
        dataset,
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=prefetch if workers else None,
        # An explicit generator keeps the loader from drawing on the global RNG, which
        # would otherwise shift dropout masks between runs with different worker counts.
        generator=torch.Generator().manual_seed(0),
        persistent_workers=False,
    )
    return _recycled(_one_line_errors(iter(loader)), slots)


def _recycled(
    batches: Iterator[tuple[Any, torch.Tensor, torch.Tensor, int]], slots: BatchSlots | None
) -> Iterator[tuple[Any, torch.Tensor, torch.Tensor]]:
    """Yield the batches without their slots; free a slot once nothing refers to its memory
    but this generator (see :class:`BatchSlots`)."""
    busy = slots.busy.view(-1) if slots is not None else None
    mapped: dict[int, torch.UntypedStorage] = {}  # slot: its memory, kept mapped here
    held: set[int] = set()  # slots whose batch was yielded and may still be in use
    for images, labels, rows, slot in batches:
        if busy is not None and slot >= 0:
            if isinstance(images, SlotRef):
                images = images.view(mapped[slot])
            else:
                mapped[slot] = images.untyped_storage()
            held.add(slot)
        yield images, labels, rows
        del images
        for s in [s for s in held if _storage_users(mapped[s]) == 1]:  # this dict's alone
            held.discard(s)
            busy[s] = 0


def _storage_users(storage: torch.UntypedStorage) -> int:
    """How many references the memory of ``storage`` has (0 where torch cannot tell)."""
    try:
        return int(torch._C._storage_Use_Count(storage._cdata))
    except (AttributeError, RuntimeError):
        return 0


def decode_batches(
    batches: Iterator[tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]],
    device: torch.device,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Batches of JPEG bytes (``iterate_batches(..., encoded=True)``) decoded on ``device``
    as whole batches: ``(B, S, S, 3)`` uint8 there, then augmented there by the caller."""
    from deepimage.data.decode import decode_jpegs_on_device

    for blobs, labels, rows in batches:
        yield decode_jpegs_on_device(blobs, device), labels, rows


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


def rank_rows(
    rows: np.ndarray, batch_size: int, seed: int, epochs: Sequence[int], lo: int, hi: int
) -> np.ndarray:
    """The sorted rows a rank reads in ``epochs`` when it takes ``[lo:hi)`` of every global
    batch of :func:`train_batches`: its share, which grows to all rows over a few epochs
    (any rank may need any image), so the search stops once every row is in it."""
    everything = np.unique(np.asarray(rows))
    need = everything[:0]
    for epoch in epochs:
        batches = train_batches(rows, batch_size, seed, epoch)
        if batches:
            need = np.union1d(need, np.concatenate([b[lo:hi] for b in batches]))
        if len(need) == len(everything):
            break
    return need


class DeviceCache:
    """Training images held in device memory, batches gathered there (paper 3.1).

    "We also use device memory to cache the training data if there is free memory space on
    the device after the model is loaded." The cache holds the rows as the store does: a
    JPEG store's encoded bytes (about a tenth of the pixels), decoded per batch (on CUDA by
    nvjpeg, as one batch; on CPU by the store's decoder), a raw store's pixels as they are.
    It holds ``rows``: a rank passes its share (:func:`rank_rows`), which is all rows unless
    the run is short, since the global order of images is the same for any number of
    processes. Batches come out as from :func:`iterate_batches` (with the device's decoder),
    but already on the device.
    """

    CHUNK = 4096  # rows read from the store at a time while filling the cache

    def __init__(self, store_path: str | Path, size: int, rows: np.ndarray, device) -> None:
        from deepimage.data.store import Store

        store = Store.open(store_path)
        self.device = torch.device(device)
        self.size = size
        self.rows = np.unique(np.asarray(rows))
        self.encoded = store.version >= 2 and store.encoding == "jpeg"
        chunks = [self.rows[i : i + self.CHUNK] for i in range(0, len(self.rows), self.CHUNK)]
        if self.encoded:
            lengths = store.stored_lengths(size, self.rows)
            self.offsets = np.concatenate([[0], np.cumsum(lengths)])
            self.data = torch.empty(int(self.offsets[-1]), dtype=torch.uint8, device=device)
            done = 0
            for chunk in chunks:
                flat = np.frombuffer(b"".join(store.read_encoded(size, chunk)), np.uint8)
                self.data[done : done + len(flat)] = torch.from_numpy(flat.copy())
                done += len(flat)
        else:
            self.data = torch.empty((len(self.rows), size, size, 3), dtype=torch.uint8)
            self.data = self.data.to(device)
            done = 0
            for chunk in chunks:
                self.data[done : done + len(chunk)] = torch.from_numpy(store.read(size, chunk))
                done += len(chunk)
        self.labels = torch.from_numpy(np.asarray(store.labels)[self.rows].astype(np.int64))
        self.labels = self.labels.to(device)
        store.close()

    @staticmethod
    def nbytes(store, size: int, rows: np.ndarray) -> int:
        """Device bytes needed to hold ``rows`` of ``store`` at ``size`` (encoded, if JPEG)."""
        return int(store.stored_lengths(size, np.unique(np.asarray(rows))).sum())

    def _positions(self, batch: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(self.rows, batch)
        if len(batch) and (pos.max() >= len(self.rows) or (self.rows[pos] != batch).any()):
            missing = batch[
                (pos >= len(self.rows)) | (self.rows[np.minimum(pos, len(self.rows) - 1)] != batch)
            ]
            raise ValueError(f"row {int(missing[0])} is not held in the device cache")
        return pos

    def _decode(self, pos: np.ndarray) -> torch.Tensor:
        from deepimage.data.decode import decode_jpeg, decode_jpegs_on_device

        starts, ends = self.offsets[pos], self.offsets[pos + 1]
        if self.device.type == "cuda":  # one copy of the batch's bytes to the host: nvjpeg
            parts = [self.data[int(a) : int(b)] for a, b in zip(starts, ends)]
            host = torch.cat(parts).cpu().pin_memory()
            blobs = list(torch.split(host, (ends - starts).tolist()))
            return decode_jpegs_on_device(blobs, self.device)
        data = self.data.numpy()
        out = np.empty((len(pos), self.size, self.size, 3), np.uint8)
        for i, (a, b) in enumerate(zip(starts, ends)):
            decode_jpeg(memoryview(data[int(a) : int(b)]), out[i])
        return torch.from_numpy(out).to(self.device)

    def iterate(
        self, batches: Sequence[np.ndarray]
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for batch in batches:
            batch = np.asarray(batch)
            pos = self._positions(batch)
            if self.encoded:
                images = self._decode(pos)
            else:
                images = self.data[torch.from_numpy(pos).to(self.device)]
            on_dev = torch.from_numpy(pos).to(self.device)
            yield images, self.labels[on_dev], torch.from_numpy(batch.astype(np.int64))
