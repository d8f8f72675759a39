"""One home for randomness: every draw of a training run is a pure function of named keys.

The one scheme by which ``seed`` reaches its consumers: the run's ``seed`` is handed
unchanged to each consumer, and each consumer draws only from its own named
:class:`Stream`, whose key is :func:`stream_seed` ``(seed, stream)`` (SplitMix64 of the seed,
then of the stream; Steele et al., 2014). A consumer's generator takes that key and its
counters (epoch or step, image row, unit) and nothing else. No draw depends on the rank,
the number of processes, loader workers or threads, or the batch split, so a resumed run,
or one on another number of processes, continues exactly.

=====================  ================================  ======================================
consumer               stream                            stream_seed(seed, stream), then
=====================  ================================  ======================================
validation split       :attr:`Stream.VAL_SPLIT`          (row) -> :func:`keyed_uniform`
epoch order            :attr:`Stream.EPOCH_ORDER`        (epoch) -> :func:`permutation`
augmentation           :attr:`Stream.AUGMENT`            (epoch, row) -> :func:`keyed_uniform`
data-dependent init    :attr:`Stream.DATA_INIT`          (0) -> :func:`permutation`
dropout masks          :attr:`Stream.DROPOUT_FC1`,       (step, row, unit) -> :func:`dropout_keys`,
                       :attr:`Stream.DROPOUT_FC2`        :func:`unit_uniform`
weight initialisation  :attr:`Stream.WEIGHT_INIT`        torch's global generator,
                                                         :func:`seed_global`
corruptions            :attr:`Stream.CORRUPTION`         (row) -> :func:`row_generators`
FC layer rows          one key per Linear, drawn by      (key, row) -> :func:`keyed_normal_rows`
                       weight initialisation
=====================  ================================  ======================================

(The corruptions of ``evaluate --corrupt`` take their own ``--corrupt-seed`` through the same
scheme.) The generators suit where they run: :func:`keyed_uniform` is SplitMix64 vectorised
over rows with NumPy's wrapping uint64 arithmetic; :func:`permutation` and
:func:`row_generators` are NumPy's PCG64 seeded with the key's two halves and the counter;
dropout uses a 32-bit integer mix on int64 tensors (:func:`hash32`), the same bits on any
device. Weight initialisation is the one use of torch's global generator (seeded once, saved
in checkpoints); dropout outside :func:`dropout_keys` falls back to it.
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
    WEIGHT_INIT = 3  # torch's global generator, which initialises the weights
    CORRUPTION = 4  # per-image noise and signs of evaluate's corruptions
    VAL_SPLIT = 7  # which rows a stratified split holds out for validation
    AUGMENT = 21  # every augmentation parameter of an image in an epoch
    DATA_INIT = 31  # which training images set a data-initialised layer (patch whitening)
    EPOCH_ORDER = 0x5EED  # the permutation of the training rows in an epoch


# --- the one derivation ---------------------------------------------------------------------

M64 = 0xFFFFFFFFFFFFFFFF


def _splitmix64(x: int) -> int:
    z = (x + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def stream_seed(seed: int, stream: Stream | int) -> int:
    """The 64-bit key of one stream of a run's ``seed``: how every consumer gets its seed."""
    return _splitmix64(_splitmix64(seed & M64) ^ (int(stream) & M64))


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
    key = np.array([stream_seed(seed, stream)], dtype=np.uint64)
    base = _mix(key ^ np.uint64(epoch & M64))
    per_image = _mix(base ^ idx)[:, None]
    counters = np.arange(n, dtype=np.uint64)[None, :]
    bits = _mix(per_image ^ _mix(counters))
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


# --- keyed permutations (PCG64, NumPy) -------------------------------------------------------


def permutation(
    seed: int, epoch: int, n: int, stream: Stream | int = Stream.EPOCH_ORDER
) -> np.ndarray:
    """A permutation of ``range(n)`` that depends only on (seed, epoch, stream)."""
    return np.random.default_rng([*_halves(stream_seed(seed, stream)), epoch & M64]).permutation(n)


def row_generators(
    seed: int, rows: np.ndarray | list[int], stream: Stream | int = Stream.CORRUPTION
) -> list[np.random.Generator]:
    """One NumPy generator per image row, each a pure function of (seed, stream, row)."""
    key = _halves(stream_seed(seed, stream))
    return [np.random.default_rng([*key, int(r) & M64]) for r in rows]


def _halves(key: int) -> tuple[int, int]:
    return key & 0xFFFFFFFF, key >> 32


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
    """The identity of every image of a batch, and the run's seed and step."""

    rows: torch.Tensor  # int64 (B,)
    seed: int
    step: int

    def salt(self, stream: Stream | int) -> int:
        """The 32-bit key of ``stream``'s masks at this step."""
        key = stream_seed(self.seed, stream)
        folded = hash32(torch.tensor([(key ^ (key >> 32)) & M32]))
        return int(hash32(folded ^ (self.step & M32))[0])


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
    rows = torch.as_tensor(rows, dtype=torch.int64).reshape(-1)
    return use_dropout_keys(DropoutKeys(rows, seed, step))


def unit_uniform(
    keys: DropoutKeys, stream: Stream | int, first_unit: int, n_units: int, device: torch.device
) -> torch.Tensor:
    """``(B, n_units)`` float32 uniforms in [0, 1) for units ``first_unit, ...`` of every
    image in ``keys``: the same value for an (image, unit) whichever rank computes it."""
    rows = keys.rows.to(device) & M32
    base = hash32(rows ^ hash32(torch.tensor(keys.salt(stream), device=device)))
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
    """Seed torch's global generator from the run's ``seed`` (:attr:`Stream.WEIGHT_INIT`): it
    initialises the weights (and drives dropout outside :func:`dropout_keys`); checkpoints
    save its state."""
    torch.manual_seed(stream_seed(seed, Stream.WEIGHT_INIT))
