"""Prepared multi-scale image store: its format, and :class:`Store`, the reader.

Layout of a store folder::

    manifest.json     written last; format version, sizes, mode, classes, fingerprints, stats
    labels.npy        int64 (N,)
    paths.json        source path of each row
    skipped.json      [{"path", "reason"}] for files that could not be decoded
    images_<S>.u8     raw uint8, shape (N, S, S, 3), one file per size

A store is built in a hidden sibling folder and renamed into place only when complete, so a
store folder with a valid manifest is always whole; anything else (a leftover build folder,
a missing or inconsistent manifest) raises :class:`IncompleteStoreError` on open and is
rebuilt by :func:`~deepimage.data.prepare.prepare_store`. :func:`~deepimage.data.cache.store_for`
finds or prepares the store of a folder or CSV in the cache.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from deepimage.data.decode import ResizeMode, check_mode
from deepimage.data.index import DataError, DatasetIndex, Sample

STORE_FORMAT = "deepimage-store"
STORE_VERSION = 1
MANIFEST = "manifest.json"
LABELS = "labels.npy"
PATHS = "paths.json"
SKIPPED = "skipped.json"


class IncompleteStoreError(DataError):
    """A store folder is half-written or inconsistent; it must be prepared again."""


def images_file(size: int) -> str:
    """File name of the uint8 array for one image size."""
    return f"images_{size}.u8"


def is_store_file(name: str) -> bool:
    """Whether ``name`` is one of a store folder's files."""
    if name in (MANIFEST, MANIFEST + ".tmp", LABELS, PATHS, SKIPPED):
        return True
    return name.startswith("images_") and name.endswith(".u8")


def leftover_builds(out: Path) -> list[Path]:
    """Build folders left next to ``out`` by an interrupted preparation."""
    if not out.parent.is_dir():
        return []
    prefixes = (f".{out.name}.partial-", f".{out.name}.old-")
    return sorted(p for p in out.parent.iterdir() if p.name.startswith(prefixes))


# --------------------------------------------------------------------------- store


class Store:
    """A prepared store opened read-only; images are memory-mapped on first use."""

    def __init__(
        self,
        path: Path,
        manifest: dict[str, Any],
        labels: np.ndarray,
        paths: list[str],
        skipped: list[dict[str, str]],
    ) -> None:
        self.path = path
        self.manifest = manifest
        self.sizes: list[int] = list(manifest["sizes"])
        self.mode: ResizeMode = manifest["mode"]
        self.classes: list[str] = list(manifest["classes"])
        self.class_names: dict[str, str] = dict(manifest.get("class_names") or {})
        self.root: str = manifest.get("root", "")
        self.stats: dict[str, Any] = dict(manifest["stats"])
        self.labels = labels
        self.paths = paths
        self.skipped = skipped
        self._images: dict[int, np.memmap] = {}

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Store:
        """Open and validate a complete store; raise :class:`IncompleteStoreError` otherwise."""
        p = Path(path).expanduser().absolute()

        def incomplete(why: str) -> IncompleteStoreError:
            return IncompleteStoreError(f"incomplete store at {p}: {why}; prepare it again")

        if not p.is_dir():
            left = leftover_builds(p)
            if left:
                raise incomplete(f"preparation was interrupted (left {left[0].name})")
            raise DataError(f"no store at {p}")
        if not (p / MANIFEST).is_file():
            raise incomplete(f"no {MANIFEST} (preparation interrupted?)")
        try:
            manifest = json.loads((p / MANIFEST).read_text(encoding="utf-8"))
            if manifest.get("format") != STORE_FORMAT:
                raise incomplete(f"{MANIFEST} is not a {STORE_FORMAT} manifest")
            if manifest.get("version") != STORE_VERSION:
                raise incomplete(f"store version {manifest.get('version')} != {STORE_VERSION}")
            n = int(manifest["n"])
            sizes = [int(s) for s in manifest["sizes"]]
            check_mode(manifest["mode"])
            for key in ("classes", "stats", "fingerprint"):
                manifest[key]  # noqa: B018 -- presence check
        except IncompleteStoreError:
            raise
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise incomplete(f"unreadable {MANIFEST} ({type(e).__name__}: {e})") from None
        try:
            labels = np.load(p / LABELS, allow_pickle=False)
            paths = json.loads((p / PATHS).read_text(encoding="utf-8"))
            skipped = json.loads((p / SKIPPED).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise incomplete(f"unreadable data files ({type(e).__name__}: {e})") from None
        if labels.shape != (n,) or len(paths) != n or not isinstance(skipped, list):
            raise incomplete(f"labels/paths do not match n={n}")
        for s in sizes:
            f = p / images_file(s)
            expected = n * s * s * 3
            actual = f.stat().st_size if f.is_file() else -1
            if actual != expected:
                raise incomplete(f"{f.name} has {actual} bytes, expected {expected}")
        if n and (labels.min() < 0 or labels.max() >= len(manifest["classes"])):
            raise incomplete("labels out of range")
        return cls(p, manifest, labels.astype(np.int64, copy=False), paths, skipped)

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r}, n={len(self)}, sizes={self.sizes}, mode={self.mode!r})"

    @property
    def fingerprint(self) -> str:
        """Hash of the source files and preparation parameters this store was built from."""
        return self.manifest["fingerprint"]

    def images(self, size: int) -> np.memmap:
        """Read-only memory map of shape ``(N, size, size, 3)``, uint8."""
        if size not in self.sizes:
            raise DataError(f"store {self.path} has sizes {self.sizes}, not {size}")
        mm = self._images.get(size)
        if mm is None:
            shape = (len(self), size, size, 3)
            mm = np.memmap(self.path / images_file(size), np.uint8, mode="r", shape=shape)
            self._images[size] = mm
        return mm

    def to_index(self) -> DatasetIndex:
        """The rows of this store as a :class:`DatasetIndex` (skipped files left out)."""
        samples = [Sample(p, int(lab)) for p, lab in zip(self.paths, self.labels)]
        return DatasetIndex(self.root, list(self.classes), samples, dict(self.class_names))

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_images"] = {}  # re-map in the receiving process instead of copying pixels
        return state
