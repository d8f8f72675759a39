"""Preparing a store: decode every image once, resize it to each size, write it in shards.

:func:`prepare_store` streams: images are decoded and encoded (raw or JPEG) in this process
or by a pool of worker processes, a bounded number at a time, and written in index order
into tar shards of bounded size (:mod:`deepimage.data.store` has the format). Memory does
not grow with the number of images beyond the index. Each finished group of shards (one per
size) is recorded in a journal in the build folder, so an interrupted preparation resumes
at the first unfinished group. Files that cannot be decoded are skipped and listed.
"""

from __future__ import annotations

import array
import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import multiprocessing as mp
import os
import shutil
import time
import uuid
import zlib
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from tqdm import tqdm

from deepimage.data.decode import (
    DEFAULT_MAX_PIXELS,
    JPEG_QUALITY,
    DecodeError,
    ResizeMode,
    check_mode,
    decode_jpeg,
    encode_jpeg,
    open_image,
    resize_pil,
)
from deepimage.data.index import DataError, DatasetIndex, read_sample
from deepimage.data.store import (
    ENCODINGS,
    LABELS,
    MANIFEST,
    PATHS,
    SKIPPED,
    STORE_FORMAT,
    STORE_VERSION,
    TAR_END,
    IncompleteStoreError,
    Store,
    index_file,
    is_store_file,
    leftover_builds,
    member_name,
    shard_file,
    tar_header,
    tar_padding,
)
from deepimage.files import atomic_write, atomic_write_json, atomic_write_json_list, fsync_dir

logger = logging.getLogger(__name__)

# Decoding workers run only Pillow and NumPy, so forking is safe where it exists; unlike
# "spawn", it does not re-import the caller's script, which would hang or recurse in a
# script without an ``if __name__ == "__main__":`` guard.
MP_START_METHOD = "fork" if "fork" in mp.get_all_start_methods() else "spawn"

SHARD_BYTES = 1 << 30  # a shard closes once it reaches this size (about 1 GB)
ENCODING_CHOICES = ("auto", *ENCODINGS)
BUILD_META = "build.json"
GROUPS = "groups"


# --------------------------------------------------------------------------- fingerprints


