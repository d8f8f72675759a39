"""The store cache: the prepared store of a folder, CSV or tar shards, found or prepared.

:func:`store_for` opens a store folder as it is; for a folder, a CSV, tar shards (a brace
pattern) or an index it names a store in the cache folder after the source and the
parameters, and prepares it (again, when the files changed; resuming, when interrupted) with
:func:`~deepimage.data.prepare.prepare_store`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

from deepimage.data.decode import DEFAULT_MAX_PIXELS, JPEG_QUALITY, ResizeMode, check_mode
from deepimage.data.index import DataError, DatasetIndex, is_tar_source, load_index
from deepimage.data.prepare import check_sizes, prepare_store
from deepimage.data.store import MANIFEST, Store, is_store_file, leftover_builds

CACHE_ENV = "DEEPIMAGE_CACHE"


def default_cache_dir() -> Path:
    """``$DEEPIMAGE_CACHE`` if set, else ``~/.cache/deepimage/stores``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "deepimage" / "stores"


def _looks_like_store(path: Path) -> bool:
    if not path.exists():
        return bool(leftover_builds(path))  # an interrupted store: let Store.open explain
    if not path.is_dir():
        return False
    if (path / MANIFEST).is_file():
        return True
    entries = list(path.iterdir())
    return bool(entries) and all(is_store_file(e.name) for e in entries)


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
    encoding: str = "auto",
    quality: int = JPEG_QUALITY,
) -> Store:
    """A store for ``source`` (folder, CSV, tar shards, index or a store folder) with ``sizes``.

    An existing store folder is opened directly (it must hold the sizes and mode). Otherwise
    the store lives in ``cache_dir`` (default :func:`default_cache_dir`) under a name derived
    from the source and parameters, and is prepared, or re-prepared when files changed.
    """
    sizes_l = check_sizes(sizes)
    check_mode(mode)
    if not isinstance(source, DatasetIndex):
        src = Path(source).expanduser().absolute()
        if not is_tar_source(source) and _looks_like_store(src):
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
        name = src.stem if src.suffix.lower() in (".csv", ".tar") else src.name
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._")
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
        index,
        out,
        sizes_l,
        mode=mode,
        max_pixels=max_pixels,
        workers=workers,
        progress=progress,
        encoding=encoding,
        quality=quality,
    )
