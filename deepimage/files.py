"""Atomic file writes, shared by the prepared store and the run folder.

A file written here is complete or absent: it is written to a temporary file in the same
folder, flushed to disk, and renamed over the target in one step, so a process killed at
any instant never leaves half a file behind. This module sits at the bottom of the package
and imports nothing from it.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any


def fsync_file(path: str | Path) -> None:
    """Flush a written file's data to disk."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: str | Path) -> None:
    """Flush a folder's entries (a rename into it) to disk, where the platform allows."""
    with contextlib.suppress(OSError):  # not supported everywhere (e.g. Windows)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(
    path: str | Path, write: Callable[[Path], None], keep_previous: bool = False
) -> None:
    """Write ``path`` through ``write(tmp)``: fsync, then rename over it in one step.

    With ``keep_previous`` the old file survives as ``path.prev``; between the two renames
    there is always at least one complete file on disk.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if keep_previous and path.exists():
            os.replace(path, path.with_name(path.name + ".prev"))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: str | Path, obj: Any, indent: int = 2) -> None:
    """Write ``obj`` as JSON (and a final newline) to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def atomic_write_json_list(path: str | Path, items: Iterable[Any]) -> None:
    """Write ``items`` as a JSON array, one item per line, to ``path`` atomically.

    Streams: the items are encoded one at a time, never joined into one string, so a list of
    a million paths costs no more memory than its largest item.
    """

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("[")
            for k, item in enumerate(items):
                f.write(",\n " if k else "\n ")
                f.write(json.dumps(item))
            f.write("\n]\n")

    atomic_write(path, write)