def _stat(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return -1, -1
    return st.st_size, st.st_mtime_ns


def source_fingerprint(index: DatasetIndex) -> str:
    """Hash of classes, paths, labels, file sizes and modification times of an index."""
    h = hashlib.sha256()
    h.update(json.dumps(index.classes).encode())
    archives: dict[str, tuple[int, int]] = {}  # an archive is stat'ed once, not per member
    for s in index.samples:
        if s.offset < 0:
            size, mtime = _stat(s.path)
        else:
            if s.file not in archives:
                archives[s.file] = _stat(s.file)
            size, mtime = archives[s.file]
        where = s.path if s.offset < 0 else f"{s.path}@{s.offset}"
        h.update(f"{where}\0{s.label}\0{size}\0{mtime}\n".encode())
    return h.hexdigest()


def check_sizes(sizes: Sequence[int] | int) -> list[int]:
    """Store sizes, sorted and distinct; a bad one is a :class:`DataError`."""
    if isinstance(sizes, int):
        sizes = [sizes]
    out = sorted({int(s) for s in sizes})
    if not out or out[0] <= 0:
        raise DataError(f"store sizes must be positive integers, got {list(sizes)}")
    return out


# --------------------------------------------------------------------------- encoding


def memory_budget() -> int:
    """Bytes a raw store may take under ``encoding="auto"``: a quarter of the RAM."""
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # no sysconf: assume 16 GiB
        ram = 16 << 30
    return int(ram) // 4


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def choose_encoding(
    encoding: str, n_images: int, sizes: Sequence[int], budget: int | None = None
) -> tuple[str, str]:
    """(``raw`` or ``jpeg``, why): ``auto`` is raw when ``n_images`` uint8 images at every
    size fit ``budget`` (default :func:`memory_budget`, a quarter of RAM), else JPEG."""
    if encoding not in ENCODING_CHOICES:
        raise DataError(f"encoding must be one of {', '.join(ENCODING_CHOICES)}; got {encoding!r}")
    if encoding != "auto":
        return encoding, f"{encoding}, as asked"
    need = n_images * sum(3 * s * s for s in sizes)
    budget = memory_budget() if budget is None else int(budget)
    if need <= budget:
        return "raw", f"raw: {_gib(need)} of uint8 pixels fit the budget of {_gib(budget)}"
    return "jpeg", f"jpeg: {_gib(need)} of uint8 pixels exceed the budget of {_gib(budget)}"


# --------------------------------------------------------------------------- pixel stats


def pixel_stats(pixel_sum: np.ndarray, outer_sum: np.ndarray, n_pixels: int) -> dict[str, Any]:
    """Mean, std and PCA of RGB (0..1 scale) from integer sums of x and x x^T over pixels.

    ``eigval`` is sorted in decreasing order; ``eigvec`` columns are the matching unit
    eigenvectors, each signed so that its largest-magnitude entry is positive.
    """
    mean = pixel_sum.astype(np.float64) / (255.0 * n_pixels)
    second = outer_sum.astype(np.float64) / (255.0 * 255.0 * n_pixels)
    cov = second - np.outer(mean, mean)
    cov = (cov + cov.T) / 2.0
    eigval, eigvec = np.linalg.eigh(cov)
    order = np.argsort(eigval)[::-1]
    eigval, eigvec = np.clip(eigval[order], 0.0, None), eigvec[:, order]
    for j in range(3):
        if eigvec[np.argmax(np.abs(eigvec[:, j])), j] < 0:
            eigvec[:, j] = -eigvec[:, j]
    return {
        "rgb_mean": mean.tolist(),
        "rgb_std": np.sqrt(np.clip(np.diag(cov), 0.0, None)).tolist(),
        "eigval": eigval.tolist(),
        "eigvec": eigvec.tolist(),
    }


# --------------------------------------------------------------------------- workers


@dataclasses.dataclass(frozen=True)
class _Encoding:
    sizes: list[int]
    mode: str
    max_pixels: int | None
    encoding: str
    quality: int


Task = tuple[int, str, int, int]  # (index position, path, archive offset or -1, size)
Result = tuple[int, str | None, list[bytes], list[int], Any, Any]

_worker: dict[str, _Encoding] = {}


def _worker_init(enc: _Encoding) -> None:
    """Pool initializer: what this worker process encodes."""
    _worker["enc"] = enc


def _encode_one(task: Task, enc: _Encoding) -> Result:
    """Decode one image and encode it at every size: (i, error, blobs, CRCs, sum, outer sum).

    The pixel sums are of the smallest size as stored (JPEGs decoded back), so the store's
    statistics describe exactly what training reads.
    """
    from deepimage.data.index import Sample

    i, path, offset, size = task
    try:
        source = read_sample(Sample(path, 0, offset, size))
        img = open_image(source, max_pixels=enc.max_pixels, draft_size=enc.sizes[-1])
        arrays = [np.asarray(resize_pil(img, s, enc.mode), dtype=np.uint8) for s in enc.sizes]
        if enc.encoding == "jpeg":
            blobs = [encode_jpeg(a, enc.quality) for a in arrays]
            first = decode_jpeg(blobs[0])
        else:
            blobs = [np.ascontiguousarray(a).tobytes() for a in arrays]
            first = arrays[0]
    except DecodeError as e:
        return i, str(e) or "undecodable", [], [], None, None
    except OSError as e:
        return i, f"cannot read: {e.strerror or e}", [], [], None, None
    except Exception as e:  # never let one bad file stop a long preparation
        return i, f"unexpected {type(e).__name__}: {' '.join(str(e).split())}", [], [], None, None
    # Integer-valued float64 sums stay below 2**53, so they are exact in any summation order.
    # One matrix product gives both: rows are R, G, B and a row of ones.
    s0 = enc.sizes[0]
    ext = np.ones((4, s0 * s0), np.float64)
    ext[:3] = first.reshape(-1, 3).T
    sums = np.rint(ext @ ext.T).astype(np.int64)
    return i, None, blobs, [zlib.crc32(b) for b in blobs], sums[:3, 3], sums[:3, :3]


def _encode_chunk(tasks: list[Task]) -> list[Result]:
    return [_encode_one(t, _worker["enc"]) for t in tasks]


def _run_encoding(
    tasks: Iterable[Task], enc: _Encoding, workers: int, bar: tqdm
) -> Iterator[Result]:
    """Results in task order, encoded in-process (workers <= 1) or by a process pool with a
    bounded number of chunks in flight (memory does not grow with the number of tasks)."""
    if workers <= 1:
        for task in tasks:
            yield _encode_one(task, enc)
            bar.update(1)
        return
    task_iter = iter(tasks)
    chunks = iter(lambda: list(itertools.islice(task_iter, 16)), [])
    ctx = mp.get_context(MP_START_METHOD)
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init, initargs=(enc,))
    pending: deque[Future] = deque()
    try:
        for chunk in itertools.islice(chunks, workers * 4):
            pending.append(pool.submit(_encode_chunk, chunk))
        while pending:
            results = pending.popleft().result()
            chunk = next(chunks, None)
            if chunk:
                pending.append(pool.submit(_encode_chunk, chunk))
            for result in results:
                yield result
                bar.update(1)
    except BrokenProcessPool as e:
        raise DataError(
            f"a decoding worker process died while preparing a store: {e}; "
            "run with workers=0 to find the file, and guard script entry points with "
            "`if __name__ == '__main__':`"
        ) from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------- building


