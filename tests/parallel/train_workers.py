"""``deepimage.train`` inside processes that the consistency tests spawn, one config per rank
(importable by reference)."""

from __future__ import annotations

import json
import os
import time
import traceback
from pathlib import Path
from typing import Any

import torch


def config(data: Path, out: Path, cache: Path, **overrides: Any):
    """A tiny fp32 run (vgg16_deepimage width 1/16, 40/32 px, batch 8)."""
    from deepimage.config import TrainConfig

    kwargs = dict(
        data=str(data), out=str(out), cache_dir=str(cache), model="vgg16_deepimage",
        width=0.0625, size=40, crop=32, batch_size=8, epochs=1, lr=0.05, workers=0,
        precision="fp32", progress=False, tensorboard=False, checkpoint_every=1,
        dist_timeout=60.0,
    )  # fmt: skip
    kwargs.update(overrides)
    return TrainConfig(**kwargs)


def run_train(rank: int, world: int, port: int, specs: list[dict[str, Any]], out: str) -> None:
    """Rank ``rank`` trains with ``specs[rank]`` (``config`` arguments, plus ``resume`` and
    ``local_rank``) and writes what happened to ``out/result_<rank>.json``."""
    spec = dict(specs[rank])
    resume = spec.pop("resume", False)
    local = spec.pop("local_rank", rank)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(local), WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE="1" if local == 0 and rank else str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
    )  # fmt: skip
    torch.set_num_threads(1)
    from deepimage.train.loop import train

    start = time.monotonic()
    try:
        paths = {k: Path(spec.pop(k)) for k in ("data", "out", "cache")}
        train(config(**paths, **spec), resume=resume)
        result = {"error": None, "message": ""}
    except Exception as err:
        result = {"error": type(err).__name__, "message": str(err)}
        result["trace"] = traceback.format_exc()[-2000:]
    result["seconds"] = time.monotonic() - start
    (Path(out) / f"result_{rank}.json").write_text(json.dumps(result))
