"""Multi-scale training (paper 4.2): one model per source resolution, all with the same crop.

``train_multiscale(cfg, [256, 512])`` trains ``RUN/s256`` and then ``RUN/s512``, each a full
run folder of its own (config, checkpoints, weights, exact resume), and writes
``RUN/ensemble.json`` listing them. The base configuration is saved as ``RUN/config.yaml``
and the sizes as ``RUN/multiscale.json``; a resumed job reads both back, skips finished
members and continues the unfinished one exactly.

The sizes are deliberately not a :class:`TrainConfig` key: each member is an ordinary run
whose ``size`` is one of them, so the single-run code (and its resume) is untouched.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from deepimage.config import ConfigError, TrainConfig, save_config
from deepimage.ensemble import write_manifest
from deepimage.files import atomic_write_json
from deepimage.runs import WEIGHTS

logger = logging.getLogger(__name__)

SIZES_FILE = "multiscale.json"


def member_dir(run: str | Path, size: int) -> Path:
    """The run folder of the member trained at source size ``size``."""
    return Path(run) / f"s{size}"


def saved_sizes(run: str | Path | None) -> list[int] | None:
    """The sizes of the multi-scale job in ``run``, or None when it is not one."""
    if run is None or not (Path(run) / SIZES_FILE).exists():
        return None
    path = Path(run) / SIZES_FILE
    try:
        return [int(s) for s in json.loads(path.read_text())["sizes"]]
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{path}: unreadable ({err})") from None


def check_sizes(cfg: TrainConfig, sizes: Sequence[int]) -> list[int]:
    """Distinct positive sizes, none smaller than the crop."""
    sizes = [int(s) for s in sizes]
    if not sizes:
        raise ConfigError("--sizes: give at least one size")
    if len(set(sizes)) != len(sizes):
        raise ConfigError(f"--sizes: repeated size in {sizes}")
    small = [s for s in sizes if s < cfg.crop]
    if small:
        raise ConfigError(f"--sizes: {small[0]} is smaller than crop {cfg.crop}")
    return sizes


def member_configs(cfg: TrainConfig, sizes: Sequence[int]) -> list[TrainConfig]:
    """One configuration per size: the base with ``size`` and ``out`` replaced."""
    if cfg.out is None:
        raise ValueError("config key 'out': no run folder given (--out RUN)")
    return [
        dataclasses.replace(cfg, size=s, out=str(member_dir(cfg.out, s))).validate()
        for s in check_sizes(cfg, sizes)
    ]


def train_multiscale(cfg: TrainConfig, sizes: Sequence[int], resume: bool = False):
    """Train one member per size, one after the other, then write ``RUN/ensemble.json``.

    Returns ``{"members": [summary, ...], "ensemble": path}``, or ``{"stopped": True, ...}``
    when a member was interrupted (its checkpoint is saved; continue with ``resume``).
    """
    from deepimage.train.loop import RunExistsError, train

    configs = member_configs(cfg, sizes)
    sizes = [c.size for c in configs]
    run = Path(cfg.out)
    previous = saved_sizes(run)
    if not resume and previous is not None:
        raise RunExistsError(
            f"{run} already holds a multi-scale run: pass --resume to continue it, "
            "or choose another --out"
        )
    if resume and previous is not None and previous != sizes:
        raise ConfigError(f"--sizes: {run} was started with sizes {previous}")
    root = os.environ.get("RANK", "0") == "0"
    if root:
        run.mkdir(parents=True, exist_ok=True)
        base = dataclasses.replace(cfg, size=max(sizes))  # any valid size; members override it
        save_config(base, run / "config.yaml")
        atomic_write_json(run / SIZES_FILE, {"sizes": sizes})
    summaries: list[dict[str, Any]] = []
    for member in configs:
        folder = Path(member.out)
        if resume and is_finished(member):
            logger.info("member %s is finished: skipping it", folder)
            summaries.append(_finished_summary(folder))
            continue
        logger.info("training member at size %d into %s", member.size, folder)
        summary = train(member, resume=resume)
        if summary.get("stopped"):
            return {"stopped": True, "member": str(folder), **summary}
        summaries.append({**summary, "size": member.size, "run": str(folder)})
    path = run / "ensemble.json"
    if root:
        path = write_manifest(run, [c.out for c in configs], sizes=sizes, kind="multiscale")
    return {"members": summaries, "ensemble": str(path)}


def is_finished(member: TrainConfig) -> bool:
    """Whether the member run has its weights and has trained as far as ``member`` asks.

    Weights alone are not enough: a run cut short by ``max_steps`` writes them too.
    """
    folder = Path(member.out)
    if not (folder / WEIGHTS).exists() or not (folder / "summary.json").exists():
        return False
    try:
        summary = json.loads((folder / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if member.max_steps is not None and summary.get("steps", 0) >= member.max_steps:
        return True
    return summary.get("epochs", 0) >= member.epochs


def _finished_summary(folder: Path) -> dict[str, Any]:
    path = folder / "summary.json"
    summary = json.loads(path.read_text()) if path.exists() else {}
    cfg_size = int(folder.name[1:]) if folder.name[1:].isdigit() else None
    return {**summary, "size": cfg_size, "run": str(folder), "skipped_finished": True}