class _Group:
    """The shards of one group of consecutive images (one shard per size), being written.

    ``close`` writes the tar end blocks, fsyncs, and records the group in the journal
    ``groups/<number>.json``; only recorded groups survive an interruption. Per row it keeps
    the index position of its source (``kept``), its label and, per size, (offset, length,
    CRC-32) as machine integers, which the finished group keeps in memory (:func:`_compact`).
    """

    def __init__(self, build: Path, number: int, enc: _Encoding, src: int, row: int) -> None:
        self.build, self.number, self.enc = build, number, enc
        self.src, self.rows = [src, src], [row, row]
        self.files: dict[int, BinaryIO] = {}
        self.hashes = {s: hashlib.sha256() for s in enc.sizes}
        self.pos = dict.fromkeys(enc.sizes, 0)
        self.index = {s: array.array("q") for s in enc.sizes}  # offset, length, CRC-32
        self.labels = array.array("q")
        self.kept = array.array("q")  # the index position of each row's source
        self.paths: list[str] = []
        self.skipped: list[dict[str, str]] = []
        self.pixel_sum = np.zeros(3, np.int64)
        self.outer_sum = np.zeros((3, 3), np.int64)

    def _write(self, size: int, data: bytes) -> None:
        f = self.files.get(size)
        if f is None:
            f = self.files[size] = open(self.build / shard_file(size, self.number), "wb")  # noqa: SIM115
        f.write(data)
        self.hashes[size].update(data)
        self.pos[size] += len(data)

    def add(self, label: int, path: str, result: Result) -> None:
        i, _, blobs, crcs, s1, s2 = result
        name = member_name(self.rows[1], self.enc.encoding)
        for size, blob, crc in zip(self.enc.sizes, blobs, crcs):
            self._write(size, tar_header(name, len(blob)))
            self.index[size].extend((self.pos[size], len(blob), crc))
            self._write(size, blob)
            self._write(size, tar_padding(len(blob)))
        self.labels.append(label)
        self.kept.append(i)
        self.paths.append(path)
        self.pixel_sum += s1
        self.outer_sum += s2
        self.rows[1] += 1

    def bytes(self) -> int:
        return max(self.pos.values())

    def close(self) -> dict[str, Any]:
        shards = {}
        for size, f in self.files.items():
            self._write(size, TAR_END)
            f.flush()
            os.fsync(f.fileno())
            f.close()
            shards[str(size)] = {
                "file": shard_file(size, self.number),
                "rows": list(self.rows),
                "bytes": self.pos[size],
                "sha256": self.hashes[size].hexdigest(),
            }
        record = {
            "src": self.src,
            "rows": self.rows,
            "shards": shards,
            "index": {str(s): np.asarray(v).reshape(-1, 3).tolist() for s, v in self.index.items()},
            "labels": self.labels.tolist(),
            "kept": self.kept.tolist(),
            "paths": self.paths,
            "skipped": self.skipped,
            "pixel_sum": self.pixel_sum.tolist(),
            "outer_sum": self.outer_sum.tolist(),
        }
        atomic_write_json(self.build / GROUPS / f"{self.number:06d}.json", record, indent=0)
        return _compact(record)


