"""One home for randomness: every draw of a training run is a pure function of named keys.

The scheme by which ``seed`` reaches its consumers: the run's ``seed`` is handed unchanged to
each consumer, and each consumer draws from its own named :class:`Stream`, keyed by
(seed, stream, epoch or step, image row, unit), through a function of this module. No draw
depends on the rank, the number of processes, loader workers or threads, or the batch split,
so a resumed run, or one on another number of processes, continues exactly.

=====================  ================================  ==========================================
consumer               stream                            key -> generator
=====================  ================================  ==========================================
validation split       :attr:`Stream.VAL_SPLIT`          (seed, row) -> :func:`keyed_uniform`
epoch order            :attr:`Stream.EPOCH_ORDER`        (seed, epoch) -> :func:`permutation`
augmentation           :attr:`Stream.AUGMENT`            (seed, epoch, row) -> :func:`keyed_uniform`
data-dependent init    :attr:`Stream.DATA_INIT`          (seed, 0) -> :func:`permutation`
dropout masks          :attr:`Stream.DROPOUT_FC1`, ...   (seed, step, row, unit) ->
                                                         :func:`dropout_keys`, :func:`unit_uniform`
weight initialisation  torch's global generator          :func:`seed_global` (seed)
FC layer rows          one key per layer from the above  (key, row) -> :func:`keyed_normal_rows`
=====================  ================================  ==========================================

The generators differ by stream only for history: each produces, bit for bit, what the run
produced before the streams were named, so results and checkpoints stay reproducible.
:func:`keyed_uniform` is SplitMix64 (Steele et al., 2014) vectorised over rows with NumPy's
wrapping uint64 arithmetic; :func:`permutation` is NumPy's PCG64 seeded with
``[seed, epoch, stream]``; dropout uses a 32-bit integer mix on int64 tensors (:func:`hash32`),
the same bits on any device. Weight initialisation is the one use of torch's global generator
(seeded once, saved in checkpoints); dropout outside :func:`dropout_keys` falls back to it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum, unique

import numpy as np
import torch


@unique
class Stream(IntEnum):
    """Independent uses of one seed. Values are part of the results: never renumber."""

    DEFAULT = 0  # keyed_uniform's default and a lone KeyedDropout
    DROPOUT_FC1 = 1  # dropout after the first FC layer of the paper's head
    DROPOUT_FC2 = 2  # dropout after the second FC layer
    VAL_SPLIT = 7  # which rows a stratified split holds out for validation
    AUGMENT = 21  # every augmentation parameter of an image in an epoch
    DATA_INIT = 31  # which training images set a data-initialised layer (patch whitening)
    EPOCH_ORDER = 0x5EED  # the permutation of the training rows in an epoch


# --- keyed uniforms (SplitMix64, NumPy) ------------------------------------------------------

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def keyed_uniform(
    seed: int,
    epoch: int,
    indices: np.ndarray | list[int],
    n: int,
    stream: Stream | int = Stream.DEFAULT,
) -> np.ndarray:
    """``(len(indices), n)`` float64 uniforms in [0, 1), one row per image index.

    ``stream`` separates independent uses (e.g. augmentation and the validation split) of
    the same key.
    """
    idx = np.asarray(indices, dtype=np.int64).astype(np.uint64)
    base = _mix(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
    base = _mix(base ^ np.uint64(epoch & 0xFFFFFFFFFFFFFFFF))
    base = _mix(base ^ np.uint64(int(stream) & 0xFFFFFFFFFFFFFFFF))
    per_image = _mix(base ^ idx)[:, None]
    counters = np.arange(n, dtype=np.uint64)[None, :]
    bits = _mix(per_image ^ _mix(counters))
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


# --- keyed permutations (PCG64, NumPy) -------------------------------------------------------


def permutation(
    seed: int, epoch: int, n: int, stream: Stream | int = Stream.EPOCH_ORDER
) -> np.ndarray:
    """A permutation of ``range(n)`` that depends only on (seed, epoch, stream)."""
    rng = np.random.default_rng([seed & 0xFFFFFFFF, epoch, int(stream)])
    return rng.permutation(n)


# --- dropout masks keyed by image, not by process (torch) ------------------------------------

M32 = 0xFFFFFFFF


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix on int64 tensors holding values in [0, 2^32).

    Multipliers stay below 2^31, so no product leaves the int64 range: the same bits on any
    device.
    """
    for mult in (0x2C1B3C6D, 0x297A2D39, 0x7FEB352D):
        x = x ^ (x >> 16)
        x = (x * mult) & M32
    return x ^ (x >> 15)


