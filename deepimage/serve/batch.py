"""Score every file of a folder into a CSV or JSON-lines file, streaming and resumable.

Files are found by a sorted walk (a generator, never a full list), decoded by a thread pool
with a bounded number of images in flight, scored in batches, and written one row per file
in walk order, flushed after every batch. Memory stays flat for any folder size; only the
names already scored are kept, for ``resume``. An undecodable file gets a row with its
error. ``resume`` drops a partial last line left by a crash, then skips every file that
already has a row and appends the rest.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TextIO

from tqdm.auto import tqdm

from deepimage.data.decode import DecodeError
from deepimage.serve.predict import Predictor

logger = logging.getLogger(__name__)

FORMATS = ("csv", "jsonl")


def output_format(out: str | Path) -> str:
    """``csv`` or ``jsonl`` from the output file's suffix."""
    suffix = Path(out).suffix.lower().lstrip(".")
    if suffix == "json":
        suffix = "jsonl"
    if suffix not in FORMATS:
        raise ValueError(f"{out}: output must end in .csv or .jsonl")
    return suffix


def walk_files(
    folder: Path, skip: Path | None = None, _seen: set[str] | None = None
) -> Iterator[Path]:
    """Regular, non-hidden files under ``folder`` in sorted order, lazily.

    Symlinked folders are followed once each (a link cycle cannot loop forever).
    """
    seen = set() if _seen is None else _seen
    real = os.path.realpath(folder)
    if real in seen:
        return
    seen.add(real)
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as err:
        logger.warning("cannot list %s: %s", folder, err.strerror or err)
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue
        path = Path(entry.path)
        if entry.is_dir(follow_symlinks=True):
            yield from walk_files(path, skip, seen)
        elif entry.is_file(follow_symlinks=True) and (skip is None or path != skip):
            yield path


def csv_header(topk: int) -> list[str]:
    cols = ["path", "error"]
    for i in range(1, topk + 1):
        cols += [f"top{i}_id", f"top{i}_name", f"top{i}_prob"]
    return cols


def _row_csv(result: dict[str, Any], topk: int) -> list[str]:
    row = [result["path"], result.get("error", "")]
    top = result.get("top", [])
    for i in range(topk):
        if i < len(top):
            p = top[i]
            row += [p["class_id"], p["name"], f"{p['probability']:.6f}"]
        else:
            row += ["", "", ""]
    return row


def _drop_partial_line(out: Path) -> None:
    """Truncate ``out`` after its last newline: a crash may have left half a row."""
    with open(out, "rb+") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        pos = size
        chunk = 1 << 16
        while pos > 0:
            start = max(0, pos - chunk)
            f.seek(start)
            data = f.read(pos - start)
            nl = data.rfind(b"\n")
            if nl >= 0:
                end = start + nl + 1
                break
            pos = start
        else:
            end = 0
        if end != size:
            logger.warning("%s: dropping a partial last line (%d bytes)", out, size - end)
            f.truncate(end)