def _compact(record: dict[str, Any]) -> dict[str, Any]:
    """A group's record as kept in memory until the store is finished: rows as int64 arrays
    (24 bytes per row and size, 16 for label and source), paths left out (the index has
    them), so that memory grows with the number of images by a few bytes only."""
    out = dict(record)
    out["index"] = {s: np.asarray(v, np.int64).reshape(-1, 3) for s, v in record["index"].items()}
    out["labels"] = np.asarray(record["labels"], np.int64)
    out["kept"] = np.asarray(record["kept"], np.int64)
    del out["paths"]
    return out


def _resume(build: Path, fingerprint: str) -> list[dict[str, Any]] | None:
    """The recorded groups of an interrupted build of the same store, else None. Files of
    the group that was being written are removed."""
    try:
        meta = json.loads((build / BUILD_META).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if meta.get("fingerprint") != fingerprint:
        return None
    groups: list[dict[str, Any]] = []
    for number in itertools.count():
        try:
            record = json.loads((build / GROUPS / f"{number:06d}.json").read_text("utf-8"))
            record = _compact(record)
        except (OSError, ValueError, KeyError):  # KeyError: a journal of an earlier layout
            break
        whole = all(
            (build / d["file"]).is_file() and (build / d["file"]).stat().st_size == d["bytes"]
            for d in record["shards"].values()
        )
        if not whole:
            break
        groups.append(record)
    keep = {f"{n:06d}.json" for n in range(len(groups))}
    keep |= {d["file"] for g in groups for d in g["shards"].values()}
    for f in [*build.iterdir(), *(build / GROUPS).iterdir()]:
        if f.is_file() and f.name != BUILD_META and f.name not in keep:
            f.unlink()
    return groups


@contextlib.contextmanager
def _build_lock(out: Path) -> Iterator[None]:
    """Exclusive lock so concurrent processes (e.g. one per GPU) prepare a store only once."""
    try:
        import fcntl
    except ImportError:  # no advisory locks on this platform
        yield
        return
    with open(out.parent / f".{out.name}.lock", "a+b") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process preparing %s", out)
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _reusable(out: Path, fingerprint: str) -> Store | None:
    """The existing complete store at ``out`` if it matches ``fingerprint``, else None."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return None
    if not out.is_dir() or not all(is_store_file(e.name) for e in out.iterdir()):
        raise DataError(f"refusing to replace {out}: it exists and is not a store")
    try:
        store = Store.open(out)
    except IncompleteStoreError as e:
        logger.warning("%s; rebuilding", e)
        return None
    if store.fingerprint != fingerprint:
        logger.info("source or parameters changed since %s was prepared; rebuilding", out)
        return None
    return store


def _save_npy(path: Path, array: np.ndarray) -> None:
    """``array`` as ``.npy`` at ``path``, written atomically (the name keeps no ``.npy`` added)."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array)

    atomic_write(path, write)


def _replace_dir(src: Path, dst: Path) -> None:
    """Move the finished build folder into place, replacing an old store if any."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(dst, old)
        os.rename(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(src, dst)
    fsync_dir(dst.parent)


def prepare_store(
    index: DatasetIndex,
    out: str | os.PathLike[str],
    sizes: Sequence[int],
    *,
    mode: ResizeMode = "stretch",
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    workers: int | None = None,
    progress: bool = True,
    encoding: str = "auto",
    quality: int = JPEG_QUALITY,
    shard_bytes: int = SHARD_BYTES,
    budget: int | None = None,
) -> Store:
    """Decode every image of ``index`` once and store it resized to each of ``sizes``.

    ``encoding`` is ``raw`` (uint8 pixels), ``jpeg`` (at ``quality``) or ``auto`` (raw when
    the raw store fits ``budget``, default a quarter of RAM; :func:`choose_encoding`). Shards
    close once they reach ``shard_bytes``. Returns the existing store without any decoding
    when it was prepared from the same files (paths, sizes, mtimes) with the same parameters;
    resumes an interrupted preparation of the same store. Undecodable files are skipped with
    a warning and listed in ``skipped.json``; rows follow index order whatever ``workers`` is
    (default: all CPUs; 0 or 1 decodes in this process).
    """
    sizes_l = check_sizes(sizes)
    check_mode(mode)
    out_p = Path(out).expanduser().absolute()
    if len(index) == 0:
        raise DataError(f"no images to prepare from {index.root}")
    if not 1 <= int(quality) <= 100:
        raise DataError(f"JPEG quality must be in 1..100, got {quality}")
    chosen, why = choose_encoding(encoding, len(index), sizes_l, budget)
    params = {
        "sizes": sizes_l,
        "mode": mode,
        "max_pixels": max_pixels,
        "encoding": chosen,
        "quality": int(quality) if chosen == "jpeg" else None,
        "shard_bytes": int(shard_bytes),
    }
    src_fp = source_fingerprint(index)
    fingerprint = hashlib.sha256(
        json.dumps([STORE_VERSION, src_fp, params], sort_keys=True).encode()
    ).hexdigest()
    out_p.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(out_p):
        store = _reusable(out_p, fingerprint)
        if store is not None:
            logger.info("store %s is up to date (%d images)", out_p, len(store))
            for item in store.skipped:  # report them on every use, not just the first
                logger.warning("skipped %s: %s", item["path"], item["reason"])
            return store
        logger.info("encoding %s", why)
        build = out_p.with_name(f".{out_p.name}.partial")
        groups = _resume(build, fingerprint) if build.is_dir() else None
        for left in leftover_builds(out_p):
            if left != build or groups is None:
                logger.warning("removing leftover of an interrupted preparation: %s", left)
                shutil.rmtree(left, ignore_errors=True)
        if groups is None:
            (build / GROUPS).mkdir(parents=True)
            atomic_write_json(build / BUILD_META, {"fingerprint": fingerprint, "params": params})
            groups = []
        enc = _Encoding(sizes_l, mode, max_pixels, chosen, int(quality))
        try:
            _build(index, build, enc, workers, progress, groups, shard_bytes)
            _finish(index, build, enc, groups, src_fp, params, fingerprint, why)
        except _NothingDecodable:
            shutil.rmtree(build, ignore_errors=True)
            raise
        _replace_dir(build, out_p)
        del groups  # before the store's own index is read
    return Store.open(out_p)


class _NothingDecodable(DataError):
    """Not one image of the index could be decoded."""


def _build(
    index: DatasetIndex,
    build: Path,
    enc: _Encoding,
    workers: int | None,
    progress: bool,
    groups: list[dict[str, Any]],
    shard_bytes: int,
) -> None:
    """Encode the images after the recorded ``groups`` into new groups of shards."""
    n = len(index)
    start = groups[-1]["src"][1] if groups else 0
    if start:
        logger.info("resuming the preparation of %s at image %d of %d", build.name, start, n)
    n_workers = (os.cpu_count() or 1) if workers is None else workers
    n_workers = max(0, min(n_workers, n - start))
    samples = index.samples
    tasks = ((i, samples[i].path, samples[i].offset, samples[i].size) for i in range(start, n))
    row = groups[-1]["rows"][1] if groups else 0
    group = _Group(build, len(groups), enc, start, row)
    began = time.perf_counter()
    bar = tqdm(total=n, initial=start, disable=not progress, unit="img", desc="preparing store")
    try:
        for result in _run_encoding(tasks, enc, n_workers, bar):
            i, error = result[0], result[1]
            if error is None:
                group.add(samples[i].label, samples[i].path, result)
            else:
                logger.warning("skipped %s: %s", samples[i].path, error)
                group.skipped.append({"path": samples[i].path, "reason": error})
            group.src[1] = i + 1
            if group.bytes() >= shard_bytes:
                groups.append(group.close())
                group = _Group(build, len(groups), enc, i + 1, group.rows[1])
        if group.src[1] > group.src[0]:
            groups.append(group.close())
    finally:
        bar.close()
        for f in group.files.values():
            f.close()
    elapsed = time.perf_counter() - began
    logger.info(
        "encoded %d images in %.1f s (%.0f images/s)", n - start, elapsed, (n - start) / elapsed
    )


def _finish(
    index: DatasetIndex,
    build: Path,
    enc: _Encoding,
    groups: list[dict[str, Any]],
    src_fp: str,
    params: dict[str, Any],
    fingerprint: str,
    why: str,
) -> None:
    """Join the groups into the store's index, labels, paths and manifest (written last)."""
    n = groups[-1]["rows"][1] if groups else 0
    if n == 0:
        raise _NothingDecodable(
            f"none of the {len(index)} images from {index.root} could be decoded"
        )
    for size in enc.sizes:
        rows = np.concatenate([g["index"][str(size)] for g in groups])
        _save_npy(build / index_file(size), rows.reshape(n, 3))
        del rows
    labels = np.concatenate([g["labels"] for g in groups])
    _save_npy(build / LABELS, labels)
    skipped = [*index.skipped, *(item for g in groups for item in g["skipped"])]
    samples = index.samples
    atomic_write_json_list(build / PATHS, (samples[i].path for g in groups for i in g["kept"]))
    atomic_write_json(build / SKIPPED, skipped, indent=1)
    pixel_sum = np.sum([g["pixel_sum"] for g in groups], axis=0, dtype=np.int64)
    outer_sum = np.sum([g["outer_sum"] for g in groups], axis=0, dtype=np.int64)
    stats = pixel_stats(pixel_sum, outer_sum, n * enc.sizes[0] * enc.sizes[0])
    stats.update({"size": enc.sizes[0], "n_images": n})
    shards = {
        str(size): [g["shards"][str(size)] for g in groups if str(size) in g["shards"]]
        for size in enc.sizes
    }
    manifest = {
        "format": STORE_FORMAT,
        "version": STORE_VERSION,
        "n": n,
        "n_skipped": len(skipped),
        "sizes": enc.sizes,
        "mode": enc.mode,
        "max_pixels": enc.max_pixels,
        "encoding": enc.encoding,
        "quality": params["quality"],
        "encoding_reason": why,
        "shards": shards,
        "root": index.root,
        "classes": list(index.classes),
        "class_names": dict(index.class_names),
        "source_fingerprint": src_fp,
        "params": params,
        "fingerprint": fingerprint,
        "stats": stats,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    shutil.rmtree(build / GROUPS)
    (build / BUILD_META).unlink()
    atomic_write_json(build / MANIFEST, manifest, indent=1)  # last: marks a complete store
    fsync_dir(build)
    total = sum(d["bytes"] for v in shards.values() for d in v)
    logger.info(
        "prepared %d images (%d skipped) at sizes %s: %s in %d shards (%s)",
        n,
        len(skipped),
        enc.sizes,
        _gib(total),
        sum(len(v) for v in shards.values()),
        enc.encoding,
    )
