"""Dataset indexes: which image files belong to which class.

An index is a cheap, picklable list of ``(absolute path, label)`` pairs plus the class ids
and optional readable class names. It is built from an ImageFolder-style directory, a
``path,label`` CSV or WebDataset tar shards (``train-{000000..000146}.tar``), and never
decodes the images themselves: decoding is a separate step (:mod:`deepimage.data.decode`) so
a corrupt file costs one skipped sample, not a crash.
"""

from __future__ import annotations

import csv
import logging
import os
import re
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
CLASS_NAMES_FILE = "class_names.txt"

_HEADER_PATH_COLUMNS = frozenset({"path", "file", "filename", "image", "img"})
_HEADER_LABEL_COLUMNS = frozenset({"label", "class", "target", "category"})


class DataError(ValueError):
    """A data set cannot be read as asked; the message is one line naming the path."""


@dataclass(frozen=True, slots=True)
class Sample:
    """One image file and its class index.

    A member of a tar archive has ``path`` ``<archive>.tar#<member>`` and the byte ``offset``
    and ``size`` of its data in the archive (:func:`read_sample` reads them); a plain file
    has ``offset`` -1. Slotted: an ImageNet-sized index holds 1.28 M of them.
    """

    path: str
    label: int
    offset: int = -1
    size: int = -1

    @property
    def file(self) -> str:
        """The file to read: the archive for a tar member, else ``path``."""
        return archive_of(self.path) if self.offset >= 0 else self.path


@dataclass
class DatasetIndex:
    """Image files with their labels, the sorted class ids and readable class names."""

    root: str
    classes: list[str]
    samples: list[Sample]
    class_names: dict[str, str] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)  # bad samples found by indexing

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def targets(self) -> list[int]:
        """The label of every sample, in sample order."""
        return [s.label for s in self.samples]

    @property
    def paths(self) -> list[str]:
        """The path of every sample, in sample order."""
        return [s.path for s in self.samples]

    def display_name(self, label: int) -> str:
        """``"<class id> <readable name>"`` when a name is known, else the class id."""
        class_id = self.classes[label]
        name = self.class_names.get(class_id, "")
        return f"{class_id} {name}" if name else class_id

    def subset(self, indices: Iterable[int]) -> DatasetIndex:
        """The samples at ``indices`` (in that order) with the same classes and names."""
        samples = [self.samples[i] for i in indices]
        return DatasetIndex(self.root, list(self.classes), samples, dict(self.class_names))


def is_image_file(name: str) -> bool:
    """Whether a file name has an image extension (case-insensitive) and is not hidden."""
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _abs(path: str | os.PathLike[str]) -> str:
    return os.path.normpath(os.path.abspath(os.fspath(path)))


