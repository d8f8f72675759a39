"""Butterfly's two exchanges on gloo: gloo's own collectives against the direct form.

Spawns ``--procs`` gloo processes on this machine. Each times, over a flat float32 buffer
of ``--mb`` megabytes (VGG-16's gradient at 32 px by default), interleaved, ``--repeats``
times with a barrier before each timed call: gloo's ``all_reduce`` (what ddp and lazy
issue), ``reduce_scatter_tensor`` and ``all_gather_into_tensor`` (butterfly before), and
:func:`deepimage.parallel.collectives.direct_reduce_scatter` and ``direct_all_gather``
(butterfly on gloo now: every rank sends part k to rank k and the reduced part back, point to
point). And lazy update's exchange of a layer both ways it runs: copy the gradient into the
exchange buffer, gloo's ``all_reduce``, divide by N; or copy it into this rank's slot of a
:class:`~deepimage.parallel.shm.ShmExchange` and take the mean back (local ranks on CPU).
Prints rank 0's medians, ranges and ratios.

    python benchmarks/collectives.py [--procs 2] [--mb 134.6] [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from deepimage.bench.report import header


def worker(rank: int, world: int, port: int, mb: float, repeats: int) -> None:
    from deepimage.parallel.collectives import (
        all_gather_into,
        direct_all_gather,
        direct_reduce_scatter,
        reduce_scatter_into,
    )
    from deepimage.parallel.shm import ShmExchange

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    part = int(mb * 1e6 / 4) // world
    flat, out = torch.randn(part * world), torch.empty(part)
    received = torch.empty(world - 1, part)  # kept across steps, as butterfly keeps it
    grad, buffer = torch.randn(part * world), torch.empty(part * world)
    shm = ShmExchange.create([part * world])
    if shm is None:
        raise SystemExit("shared memory is not available here")

    def lazy_gloo() -> None:
        buffer.copy_(grad)
        dist.all_reduce(buffer)
        buffer.div_(world)

    def lazy_shm() -> None:
        shm.slot(0).copy_(grad)
        shm.post(0)
        shm.result(0)

    cases = {
        "gloo all_reduce": lambda: dist.all_reduce(flat),
        "gloo reduce_scatter_tensor": lambda: reduce_scatter_into(out, flat),
        "direct reduce-scatter": lambda: direct_reduce_scatter(
            out, flat, rank, world, 0, received
        ).wait(),
        "gloo all_gather_into_tensor": lambda: all_gather_into(flat, out),
        "direct all-gather": lambda: direct_all_gather(flat, out, rank, world, 1).wait(),
        "lazy exchange over gloo": lazy_gloo,
        "lazy exchange, shared memory": lazy_shm,
    }
    ms: dict[str, list[float]] = {k: [] for k in cases}
    for fn in cases.values():
        fn()
    for _ in range(repeats):
        for name, fn in cases.items():
            dist.barrier()
            start = time.perf_counter()
            fn()
            ms[name].append((time.perf_counter() - start) * 1e3)
    if rank == 0:
        med = {k: statistics.median(v) for k, v in ms.items()}
        for name, values in ms.items():
            print(f"{name:28s}: {med[name]:7.1f} ms (min {min(values):.1f}, max {max(values):.1f}, "
                  f"n={len(values)})")  # fmt: skip
        rs = med["gloo reduce_scatter_tensor"] / med["direct reduce-scatter"]
        ag = med["gloo all_gather_into_tensor"] / med["direct all-gather"]
        both = med["direct reduce-scatter"] + med["direct all-gather"]
        print(f"direct reduce-scatter {rs:.2f}x gloo's, direct all-gather {ag:.2f}x gloo's; "
              f"butterfly's pair {both:.1f} ms against one all_reduce "
              f"{med['gloo all_reduce']:.1f} ms")  # fmt: skip
        lazy = med["lazy exchange over gloo"] / med["lazy exchange, shared memory"]
        print(f"lazy update's exchange through shared memory {lazy:.2f}x over gloo")
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--mb", type=float, default=134.6, help="buffer size in MB")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--port", type=int, default=29533)
    args = p.parse_args()
    header(f"collectives: {args.mb} MB float32, {args.procs} gloo processes, 1 thread each")
    mp.spawn(worker, args=(args.procs, args.port, args.mb, args.repeats), nprocs=args.procs)


if __name__ == "__main__":
    main()
