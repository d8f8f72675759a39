"""Worker of ``test_collectives.py``: the direct collectives against gloo's own."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

from tests.parallel.workers import setup


def run_direct(rank: int, world: int, port: int, out: str) -> None:
    from deepimage.parallel.collectives import (
        all_gather_into,
        direct_all_gather,
        direct_reduce_scatter,
        reduce_scatter_into,
    )

    setup(rank, world, port)
    part = 1001
    report: dict = {"reduce_scatter": [], "all_gather": [], "rank_order": []}
    for trial in range(3):  # several in flight at once, finished out of launch order
        gen = torch.Generator().manual_seed(100 * trial + rank)
        flats = [torch.randn(world * part, generator=gen) for _ in range(3)]
        outs = [torch.empty(part) for _ in flats]
        works = [
            direct_reduce_scatter(o, f, rank, world, tag=i)
            for i, (o, f) in enumerate(zip(outs, flats))
        ]
        for work in reversed(works):
            work.wait()
        for o, f in zip(outs, flats):
            want = torch.empty(part)
            reduce_scatter_into(want, f)
            report["reduce_scatter"].append((o - want).abs().max().item())
        # the sum runs in rank order: rank 0's part first, then rank 1's, ...
        parts = [torch.empty(world * part) for _ in range(world)]
        dist.all_gather(parts, flats[0])
        ordered = parts[0].view(world, part)[rank].clone()
        for r in range(1, world):
            ordered += parts[r].view(world, part)[rank]
        report["rank_order"].append(torch.equal(outs[0], ordered))
        mine = torch.randn(part, generator=gen)
        gathered = torch.full((world * part,), float("nan"))
        direct_all_gather(gathered, mine, rank, world, tag=7).wait()
        want = torch.empty(world * part)
        all_gather_into(want, mine)
        report["all_gather"].append(torch.equal(gathered, want))
    Path(out, f"direct-{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


def run_shm(rank: int, world: int, port: int, out: str) -> None:
    from deepimage.parallel.shm import ShmExchange

    setup(rank, world, port)
    sizes = [1001, 3, 1, 4096]  # one smaller than the world: some ranks own no part of it
    exchange = ShmExchange.create(sizes)
    report: dict = {"created": exchange is not None, "mean": [], "rank_order": []}
    if exchange is not None:
        for step in range(4):  # each slot rewritten every step, results taken in reverse
            gen = torch.Generator().manual_seed(100 * step + rank)
            grads = [torch.randn(n, generator=gen) for n in sizes]
            for i, g in enumerate(grads):
                exchange.slot(i).copy_(g)
                exchange.post(i)
                exchange.progress()
            for i in reversed(range(len(sizes))):
                got = exchange.result(i).clone()
                everyone = [torch.empty_like(grads[i]) for _ in range(world)]
                dist.all_gather(everyone, grads[i])
                ordered = everyone[0].clone()
                for r in range(1, world):
                    ordered += everyone[r]
                ordered /= world
                want = grads[i].clone()
                dist.all_reduce(want)
                report["mean"].append((got - want / world).abs().max().item())
                report["rank_order"].append(torch.equal(got, ordered))
        dist.barrier()  # nobody reuses a slot before the last results are read
    Path(out, f"shm-{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()