def read_class_names(path: str | os.PathLike[str]) -> dict[str, str]:
    """Read ``<class id> <readable name>`` lines (e.g. ``n02123045 tabby, tabby cat``).

    Blank lines and lines starting with ``#`` are ignored; a line with only an id maps it to
    an empty name.
    """
    names: dict[str, str] = {}
    try:
        with open(path, encoding="utf-8-sig") as f:
            for line in f:
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                parts = line.split(None, 1)
                names[parts[0]] = parts[1].strip() if len(parts) > 1 else ""
    except OSError as e:
        raise DataError(f"cannot read class names file {path}: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise DataError(f"class names file {path} is not UTF-8 text") from e
    return names


def _class_names_for(folder: str, class_names_file: str | os.PathLike[str] | None) -> dict:
    if class_names_file is not None:
        return read_class_names(class_names_file)
    auto = os.path.join(folder, CLASS_NAMES_FILE)
    if os.path.isfile(auto):
        logger.info("using class names from %s", auto)
        return read_class_names(auto)
    return {}


def _walk_images(class_dir: str) -> list[str]:
    """Image files under ``class_dir`` (any depth), skipping hidden files and folders."""
    found: list[str] = []
    seen_dirs: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:  # symlink loop
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        prefix = os.path.join(dirpath, "")
        found.extend(prefix + f for f in filenames if is_image_file(f))
    return found


def scan_folder(
    root: str | os.PathLike[str], class_names_file: str | os.PathLike[str] | None = None
) -> DatasetIndex:
    """Index an ImageFolder tree ``root/<class id>/<...>/<image>``.

    Class ids are the sorted names of the non-hidden sub-folders of ``root``; files may be
    nested deeper. Hidden entries and non-image extensions are ignored; a class folder without
    images is left out with a warning. Samples are sorted by class, then path.
    """
    root_s = _abs(root)
    if not os.path.isdir(root_s):
        raise DataError(f"not a folder: {root_s}")
    try:
        entries = sorted(os.listdir(root_s))
    except OSError as e:
        raise DataError(f"cannot list {root_s}: {e.strerror or e}") from e
    class_dirs = [
        e for e in entries if not e.startswith(".") and os.path.isdir(os.path.join(root_s, e))
    ]
    classes: list[str] = []
    samples: list[Sample] = []
    for class_id in class_dirs:
        files = _walk_images(os.path.join(root_s, class_id))
        if not files:
            logger.warning(
                "class folder %s has no images; left out", os.path.join(root_s, class_id)
            )
            continue
        label = len(classes)
        classes.append(class_id)
        files.sort()  # already absolute and normalised: joined onto root_s
        samples.extend(Sample(p, label) for p in files)
    if not classes:
        raise DataError(f"no class folders with images in {root_s} (expected root/<class>/<image>)")
    return DatasetIndex(root_s, classes, samples, _class_names_for(root_s, class_names_file))


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def read_manifest(
    csv_path: str | os.PathLike[str], class_names_file: str | os.PathLike[str] | None = None
) -> DatasetIndex:
    """Index a CSV of ``path,label`` rows (header optional, extra columns ignored).

    Relative paths are relative to the CSV's folder. Labels are class ids; when every label is
    a non-negative integer it is kept as the class index (classes ``"0"..."K-1"``), otherwise
    the sorted distinct labels become the classes. A ``class_names.txt`` next to the CSV is
    used when no names file is given.
    """
    csv_s = _abs(csv_path)
    folder = os.path.dirname(csv_s)
    try:
        with open(csv_s, newline="", encoding="utf-8-sig") as f:
            rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    except OSError as e:
        raise DataError(f"cannot read {csv_s}: {e.strerror or e}") from e
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{csv_s} is not a readable CSV file: {e}") from e
    path_col, label_col = 0, 1
    if rows:
        head = [c.strip().lower() for c in rows[0]]
        if any(c in _HEADER_PATH_COLUMNS for c in head) and any(
            c in _HEADER_LABEL_COLUMNS for c in head
        ):
            path_col = next(i for i, c in enumerate(head) if c in _HEADER_PATH_COLUMNS)
            label_col = next(i for i, c in enumerate(head) if c in _HEADER_LABEL_COLUMNS)
            rows = rows[1:]
    pairs: list[tuple[str, str]] = []
    for line_no, row in enumerate(rows, start=1):
        if len(row) <= max(path_col, label_col):
            raise DataError(f"{csv_s}: row {line_no} needs a path and a label: {row!r}")
        path, label = row[path_col].strip(), row[label_col].strip()
        if not path or not label:
            raise DataError(f"{csv_s}: row {line_no} has an empty path or label")
        pairs.append((_abs(os.path.join(folder, os.path.expanduser(path))), label))
    if not pairs:
        raise DataError(f"no rows in {csv_s}")

    if all(_is_int(lab) and int(lab) >= 0 for _, lab in pairs):
        n_classes = max(int(lab) for _, lab in pairs) + 1
        classes = [str(i) for i in range(n_classes)]
        samples = [Sample(p, int(lab)) for p, lab in pairs]
    else:
        classes = sorted({lab for _, lab in pairs})
        to_label = {c: i for i, c in enumerate(classes)}
        samples = [Sample(p, to_label[lab]) for p, lab in pairs]
    return DatasetIndex(folder, classes, samples, _class_names_for(folder, class_names_file))


# --------------------------------------------------------------------------- tar shards

TAR_IMAGE_EXTENSIONS = frozenset(e.lstrip(".") for e in IMAGE_EXTENSIONS) | {"ppm", "pgm", "pnm"}
TAR_LABEL_EXTENSIONS = ("cls", "cls.txt", "class", "label")
_BRACE = re.compile(r"\{([^{}]*)\}")
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # WebDataset: key up to the first dot


def expand_braces(pattern: str) -> list[str]:
    """Shell-style brace expansion as WebDataset uses it: ``a-{000..002}.tar`` (ranges keep
    the zero padding) and ``{train,val}.tar`` (lists); several braces multiply."""
    found = _BRACE.search(pattern)
    if found is None:
        return [pattern]
    body, head, tail = found.group(1), pattern[: found.start()], pattern[found.end() :]
    span = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if span:
        a, b = span.groups()
        width = max(len(a), len(b)) if a.startswith("0") or b.startswith("0") else 0
        step = 1 if int(b) >= int(a) else -1
        items = [f"{k:0{width}d}" for k in range(int(a), int(b) + step, step)]
    elif "," in body:
        items = body.split(",")
    else:
        raise DataError(f"cannot expand {{{body}}} in {pattern!r}: use {{A..B}} or {{x,y}}")
    return [out for item in items for out in expand_braces(head + item + tail)]


def is_tar_source(source: str | os.PathLike[str]) -> bool:
    """Whether ``source`` names tar shards (a ``.tar`` path or a brace pattern of them)."""
    text = os.fspath(source)
    return text.lower().endswith(".tar") and not os.path.isdir(os.path.expanduser(text))


def archive_of(path: str) -> str:
    """The archive of a tar member's sample path ``<archive>.tar#<member>``."""
    cut = path.rfind(".tar#")
    if cut < 0:
        raise ValueError(f"not a tar member path: {path}")
    return path[: cut + 4]


def read_sample(sample: Sample) -> str | bytes:
    """What :func:`~deepimage.data.decode.open_image` decodes: a path, or a member's bytes."""
    if sample.offset < 0:
        return sample.path
    with open(sample.file, "rb") as f:
        return os.pread(f.fileno(), sample.size, sample.offset)


def _read_label(text: bytes) -> str:
    return text.decode("utf-8", "replace").strip()


def _scan_tar(tar: str) -> tuple[list[tuple[str, str, int, int, str | None]], list[dict]]:
    """(sample path, key, data offset, size, label text) of each sample with an image, and the
    bad samples with their reasons."""
    found: dict[str, dict] = {}
    bad: list[dict[str, str]] = []
    file_size = os.path.getsize(tar)
    try:
        with tarfile.open(tar, "r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                kx = _KEY_EXT.match(m.name)
                if kx is None:
                    continue
                key, ext = kx.group(1), kx.group(2).lower()
                entry = found.setdefault(key, {})
                if m.offset_data + m.size > file_size:
                    raise tarfile.ReadError(f"member {m.name} runs past the end of the file")
                if ext in TAR_IMAGE_EXTENSIONS and "image" not in entry:
                    entry["image"] = (f"{tar}#{m.name}", m.offset_data, m.size)
                elif ext in TAR_LABEL_EXTENSIONS and "label" not in entry:
                    fobj = tf.extractfile(m)
                    entry["label"] = _read_label(fobj.read() if fobj else b"")
    except (tarfile.TarError, EOFError, OSError) as e:
        reason = f"truncated or corrupt archive: {' '.join(str(e).split()) or type(e).__name__}"
        logger.warning("%s: %s (kept the %d samples before it)", tar, reason, len(found))
        bad.append({"path": tar, "reason": reason})
    out = []
    for key, entry in found.items():
        where = f"{tar}#{key}"
        if "image" not in entry:
            bad.append({"path": where, "reason": "no image in sample"})
        elif not entry.get("label"):
            bad.append({"path": where, "reason": f"no label ({', '.join(TAR_LABEL_EXTENSIONS)})"})
        else:
            path, offset, size = entry["image"]
            out.append((path, key, offset, size, entry["label"]))
    return out, bad


def scan_tars(
    source: str | os.PathLike[str], class_names_file: str | os.PathLike[str] | None = None
) -> DatasetIndex:
    """Index WebDataset tar shards: one ``.tar`` or a brace pattern of local paths.

    A sample is the members sharing a key (the name up to its first dot): an image
    (``.jpg``, ``.png``, ...) and a label (``.cls``: a class index or a class id). Labels are
    kept as indices when all are non-negative integers, else the sorted distinct ids become
    the classes (as for a CSV). Samples without an image or a label, and the unread rest of a
    truncated archive, are listed in ``skipped`` with a reason, never fatal.
    """
    pattern = os.path.expanduser(os.fspath(source))
    tars = [_abs(p) for p in expand_braces(pattern)]
    missing = [t for t in tars if not os.path.isfile(t)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DataError(f"tar shard not found: {missing[0]}{more}")
    rows: list[tuple[str, int, int, str]] = []
    skipped: list[dict[str, str]] = []
    for tar in tars:
        found, bad = _scan_tar(tar)
        rows.extend((path, offset, size, label) for path, _, offset, size, label in found)
        for item in bad:
            logger.warning("skipped %s: %s", item["path"], item["reason"])
        skipped.extend(bad)
    if not rows:
        raise DataError(f"no labelled images in {pattern}")
    labels = [r[3] for r in rows]
    if all(_is_int(lab) and int(lab) >= 0 for lab in labels):
        classes = [str(i) for i in range(max(int(lab) for lab in labels) + 1)]
        ids = [int(lab) for lab in labels]
    else:
        classes = sorted(set(labels))
        to_label = {c: i for i, c in enumerate(classes)}
        ids = [to_label[lab] for lab in labels]
    samples = [Sample(p, i, off, size) for (p, off, size, _), i in zip(rows, ids)]
    root = os.path.dirname(tars[0])
    names = _class_names_for(root, class_names_file)
    return DatasetIndex(root, classes, samples, names, skipped)


def load_index(
    source: str | os.PathLike[str], class_names_file: str | os.PathLike[str] | None = None
) -> DatasetIndex:
    """Index a folder (:func:`scan_folder`), a ``.csv`` file (:func:`read_manifest`) or tar
    shards, one file or a brace pattern (:func:`scan_tars`)."""
    if is_tar_source(source):
        return scan_tars(source, class_names_file)
    path = Path(source).expanduser()
    if path.is_dir():
        return scan_folder(path, class_names_file)
    if path.suffix.lower() == ".csv":
        if not path.is_file():
            raise DataError(f"CSV file not found: {_abs(path)}")
        return read_manifest(path, class_names_file)
    if not path.exists():
        raise DataError(f"data source not found: {_abs(path)}")
    raise DataError(f"data source must be a folder or a .csv file: {_abs(path)}")


def split_index(
    index: DatasetIndex, val_fraction: float, seed: int
) -> tuple[DatasetIndex, DatasetIndex]:
    """Split into (train, val), stratified by class and deterministic for a given seed.

    Each class with ``n`` samples gives ``round(n * val_fraction)`` of them to val, but at least
    one when ``val_fraction > 0`` and ``n >= 2``, and always keeps one for train. Both parts keep
    the original sample order and the full class list.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction} for {index.root}")
    by_class: dict[int, list[int]] = {}
    for i, s in enumerate(index.samples):
        by_class.setdefault(s.label, []).append(i)
    val: list[int] = []
    for label in sorted(by_class):
        members = by_class[label]
        n = len(members)
        k = int(round(n * val_fraction))
        if val_fraction > 0 and n >= 2:
            k = max(k, 1)
        k = min(k, n - 1)
        if k <= 0:
            continue
        rng = np.random.default_rng([seed, label])
        val.extend(members[j] for j in rng.permutation(n)[:k])
    val_set = set(val)
    train_idx = [i for i in range(len(index)) if i not in val_set]
    return index.subset(train_idx), index.subset(sorted(val_set))
