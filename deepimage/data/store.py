"""Prepared multi-scale image store: its format, and :class:`Store`, the reader.

Layout of a store folder (format version 2)::

    manifest.json             written last; version, sizes, mode, encoding, classes, shards
                              (file, rows, bytes, sha256 of each), fingerprints, stats
    labels.npy                int64 (N,)
    paths.json                source path of each row (``shard.tar#member`` for tar input)
    skipped.json              [{"path", "reason"}] for samples that could not be decoded
    index_<S>.npy             int64 (N, 3) per size: byte offset, length, CRC-32 of each row
    images_<S>-<k>.tar        shard k of size S: a POSIX tar of one member per row

Shards are WebDataset-style tar files (member ``<row>.jpg``, or ``<row>.u8`` holding the raw
``S x S x 3`` uint8 pixels), bounded in size, so a store can be copied, checksummed and
streamed by standard tools; the index gives random access by row. A store opens only when
every shard has its recorded size (cheap), :meth:`Store.verify` compares SHA-256 sums, and
every read checks the row's CRC-32, so a truncated or corrupted shard is a
:class:`CorruptShardError` naming the shard, never wrong pixels.

Version 1 stores (``images_<S>.u8``: raw ``(N, S, S, 3)`` arrays, no shards) still open.

A store is built in a hidden sibling folder and renamed into place only when complete, so a
store folder with a valid manifest is always whole; anything else (a leftover build folder,
a missing or inconsistent manifest) raises :class:`IncompleteStoreError` on open and is
prepared (resumed, where the build folder allows) by
:func:`~deepimage.data.prepare.prepare_store`. :func:`~deepimage.data.cache.store_for`
finds or prepares the store of a folder, CSV or tar shards in the cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tarfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from deepimage.data.decode import DecodeError, ResizeMode, check_mode, decode_jpeg
from deepimage.data.index import DataError, DatasetIndex, Sample

STORE_FORMAT = "deepimage-store"
STORE_VERSION = 2
READABLE_VERSIONS = (1, 2)
ENCODINGS = ("raw", "jpeg")
MANIFEST = "manifest.json"
LABELS = "labels.npy"
PATHS = "paths.json"
SKIPPED = "skipped.json"
TAR_BLOCK = 512
TAR_END = b"\0" * (2 * TAR_BLOCK)


class IncompleteStoreError(DataError):
    """A store folder is half-written or inconsistent; it must be prepared again."""


class CorruptShardError(IncompleteStoreError):
    """A shard of a store is truncated or its bytes changed; the message names the shard."""


def images_file(size: int) -> str:
    """File name of the uint8 array for one image size (version 1 stores)."""
    return f"images_{size}.u8"


def shard_file(size: int, shard: int) -> str:
    """File name of shard ``shard`` of size ``size``."""
    return f"images_{size}-{shard:06d}.tar"


def index_file(size: int) -> str:
    """File name of the per-row (offset, length, CRC-32) index of one size."""
    return f"index_{size}.npy"


def member_name(row: int, encoding: str) -> str:
    """Tar member name of a row: WebDataset key (the row) and extension (the encoding)."""
    return f"{row:09d}.{'jpg' if encoding == 'jpeg' else 'u8'}"


def _tarfile_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")


# ustar fields: name [0, 100), size [124, 136), checksum [148, 156); the rest is the same for
# every member, so it is taken once from tarfile's own header.
_USTAR = bytearray(_tarfile_header("", 0))
_USTAR[:100] = bytes(100)
_USTAR_MID = bytes(_USTAR[100:124]) + bytes(_USTAR[136:148])
_USTAR_TAIL = bytes(_USTAR[156:])
_USTAR_SUM = sum(_USTAR_MID) + sum(_USTAR_TAIL) + 8 * ord(" ")  # checksum field as spaces
_USTAR_MAX_SIZE = 8**11  # 11 octal digits; larger sizes need tarfile's base-256 field


def tar_header(name: str, size: int) -> bytes:
    """A POSIX (ustar) header of a regular file; fixed fields, so shards are reproducible.

    Byte for byte what ``tarfile`` writes (mode 644, mtime 0), built from a template: the
    writer makes one per row and size, and tarfile's general code took about as long as
    decoding a small image.
    """
    raw = name.encode("utf-8")
    if len(raw) > 100 or not 0 <= size < _USTAR_MAX_SIZE:
        return _tarfile_header(name, size)  # long names (prefix field), huge members
    size_field = b"%011o\0" % size
    checksum = _USTAR_SUM + sum(raw) + sum(size_field)
    return b"".join(
        (raw, bytes(100 - len(raw)), _USTAR_MID[:24], size_field, _USTAR_MID[24:],
         b"%06o\0 " % checksum, _USTAR_TAIL)
    )  # fmt: skip


def tar_padding(size: int) -> bytes:
    """The zero bytes that pad a member's data to a whole tar block."""
    return b"\0" * (-size % TAR_BLOCK)


