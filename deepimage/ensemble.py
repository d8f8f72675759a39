"""The ensemble manifest: several trained runs whose softmax posteriors are averaged.

``RUN/ensemble.json`` lists member run folders relative to the manifest's own folder, so an
ensemble folder can be moved or copied as a whole. It also records the crop and classes the
members share, which lets a reader refuse a mismatched ensemble before loading any weights.
Evaluate, predict and serve accept an ensemble wherever they accept a run
(:func:`expand_sources`, :func:`load_members`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from deepimage.files import atomic_write_json
from deepimage.runs import CheckpointError, RunMeta, load_model, read_meta

logger = logging.getLogger(__name__)

ENSEMBLE_FILE = "ensemble.json"
FORMAT_VERSION = 1


def _relative(member: Path, folder: Path) -> str:
    """``member`` relative to ``folder`` (with ``..`` where needed), in POSIX form."""
    try:
        return Path(os.path.relpath(member.resolve(), folder.resolve())).as_posix()
    except ValueError:  # another drive on Windows: keep the absolute path
        return member.resolve().as_posix()


def write_manifest(run: str | Path, members: Sequence[str | Path], **info: Any) -> Path:
    """Write ``run/ensemble.json`` listing ``members`` (run folders or weights files).

    Crop and classes come from the members' metadata when they are finished (``info`` may
    give or override them, and add anything else worth recording, e.g. the sizes). Returns
    the manifest's path. The write is atomic.
    """
    run = Path(run)
    if not members:
        raise ValueError(f"{run / ENSEMBLE_FILE}: an ensemble needs at least one member")
    run.mkdir(parents=True, exist_ok=True)
    paths = [Path(m) for m in members]
    manifest: dict[str, Any] = {"format": "deepimage-ensemble", "version": FORMAT_VERSION}
    metas = []
    for path in paths:
        try:
            metas.append(read_meta(path))
        except CheckpointError:
            metas.append(None)
    known = [m for m in metas if m is not None]
    if known:
        manifest["crop"] = known[0].preprocess.crop
        manifest["classes"] = list(known[0].classes)
        manifest["sizes"] = [m.preprocess.size if m else None for m in metas]
    manifest.update(info)
    manifest["members"] = [_relative(p, run) for p in paths]
    path = run / ENSEMBLE_FILE
    atomic_write_json(path, manifest)
    logger.info("ensemble of %d members written to %s", len(paths), path)
    return path


def _manifest_path(source: Path) -> Path | None:
    if source.is_file() and source.name == ENSEMBLE_FILE:
        return source
    if source.is_file() and source.suffix == ".json":
        return source
    if source.is_dir() and (source / ENSEMBLE_FILE).exists():
        return source / ENSEMBLE_FILE
    return None


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest at ``path``, its members resolved to absolute paths."""
    path = Path(path)
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not a readable ensemble manifest ({err})") from None
    members = manifest.get("members") if isinstance(manifest, dict) else None
    if not isinstance(members, list) or not members:
        raise CheckpointError(f"{path}: not an ensemble manifest (no 'members' list)")
    version = manifest.get("version", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: ensemble format version {version} is newer than this")
    manifest["members"] = [path.parent / m for m in members]
    return manifest


def expand_sources(sources: Sequence[str | Path]) -> list[Path]:
    """Replace each ensemble manifest (or folder holding one) by its member runs, in order.

    Anything else (a run folder, a weights file, a path that does not exist) passes through
    unchanged, so a later load names the offending path.
    """
    out: list[Path] = []
    for source in sources:
        source = Path(source)
        manifest = _manifest_path(source)
        if manifest is None:
            out.append(source)
            continue
        members = read_manifest(manifest)["members"]
        for member in members:
            if not member.exists():
                raise CheckpointError(f"{manifest}: member {member} does not exist")
        out.extend(members)
    return out


def load_members(
    sources: Sequence[str | Path], device: str | torch.device = "cpu"
) -> list[tuple[torch.nn.Module, RunMeta]]:
    """Every member model (in eval mode) with its metadata; all must share their classes."""
    paths = expand_sources(sources)
    if not paths:
        raise ValueError("no model given")
    members = []
    for path in paths:
        if not path.exists():
            raise CheckpointError(f"{path}: ensemble member does not exist")
        model, meta = load_model(path, device)
        if members and meta.classes != members[0][1].classes:
            raise CheckpointError(
                f"{path}: classes differ from those of the first member {paths[0]}"
            )
        members.append((model, meta))
    return members