@dataclass(frozen=True)
class DropoutKeys:
    """The identity of every image of a batch and the (seed, step) salt of its masks."""

    rows: torch.Tensor  # int64 (B,)
    salt: int


_active: DropoutKeys | None = None


def active_dropout_keys() -> DropoutKeys | None:
    """The keys set by the innermost :func:`dropout_keys` or :func:`use_dropout_keys`."""
    return _active


@contextlib.contextmanager
def use_dropout_keys(keys: DropoutKeys | None) -> Iterator[None]:
    """Within this block, keyed dropout draws from ``keys`` (``None``: the global generator)."""
    global _active
    previous = _active
    _active = keys
    try:
        yield
    finally:
        _active = previous


def dropout_keys(rows: torch.Tensor, seed: int, step: int) -> contextlib.AbstractContextManager:
    """Within this block, keyed dropout draws image ``i``'s mask from
    (seed, step, rows[i], stream, unit) alone, so masks do not depend on how a global batch is
    split between processes or micro-batches."""
    seed_h = int(hash32(torch.tensor([seed & M32]))[0])
    salt = int(hash32(torch.tensor([seed_h ^ (step & M32)]))[0])
    rows = torch.as_tensor(rows, dtype=torch.int64).reshape(-1)
    return use_dropout_keys(DropoutKeys(rows, salt))


def unit_uniform(
    keys: DropoutKeys, stream: Stream | int, first_unit: int, n_units: int, device: torch.device
) -> torch.Tensor:
    """``(B, n_units)`` float32 uniforms in [0, 1) for units ``first_unit, ...`` of every
    image in ``keys``: the same value for an (image, unit) whichever rank computes it."""
    rows = keys.rows.to(device) & M32
    base = hash32(rows ^ hash32(torch.tensor(keys.salt ^ int(stream), device=device)))
    units = hash32(torch.arange(first_unit, first_unit + n_units, device=device, dtype=torch.int64))
    bits = hash32(base[:, None] ^ units[None, :])
    return (bits >> 8).to(torch.float32) * (1.0 / (1 << 24))


# --- rows of a weight matrix, any slice alone (torch) ----------------------------------------


def keyed_normal_rows(key: int, lo: int, hi: int, cols: int, std: float) -> torch.Tensor:
    """Rows ``[lo, hi)`` of a ``(rows, cols)`` float32 matrix of N(0, std^2) draws.

    Row ``i`` comes from a generator seeded by (key, i) alone, so a process that holds only
    some rows of a layer (hybrid parallelism) computes exactly those rows of the whole matrix,
    without ever holding the rest.
    """
    out = torch.empty(max(0, hi - lo), cols, device="cpu")
    if hi <= lo:
        return out
    base = _mix(np.array([key & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
    seeds = _mix(base ^ np.arange(lo, hi, dtype=np.uint64))
    gen = torch.Generator(device="cpu")
    for i, seed in enumerate(seeds.tolist()):
        gen.manual_seed(int(seed))
        out[i].normal_(0.0, std, generator=gen)
    return out


# --- the one use of a global generator --------------------------------------------------------


def seed_global(seed: int) -> None:
    """Seed torch's global generator, which initialises the weights (and drives dropout
    outside :func:`dropout_keys`); checkpoints save its state."""
    torch.manual_seed(seed)