def is_store_file(name: str) -> bool:
    """Whether ``name`` is one of a store folder's files (either version)."""
    if name in (MANIFEST, MANIFEST + ".tmp", LABELS, PATHS, SKIPPED):
        return True
    if name.startswith("index_") and name.endswith(".npy"):
        return True
    return name.startswith("images_") and name.endswith((".u8", ".tar"))


def leftover_builds(out: Path) -> list[Path]:
    """Build folders left next to ``out`` by an interrupted preparation."""
    if not out.parent.is_dir():
        return []
    prefixes = (f".{out.name}.partial", f".{out.name}.old-")
    return sorted(p for p in out.parent.iterdir() if p.name.startswith(prefixes))


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- store


def _incomplete(p: Path, why: str) -> IncompleteStoreError:
    return IncompleteStoreError(f"incomplete store at {p}: {why}; prepare it again")


def _corrupt(p: Path, shard: str, why: str) -> CorruptShardError:
    return CorruptShardError(f"corrupt store shard {p / shard}: {why}; prepare the store again")


class Store:
    """A prepared store opened read-only; shards are opened on first use in each process."""

    def __init__(
        self,
        path: Path,
        manifest: dict[str, Any],
        labels: np.ndarray,
        paths: list[str] | None,
        skipped: list[dict[str, str]],
        index: dict[int, np.ndarray] | None = None,
    ) -> None:
        self.path = path
        self.manifest = manifest
        self.version: int = int(manifest["version"])
        self.sizes: list[int] = list(manifest["sizes"])
        self.mode: ResizeMode = manifest["mode"]
        self.encoding: str = manifest.get("encoding", "raw")
        self.classes: list[str] = list(manifest["classes"])
        self.class_names: dict[str, str] = dict(manifest.get("class_names") or {})
        self.root: str = manifest.get("root", "")
        self.stats: dict[str, Any] = dict(manifest["stats"])
        self.labels = labels
        self._paths = paths  # read on first use: training needs none of them
        self.skipped = skipped
        self._index = index or {}
        self._shards: dict[int, list[dict[str, Any]]] = {
            int(s): list(v) for s, v in (manifest.get("shards") or {}).items()
        }
        self._starts = {s: np.array([d["rows"][0] for d in v]) for s, v in self._shards.items()}
        self._images: dict[int, np.ndarray] = {}
        self._fds: dict[str, int] = {}

    @classmethod
    def open(cls, path: str | os.PathLike[str], verify: bool = False) -> Store:
        """Open and validate a complete store; raise :class:`IncompleteStoreError` otherwise.

        Every shard must have its recorded size (a :class:`CorruptShardError` naming it if
        not); ``verify`` also compares every shard's SHA-256 (reads the whole store).
        """
        p = Path(path).expanduser().absolute()
        if not p.is_dir():
            left = leftover_builds(p)
            if left:
                raise _incomplete(p, f"preparation was interrupted (left {left[0].name})")
            raise DataError(f"no store at {p}")
        if not (p / MANIFEST).is_file():
            raise _incomplete(p, f"no {MANIFEST} (preparation interrupted?)")
        try:
            manifest = json.loads((p / MANIFEST).read_text(encoding="utf-8"))
            if manifest.get("format") != STORE_FORMAT:
                raise _incomplete(p, f"{MANIFEST} is not a {STORE_FORMAT} manifest")
            if manifest.get("version") not in READABLE_VERSIONS:
                raise _incomplete(
                    p, f"store version {manifest.get('version')} is not one of {READABLE_VERSIONS}"
                )
            n = int(manifest["n"])
            sizes = [int(s) for s in manifest["sizes"]]
            check_mode(manifest["mode"])
            if manifest.get("encoding", "raw") not in ENCODINGS:
                raise _incomplete(p, f"unknown encoding {manifest.get('encoding')!r}")
            for key in ("classes", "stats", "fingerprint"):
                manifest[key]  # noqa: B018 -- presence check
        except IncompleteStoreError:
            raise
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise _incomplete(p, f"unreadable {MANIFEST} ({type(e).__name__}: {e})") from None
        try:
            labels = np.load(p / LABELS, allow_pickle=False)
            skipped = json.loads((p / SKIPPED).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise _incomplete(p, f"unreadable data files ({type(e).__name__}: {e})") from None
        if not (p / PATHS).is_file():
            raise _incomplete(p, f"no {PATHS}")
        if labels.shape != (n,) or not isinstance(skipped, list):
            raise _incomplete(p, f"labels do not match n={n}")
        if n and (labels.min() < 0 or labels.max() >= len(manifest["classes"])):
            raise _incomplete(p, "labels out of range")
        index = (
            _check_v1_files(p, n, sizes)
            if manifest["version"] == 1
            else _check_shards(p, manifest, n, sizes, verify)
        )
        return cls(p, manifest, labels.astype(np.int64, copy=False), None, skipped, index)

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return (
            f"Store({str(self.path)!r}, n={len(self)}, sizes={self.sizes}, mode={self.mode!r}, "
            f"encoding={self.encoding!r})"
        )

    @property
    def paths(self) -> list[str]:
        """The source path of every row, read from ``paths.json`` on first use (at ImageNet
        scale some 150 MB of strings that training never needs)."""
        if self._paths is None:
            try:
                paths = json.loads((self.path / PATHS).read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise _incomplete(self.path, f"unreadable {PATHS} ({type(e).__name__})") from None
            if not isinstance(paths, list) or len(paths) != len(self):
                raise _incomplete(self.path, f"{PATHS} does not match n={len(self)}")
            self._paths = paths
        return self._paths

    @property
    def fingerprint(self) -> str:
        """Hash of the source files and preparation parameters this store was built from."""
        return self.manifest["fingerprint"]

    def shard_files(self, size: int | None = None) -> list[str]:
        """The shard file names (of one size, or of all); empty for a version 1 store."""
        sizes = self.sizes if size is None else [size]
        return [d["file"] for s in sizes for d in self._shards.get(s, [])]

    def verify(self) -> None:
        """Compare every shard's SHA-256 with the manifest; :class:`CorruptShardError` if not."""
        if self.version >= 2:
            _check_shards(self.path, self.manifest, len(self), self.sizes, verify=True)

    def _check_size(self, size: int) -> None:
        if size not in self.sizes:
            raise DataError(f"store {self.path} has sizes {self.sizes}, not {size}")

    def images(self, size: int) -> np.ndarray:
        """Read-only ``(N, size, size, 3)`` uint8 array mapped from disk, without copying.

        For raw stores in one shard (and version 1 stores); other stores are read by row
        with :meth:`read`.
        """
        self._check_size(size)
        mm = self._images.get(size)
        if mm is not None:
            return mm
        shape = (len(self), size, size, 3)
        if self.version == 1:
            mm = np.memmap(self.path / images_file(size), np.uint8, mode="r", shape=shape)
        else:
            shards = self._shards[size]
            if self.encoding != "raw" or len(shards) != 1:
                raise DataError(
                    f"store {self.path} holds {self.encoding} rows in {len(shards)} shards: "
                    "read them with Store.read"
                )
            offsets = self._index[size][:, 0]
            nbytes = size * size * 3
            stride = TAR_BLOCK + nbytes + len(tar_padding(nbytes))
            first = int(offsets[0]) if len(offsets) else TAR_BLOCK
            if not np.array_equal(offsets, first + stride * np.arange(len(offsets))):
                raise DataError(f"store {self.path}: rows of size {size} are not evenly spaced")
            raw = np.memmap(self.path / shards[0]["file"], np.uint8, mode="r")
            mm = np.lib.stride_tricks.as_strided(
                raw[first:], shape, (stride, size * 3, 3, 1), writeable=False
            )
        self._images[size] = mm
        return mm

    def read(self, size: int, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``rows`` (any order) as ``(B, size, size, 3)`` uint8, into ``out`` if given.

        Rows are read in file order; each row's CRC-32 is checked and JPEG rows decoded
        (deterministically), so the same rows give the same pixels in every process.
        """
        self._check_size(size)
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if out is None:
            out = np.empty((len(rows), size, size, 3), dtype=np.uint8)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise DataError(f"store {self.path} has {len(self)} rows; asked for {rows.max()}")
        order = np.argsort(rows, kind="stable")
        if self.version == 1:
            out[order] = self.images(size)[rows[order]]
            return out
        index, starts, shards = self._index[size], self._starts[size], self._shards[size]
        which = np.searchsorted(starts, rows, side="right") - 1
        for i in order:
            offset, length, crc = (int(v) for v in index[rows[i]])
            name = shards[which[i]]["file"]
            fd = self._fd(name)
            dest = out[i]
            if self.encoding == "raw":
                view = memoryview(dest).cast("B")
                got = os.preadv(fd, [view], offset) if hasattr(os, "preadv") else None
                if got is None:
                    data = os.pread(fd, length, offset)
                    got = len(data)
                    view[:got] = data
                if got != length or zlib.crc32(view) != crc:
                    raise _corrupt(self.path, name, f"row {rows[i]} fails its CRC-32 check")
            else:
                data = os.pread(fd, length, offset)
                if len(data) != length or zlib.crc32(data) != crc:
                    raise _corrupt(self.path, name, f"row {rows[i]} fails its CRC-32 check")
                try:
                    decode_jpeg(data, dest)
                except DecodeError as e:
                    raise _corrupt(self.path, name, f"row {rows[i]}: {e}") from None
        return out

    def read_encoded(self, size: int, rows: np.ndarray) -> list[bytes]:
        """The stored JPEG bytes of ``rows`` (any order), each CRC-checked, not decoded: for a
        decoder elsewhere (the GPU's, or the device cache). Rows are read in file order."""
        self._check_size(size)
        if self.encoding != "jpeg":
            raise DataError(f"store {self.path} holds {self.encoding} rows, not JPEG bytes")
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise DataError(f"store {self.path} has {len(self)} rows; asked for {rows.max()}")
        index, starts, shards = self._index[size], self._starts[size], self._shards[size]
        which = np.searchsorted(starts, rows, side="right") - 1
        out: list[bytes] = [b""] * len(rows)
        for i in np.argsort(rows, kind="stable"):
            offset, length, crc = (int(v) for v in index[rows[i]])
            name = shards[which[i]]["file"]
            data = os.pread(self._fd(name), length, offset)
            if len(data) != length or zlib.crc32(data) != crc:
                raise _corrupt(self.path, name, f"row {rows[i]} fails its CRC-32 check")
            out[i] = data
        return out

    def stored_lengths(self, size: int, rows: np.ndarray) -> np.ndarray:
        """Bytes each of ``rows`` takes as stored: its JPEG, or its raw pixels."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if self.version >= 2 and self.encoding == "jpeg":
            return self._index[size][rows, 1].astype(np.int64)
        return np.full(len(rows), size * size * 3, dtype=np.int64)

    def _fd(self, name: str) -> int:
        fd = self._fds.get(name)
        if fd is None:
            try:
                fd = os.open(self.path / name, os.O_RDONLY)
            except OSError as e:
                raise _corrupt(self.path, name, e.strerror or str(e)) from None
            self._fds[name] = fd
        return fd

    def close(self) -> None:
        """Close the shard files opened by :meth:`read` (reopened on the next read)."""
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter shutdown
            self.close()

    def to_index(self) -> DatasetIndex:
        """The rows of this store as a :class:`DatasetIndex` (skipped files left out)."""
        samples = [Sample(p, int(lab)) for p, lab in zip(self.paths, self.labels)]
        return DatasetIndex(self.root, list(self.classes), samples, dict(self.class_names))

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_images"] = {}  # re-map in the receiving process instead of copying pixels
        state["_fds"] = {}  # file descriptors belong to one process
        state["_paths"] = None  # read again where needed
        return state


def _check_v1_files(p: Path, n: int, sizes: list[int]) -> dict[int, np.ndarray]:
    for s in sizes:
        f = p / images_file(s)
        expected = n * s * s * 3
        actual = f.stat().st_size if f.is_file() else -1
        if actual != expected:
            raise _incomplete(p, f"{f.name} has {actual} bytes, expected {expected}")
    return {}


def _check_shards(
    p: Path, manifest: dict[str, Any], n: int, sizes: list[int], verify: bool
) -> dict[int, np.ndarray]:
    """The per-size row index, after checking it and every shard's size (and hash)."""
    try:
        shards = {int(s): v for s, v in manifest["shards"].items()}
        index = {s: np.load(p / index_file(s), allow_pickle=False) for s in sizes}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise _incomplete(p, f"unreadable shard index ({type(e).__name__}: {e})") from None
    for s in sizes:
        rows = index[s]
        if rows.shape != (n, 3) or s not in shards:
            raise _incomplete(p, f"{index_file(s)} does not match n={n}")
        next_row = 0
        for d in shards[s]:
            name, (start, stop), size = d["file"], d["rows"], int(d["bytes"])
            if start != next_row or stop < start:
                raise _incomplete(p, f"the shards of size {s} do not cover the rows in order")
            next_row = stop
            f = p / name
            actual = f.stat().st_size if f.is_file() else -1
            if actual != size:
                what = "missing" if actual < 0 else f"{actual} bytes, expected {size}"
                raise _corrupt(p, name, f"{what} (truncated or replaced)")
            ends = rows[start:stop, 0] + rows[start:stop, 1]
            if stop > start and (rows[start:stop, 0].min() < TAR_BLOCK or ends.max() > size):
                raise _incomplete(p, f"{index_file(s)} points outside {name}")
            if verify and file_sha256(f) != d["sha256"]:
                raise _corrupt(p, name, "SHA-256 differs from the manifest's")
        if next_row != n:
            raise _incomplete(p, f"the shards of size {s} hold {next_row} rows, not {n}")
    return {s: v.astype(np.int64, copy=False) for s, v in index.items()}
