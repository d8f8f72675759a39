"""Preparing a store: decode every image once, resize it to each size, write its rows.

:func:`prepare_store` decodes in this process or in a pool of worker processes, each writing
its rows in place; rows follow the index order whatever the number of workers, and files
that cannot be decoded are skipped and listed. The format and the reader are in
:mod:`deepimage.data.store`.
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
from deepimage.data.index import DataError, DatasetIndex
from deepimage.data.store import (
    LABELS,
    MANIFEST,
    PATHS,
    SKIPPED,
    STORE_FORMAT,
    STORE_VERSION,
    IncompleteStoreError,
    Store,
    images_file,
    is_store_file,
    leftover_builds,
)
from deepimage.files import atomic_write_json, fsync_dir, fsync_file

logger = logging.getLogger(__name__)

# Decoding workers run only Pillow and NumPy, so forking is safe where it exists; unlike
# "spawn", it does not re-import the caller's script, which would hang or recurse in a
# script without an ``if __name__ == "__main__":`` guard.
MP_START_METHOD = "fork" if "fork" in mp.get_all_start_methods() else "spawn"


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


def check_sizes(sizes: Sequence[int] | int) -> list[int]:
    """Store sizes, sorted and distinct; a bad one is a :class:`DataError`."""
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


# --------------------------------------------------------------------------- building


def _decode_all(
    index: DatasetIndex,
    build: Path,
    sizes: list[int],
    mode: str,
    max_pixels: int | None,
    workers: int | None,
    progress: bool,
) -> tuple[list[int], list[dict[str, str]], np.ndarray, np.ndarray]:
    """Decode every image into the image files of ``build`` (one row each, in index order).

    Returns the decoded rows, the skipped files with their reasons, and the integer sums of
    the pixels and of their outer products (for :func:`pixel_stats`).
    """
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
    return good, skipped, pixel_sum, outer_sum


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
    sizes_l = check_sizes(sizes)
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
        for left in leftover_builds(out_p):
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
    """Decode ``index`` into the folder ``build``, then write its labels, paths and manifest."""
    n = len(index)
    start = time.perf_counter()
    good, skipped, pixel_sum, outer_sum = _decode_all(
        index, build, sizes, mode, max_pixels, workers, progress
    )
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
