"""Batch-norm running statistics under each strategy, inside spawned processes (importable
by reference)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from tests.parallel.workers import (
    BN_CASES,
    GLOBAL_BATCH,
    HYPER,
    STEPS,
    batch,
    build_bn_model,
    setup,
)


def _gathered_equal(tensors: list[torch.Tensor], world: int) -> bool:
    flat = torch.cat([t.detach().double().reshape(-1) for t in tensors])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    return all(torch.equal(gathered[0], t) for t in gathered)


def run_bn_buffers(rank: int, world: int, port: int, out: str) -> None:
    """Plain batch norm (no --sync-bn), STEPS steps on this rank's slice, under each strategy:
    are the running statistics the same on every rank before and after flush?"""
    from deepimage.parallel.base import broadcast_model, running_stat_buffers
    from deepimage.parallel.registry import build_strategy
    from deepimage.train.step import forward_backward

    setup(rank, world, port)
    report = {}
    for sync in BN_CASES:
        model = build_bn_model()
        broadcast_model(model)
        opt = torch.optim.SGD(model.parameters(), **HYPER)
        strategy = build_strategy(sync, model, opt, bucket_mb=0.05)
        train_model = strategy.wrap()
        lo, hi = rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world
        for step in range(STEPS):
            x, y, _ = batch(step)
            forward_backward(
                train_model, x[lo:hi], y[lo:hi], precision="fp32", micro_step=strategy.micro_step
            )
            strategy.step()
            strategy.zero_grad()
        buffers = running_stat_buffers(model)
        before = _gathered_equal(buffers, world)
        strategy.flush()
        report[sync] = {"before": before, "after": _gathered_equal(buffers, world)}
        if rank == 0:
            named = {k: v.detach().contiguous() for k, v in model.named_buffers()}
            save_file(named, str(Path(out) / f"buffers-{sync}.safetensors"))
        strategy.close()
    (Path(out) / f"buffers-{rank}.json").write_text(json.dumps(report))
