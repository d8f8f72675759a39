"""Counter-based random numbers keyed by (seed, epoch, image index).

Each image's augmentation parameters are a pure function of its key, so the augmented images
are the same whatever the batch size, the number of loader workers or processes, and a
resumed run draws exactly what the uninterrupted one would have. The hash is SplitMix64
(Steele et al., 2014), vectorised over indices with NumPy's wrapping uint64 arithmetic.
"""

from __future__ import annotations

import numpy as np

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
    seed: int, epoch: int, indices: np.ndarray | list[int], n: int, stream: int = 0
) -> np.ndarray:
    """``(len(indices), n)`` float64 uniforms in [0, 1), one row per image index.

    ``stream`` separates independent uses (e.g. cropping and colour) of the same key.
    """
    idx = np.asarray(indices, dtype=np.int64).astype(np.uint64)
    base = _mix(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
    base = _mix(base ^ np.uint64(epoch & 0xFFFFFFFFFFFFFFFF))
    base = _mix(base ^ np.uint64(stream & 0xFFFFFFFFFFFFFFFF))
    per_image = _mix(base ^ idx)[:, None]
    counters = np.arange(n, dtype=np.uint64)[None, :]
    bits = _mix(per_image ^ _mix(counters))
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