def scored_paths(out: Path, fmt: str, topk: int) -> set[str]:
    """Paths that already have a complete row in ``out`` (after dropping a partial line)."""
    _drop_partial_line(out)
    done: set[str] = set()
    with open(out, newline="", encoding="utf-8") as f:
        if fmt == "jsonl":
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    done.add(json.loads(line)["path"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ValueError(f"{out}: line {n} is not a prediction row") from None
        else:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is not None and header != csv_header(topk):
                raise ValueError(
                    f"{out}: columns differ from those of --topk {topk}; use the same --topk"
                )
            for row in reader:
                if row:
                    done.add(row[0])
    return done


class _Writer:
    """Appends rows to the output file; flushes after each batch."""

    def __init__(self, f: TextIO, fmt: str, topk: int, write_header: bool) -> None:
        self.f, self.fmt, self.topk = f, fmt, topk
        if fmt == "csv":
            self.csv = csv.writer(f, lineterminator="\n")
            if write_header:
                self.csv.writerow(csv_header(topk))

    def write(self, result: dict[str, Any]) -> None:
        if self.fmt == "jsonl":
            self.f.write(json.dumps(result, ensure_ascii=False) + "\n")
        else:
            buf = io.StringIO()  # one write per row keeps a torn row to the last line
            csv.writer(buf, lineterminator="\n").writerow(_row_csv(result, self.topk))
            self.f.write(buf.getvalue())

    def flush(self) -> None:
        self.f.flush()


def _decode(predictor: Predictor, path: Path) -> tuple[tuple[Any, ...] | None, str | None]:
    try:
        return predictor.load_image(path), None
    except (DecodeError, OSError) as err:
        return None, str(err) or type(err).__name__


def _score_pending(
    pending: deque[tuple[str, Future]],
    n: int,
    predictor: Predictor,
    writer: _Writer,
    topk: int,
    counts: dict[str, int],
    bar: tqdm,
) -> None:
    """Score the first ``n`` pending decodes in one forward pass; write their rows in order."""
    batch: list[tuple[str, tuple[Any, ...]]] = []
    results: list[dict[str, Any] | None] = []
    for _ in range(n):
        rel, future = pending.popleft()
        image, error = future.result()
        if error is not None:
            results.append({"path": rel, "error": error})
            counts["errors"] += 1
        else:
            batch.append((rel, image))
            results.append(None)
    scored = iter([])
    if batch:
        probs = predictor.probabilities(predictor.stack([im for _, im in batch]))
        scored = iter(
            {"path": rel, "top": predictor.top(p, topk)} for (rel, _), p in zip(batch, probs)
        )
    for result in results:
        writer.write(result if result is not None else next(scored))
    counts["scored"] += len(batch)
    writer.flush()
    bar.update(n)


def score_folder(
    predictor: Predictor,
    folder: str | Path,
    out: str | Path,
    *,
    topk: int = 5,
    batch_size: int = 32,
    workers: int | None = None,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, int]:
    """Score every file under ``folder`` into ``out`` (``.csv`` or ``.jsonl``).

    Returns counts: ``scored`` (new rows with predictions), ``errors`` (new error rows) and
    ``skipped`` (files already in ``out``, with ``resume``). Paths are relative to ``folder``.
    """
    folder, out = Path(folder), Path(out)
    fmt = output_format(out)
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder")
    if batch_size < 1:
        raise ValueError(f"batch size must be positive, got {batch_size}")
    exists = out.exists() and out.stat().st_size > 0
    if exists and not resume:
        raise ValueError(f"{out}: already exists; pass --resume to continue it, or remove it")
    done = scored_paths(out, fmt, topk) if exists else set()
    exists = out.exists() and out.stat().st_size > 0
    skip = out.resolve()
    workers = workers or min(8, os.cpu_count() or 1)
    total = sum(1 for _ in walk_files(folder, skip))
    counts = {"scored": 0, "errors": 0, "skipped": 0}
    out.parent.mkdir(parents=True, exist_ok=True)
    with (
        open(out, "a", newline="", encoding="utf-8") as f,
        ThreadPoolExecutor(workers, thread_name_prefix="decode") as pool,
        tqdm(total=total, disable=not progress, desc="predict", unit="img") as bar,
    ):
        writer = _Writer(f, fmt, topk, write_header=not exists)
        pending: deque[tuple[str, Future]] = deque()
        limit = 2 * batch_size + workers  # images decoded or decoding at once
        for path in walk_files(folder, skip):
            rel = path.relative_to(folder).as_posix()
            if rel in done:
                counts["skipped"] += 1
                bar.update(1)
                continue
            pending.append((rel, pool.submit(_decode, predictor, path)))
            if len(pending) >= limit:
                _score_pending(pending, batch_size, predictor, writer, topk, counts, bar)
        while pending:
            n = min(batch_size, len(pending))
            _score_pending(pending, n, predictor, writer, topk, counts, bar)
    return counts
