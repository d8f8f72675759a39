"""Prepared multi-scale image store: decode once, train from memory-mapped uint8 arrays.

Layout of a store folder::

    manifest.json     written last; format version, sizes, mode, classes, fingerprints, stats
    labels.npy        int64 (N,)
    paths.json        source path of each row
    skipped.json      [{"path", "reason"}] for files that could not be decoded
    images_<S>.u8     raw uint8, shape (N, S, S, 3), one file per size

A store is built in a hidden sibling folder and renamed into place only when complete, so a
store folder with a valid manifest is always whole; anything else (a leftover build folder,
a missing or inconsistent manifest) raises :class:`IncompleteStoreError` on open and is
rebuilt by :func:`prepare_store`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import multiprocessing as mp
import os
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from deepimage.data.decode import (
    DEFAULT_MAX_PIXELS,
    DecodeError,
    ResizeMode,
    check_mode,
    open_image,
    resize_pil,
)
from deepimage.data.index import DataError, DatasetIndex, Sample, load_index
from deepimage.files import atomic_write_json, fsync_dir, fsync_file

logger = logging.getLogger(__name__)

STORE_FORMAT = "deepimage-store"
STORE_VERSION = 1
MANIFEST = "manifest.json"
LABELS = "labels.npy"
PATHS = "paths.json"
SKIPPED = "skipped.json"
CACHE_ENV = "DEEPIMAGE_CACHE"
# Decoding workers run only Pillow and NumPy, so forking is safe where it exists; unlike
# "spawn", it does not re-import the caller's script, which would hang or recurse in a
# script without an ``if __name__ == "__main__":`` guard.
MP_START_METHOD = "fork" if "fork" in mp.get_all_start_methods() else "spawn"


class IncompleteStoreError(DataError):
    """A store folder is half-written or inconsistent; it must be prepared again."""


def images_file(size: int) -> str:
    """File name of the uint8 array for one image size."""
    return f"images_{size}.u8"


def _is_store_file(name: str) -> bool:
    if name in (MANIFEST, MANIFEST + ".tmp", LABELS, PATHS, SKIPPED):
        return True
    return name.startswith("images_") and name.endswith(".u8")


def _leftovers(out: Path) -> list[Path]:
    """Build folders left next to ``out`` by an interrupted preparation."""
    if not out.parent.is_dir():
        return []
    prefixes = (f".{out.name}.partial-", f".{out.name}.old-")
    return sorted(p for p in out.parent.iterdir() if p.name.startswith(prefixes))


# --------------------------------------------------------------------------- fingerprints


def source_fingerprint(index: DatasetIndex) -> str:
    """Hash of classes, paths, labels, file sizes and modification times of an index."""
    h = hashlib.sha256()
    h.update(json.dumps(index.classes).encode())
    for s in index.samples:
        try:
            st = os.stat(s.path)
            size, mtime = st.st_size, st.st_mtime_ns
        except OSError:
            size, mtime = -1, -1
        h.update(f"{s.path}\0{s.label}\0{size}\0{mtime}\n".encode())
    return h.hexdigest()


def _params(sizes: list[int], mode: str, max_pixels: int | None) -> dict[str, Any]:
    return {"sizes": sizes, "mode": mode, "max_pixels": max_pixels}


def _check_sizes(sizes: Sequence[int] | int) -> list[int]:
    if isinstance(sizes, int):
        sizes = [sizes]
    out = sorted({int(s) for s in sizes})
    if not out or out[0] <= 0:
        raise DataError(f"store sizes must be positive integers, got {list(sizes)}")
    return out


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

_worker: dict[str, Any] = {}


def _open_state(build_dir: str, sizes: list[int], mode: str, max_pixels: int | None) -> dict:
    """Decoding state: unbuffered handles of the image files (rows are written in place)."""
    files = {
        s: open(os.path.join(build_dir, images_file(s)), "r+b", buffering=0)  # noqa: SIM115
        for s in sizes
    }
    return {"files": files, "sizes": sizes, "mode": mode, "max_pixels": max_pixels}


def _close_state(state: dict) -> None:
    for f in state.pop("files", {}).values():
        f.close()


def _worker_init(build_dir: str, sizes: list[int], mode: str, max_pixels: int | None) -> None:
    """Pool initializer: the state of this worker process."""
    _close_state(_worker)
    _worker.update(_open_state(build_dir, sizes, mode, max_pixels))


def _write_at(f: Any, offset: int, data: memoryview) -> None:
    f.seek(offset)
    while len(data):
        n = f.write(data)
        data = data[n:]


def _decode_row(
    task: tuple[int, str], state: dict | None = None
) -> tuple[int, str | None, Any, Any]:
    """Decode one image, write its row for every size, return (row, error, sum, outer sum)."""
    row, path = task
    state = _worker if state is None else state
    sizes: list[int] = state["sizes"]
    try:
        img = open_image(path, max_pixels=state["max_pixels"], draft_size=sizes[-1])
        arrays = [np.asarray(resize_pil(img, s, state["mode"]), dtype=np.uint8) for s in sizes]
    except DecodeError as e:
        return row, str(e) or "undecodable", None, None
    except Exception as e:  # never let one bad file stop a long preparation
        return row, f"unexpected {type(e).__name__}: {' '.join(str(e).split())}", None, None
    for s, arr in zip(sizes, arrays):
        data = memoryview(np.ascontiguousarray(arr)).cast("B")
        _write_at(state["files"][s], row * s * s * 3, data)
    # Integer-valued float64 sums stay below 2**53, so they are exact in any summation order.
    # One matrix product gives both: rows are R, G, B and a row of ones.
    ext = np.ones((4, sizes[0] * sizes[0]), np.float64)
    ext[:3] = arrays[0].reshape(-1, 3).T
    sums = np.rint(ext @ ext.T).astype(np.int64)
    return row, None, sums[:3, 3], sums[:3, :3]


def _run_decoding(
    tasks: list[tuple[int, str]],
    build_dir: Path,
    sizes: list[int],
    mode: str,
    max_pixels: int | None,
    workers: int,
    bar: tqdm,
) -> Iterator[tuple[int, str | None, Any, Any]]:
    """Results in task order, decoded in-process (workers <= 1) or by a process pool."""
    init_args = (str(build_dir), sizes, mode, max_pixels)
    if workers <= 1:
        state = _open_state(*init_args)
        try:
            for task in tasks:
                yield _decode_row(task, state)
                bar.update(1)
        finally:
            _close_state(state)
        return
    chunksize = max(1, min(32, len(tasks) // (workers * 8)))
    ctx = mp.get_context(MP_START_METHOD)
    pool = ProcessPoolExecutor(
        workers, mp_context=ctx, initializer=_worker_init, initargs=init_args
    )
    try:
        for result in pool.map(_decode_row, tasks, chunksize=chunksize):
            yield result
            bar.update(1)
    except BrokenProcessPool as e:
        raise DataError(
            f"a decoding worker process died while preparing a store in {build_dir.parent}: {e}; "
            "run with workers=0 to find the file, and guard script entry points with "
            "`if __name__ == '__main__':`"
        ) from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------- file helpers


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


def _compact(build_dir: Path, sizes: list[int], n_rows: int, good: list[int]) -> None:
    """Move the decoded rows down over the skipped ones and cut the files to length."""
    for s in sizes:
        path = build_dir / images_file(s)
        if len(good) < n_rows:
            mm = np.memmap(path, np.uint8, mode="r+", shape=(n_rows, s, s, 3))
            for new, old in enumerate(good):
                if new != old:
                    mm[new] = mm[old]
            mm.flush()
            del mm
            os.truncate(path, len(good) * s * s * 3)
        fsync_file(path)


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
            left = _leftovers(p)
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


# --------------------------------------------------------------------------- prepare


def _reusable(out: Path, fingerprint: str) -> Store | None:
    """The existing complete store at ``out`` if it matches ``fingerprint``, else None."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return None
    if not out.is_dir() or not all(_is_store_file(e.name) for e in out.iterdir()):
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
) -> Store:
    """Decode every image of ``index`` once and store it resized to each of ``sizes``.

    Returns the existing store without any decoding when it was prepared from the same files
    (paths, sizes, mtimes) with the same parameters. Undecodable files are skipped with a
    warning and listed in ``skipped.json``; rows follow index order whatever ``workers`` is
    (default: all CPUs; 0 or 1 decodes in this process).
    """
    sizes_l = _check_sizes(sizes)
    check_mode(mode)
    out_p = Path(out).expanduser().absolute()
    if len(index) == 0:
        raise DataError(f"no images to prepare from {index.root}")
    params = _params(sizes_l, mode, max_pixels)
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
        for left in _leftovers(out_p):
            logger.warning("removing leftover of an interrupted preparation: %s", left)
            shutil.rmtree(left, ignore_errors=True)
        build = out_p.with_name(f".{out_p.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        build.mkdir()
        try:
            _build(
                index,
                build,
                sizes_l,
                mode,
                max_pixels,
                workers,
                progress,
                src_fp,
                params,
                fingerprint,
            )
            _replace_dir(build, out_p)
        except BaseException:
            shutil.rmtree(build, ignore_errors=True)
            raise
    return Store.open(out_p)


def _build(
    index: DatasetIndex,
    build: Path,
    sizes: list[int],
    mode: str,
    max_pixels: int | None,
    workers: int | None,
    progress: bool,
    src_fp: str,
    params: dict[str, Any],
    fingerprint: str,
) -> None:
    n = len(index)
    for s in sizes:
        with open(build / images_file(s), "wb") as f:
            f.truncate(n * s * s * 3)
    n_workers = (os.cpu_count() or 1) if workers is None else workers
    n_workers = max(0, min(n_workers, n))
    tasks = [(i, s.path) for i, s in enumerate(index.samples)]
    good: list[int] = []
    skipped: list[dict[str, str]] = []
    pixel_sum = np.zeros(3, np.int64)
    outer_sum = np.zeros((3, 3), np.int64)
    start = time.perf_counter()
    bar = tqdm(total=n, disable=not progress, unit="img", desc="preparing store")
    try:
        results = _run_decoding(tasks, build, sizes, mode, max_pixels, n_workers, bar)
        for row, error, s1, s2 in results:
            if error is None:
                good.append(row)
                pixel_sum += s1
                outer_sum += s2
            else:
                path = index.samples[row].path
                logger.warning("skipped %s: %s", path, error)
                skipped.append({"path": path, "reason": error})
    finally:
        bar.close()
    if not good:
        raise DataError(f"none of the {n} images from {index.root} could be decoded")
    _compact(build, sizes, n, good)
    labels = np.array([index.samples[i].label for i in good], dtype=np.int64)
    with open(build / LABELS, "wb") as f:
        np.save(f, labels)
        f.flush()
        os.fsync(f.fileno())
    atomic_write_json(build / PATHS, [index.samples[i].path for i in good], indent=1)
    atomic_write_json(build / SKIPPED, skipped, indent=1)
    stats = pixel_stats(pixel_sum, outer_sum, len(good) * sizes[0] * sizes[0])
    stats.update({"size": sizes[0], "n_images": len(good)})
    manifest = {
        "format": STORE_FORMAT,
        "version": STORE_VERSION,
        "n": len(good),
        "n_skipped": len(skipped),
        "sizes": sizes,
        "mode": mode,
        "max_pixels": max_pixels,
        "root": index.root,
        "classes": list(index.classes),
        "class_names": dict(index.class_names),
        "source_fingerprint": src_fp,
        "params": params,
        "fingerprint": fingerprint,
        "stats": stats,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_json(build / MANIFEST, manifest, indent=1)  # last: marks a complete store
    fsync_dir(build)
    elapsed = time.perf_counter() - start
    logger.info(
        "prepared %d images (%d skipped) at sizes %s in %.1f s (%.0f images/s)",
        len(good),
        len(skipped),
        sizes,
        elapsed,
        n / max(elapsed, 1e-9),
    )


# --------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    """``$DEEPIMAGE_CACHE`` if set, else ``~/.cache/deepimage/stores``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "deepimage" / "stores"


def _looks_like_store(path: Path) -> bool:
    if not path.exists():
        return bool(_leftovers(path))  # an interrupted store: let Store.open explain
    if not path.is_dir():
        return False
    if (path / MANIFEST).is_file():
        return True
    entries = list(path.iterdir())
    return bool(entries) and all(_is_store_file(e.name) for e in entries)


def store_for(
    source: str | os.PathLike[str] | DatasetIndex,
    sizes: Sequence[int],
    *,
    mode: ResizeMode = "stretch",
    cache_dir: str | os.PathLike[str] | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    workers: int | None = None,
    progress: bool = True,
    class_names_file: str | os.PathLike[str] | None = None,
) -> Store:
    """A store for ``source`` (folder, CSV, index or an existing store folder) with ``sizes``.

    An existing store folder is opened directly (it must hold the sizes and mode). Otherwise
    the store lives in ``cache_dir`` (default :func:`default_cache_dir`) under a name derived
    from the source and parameters, and is prepared, or re-prepared when files changed.
    """
    sizes_l = _check_sizes(sizes)
    check_mode(mode)
    if not isinstance(source, DatasetIndex):
        src = Path(source).expanduser().absolute()
        if _looks_like_store(src):
            store = Store.open(src)
            missing = [s for s in sizes_l if s not in store.sizes]
            if missing or store.mode != mode:
                raise DataError(
                    f"store {src} has sizes {store.sizes} mode {store.mode!r}; "
                    f"asked for sizes {sizes_l} mode {mode!r}"
                )
            return store
        index = load_index(src, class_names_file)
        identity = str(src)
        name = src.stem if src.suffix.lower() == ".csv" else src.name
    else:
        index = source
        h = hashlib.sha256()
        for s in index.samples:
            h.update(f"{s.path}\0{s.label}\n".encode())
        identity = f"{index.root}\0{h.hexdigest()}"
        name = Path(index.root).name
    key = hashlib.sha256(json.dumps([identity, sizes_l, mode]).encode()).hexdigest()[:16]
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    out = root / f"{name or 'data'}-{'-'.join(map(str, sizes_l))}-{mode}-{key}"
    return prepare_store(
        index, out, sizes_l, mode=mode, max_pixels=max_pixels, workers=workers, progress=progress
    )
