"""``deepimage bench scaling``: data-parallel step time, sync time and bytes against N.

The benchmark spawns N gloo processes per strategy and times whole steps of a model on a
fixed per-rank batch. A timed window is ``steps`` consecutive steps, run as the training loop
runs them (no barrier between steps), closed by the strategy's flush and a barrier inside the
timer: every exchange the window started, lazy update's deferred ones included, is paid
for in it. ``step_s`` is the window's time over ``steps``, the median of ``repeats`` windows
(``spread``: their min and max). Reported with it: compute time (the same step on one process,
no exchange), the time the training thread spends blocked in the strategy (``blocking``:
butterfly's waits and update; lazy's launches and waits in the hooks), the exposed sync time
(step time minus compute time) and the bytes each rank sends per step (ring accounting, see
:mod:`deepimage.parallel.base`).
``bench simulate --measured scaling.json`` checks :mod:`deepimage.parallel.perf_model` on it.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from deepimage.bench.spawn import rank_env, spawn
from deepimage.parallel.base import CommStats


@dataclass
class BenchSpec:
    model: str = "vgg16_deepimage"
    width: float = 0.25
    image_size: int = 64
    batch_per_rank: int = 16
    steps: int = 6  # steps per timed window
    warmup: int = 2
    repeats: int = 3  # timed windows
    bucket_mb: float = 25.0


def time_windows(
    run_step: Callable[[], None],
    flush: Callable[[], None],
    barrier: Callable[[], None],
    stats: CommStats,
    steps: int,
    repeats: int,
) -> tuple[list[float], list[float], list[float]]:
    """Seconds, blocking seconds and bytes per step of ``repeats`` windows of ``steps`` steps.

    A window starts with nothing in flight on any rank and ends once ``flush`` has finished
    the exchanges its steps left in flight and ``barrier`` has seen every rank done: all
    inside the timer, so a strategy that defers its exchange pays for it here.
    """
    times, blocking, sent = [], [], []
    for _ in range(repeats):
        flush()
        barrier()  # every rank starts the window together, nothing in flight
        stats.reset()
        start = time.perf_counter()
        for _ in range(steps):
            run_step()
        flush()  # the window's last exchanges (lazy defers them to the next step)
        barrier()  # and every rank's: the window ends when the slowest rank is done
        times.append((time.perf_counter() - start) / steps)
        blocking.append(stats.blocking_s / steps)
        sent.append(stats.bytes_sent / steps)
    return times, blocking, sent


def _measure(rank: int, world: int, port: int, sync: str, spec: BenchSpec, out: str) -> None:
    import torch

    rank_env(rank, world, port)
    torch.set_num_threads(1)
    from deepimage.models import get_model
    from deepimage.parallel import dist as pdist
    from deepimage.parallel.base import broadcast_model
    from deepimage.parallel.registry import build_strategy
    from deepimage.train.step import forward_backward

    pdist.init_distributed(torch.device("cpu"), timeout=300)
    torch.manual_seed(0)
    model = get_model(spec.model, num_classes=100, image_size=spec.image_size, width=spec.width)
    broadcast_model(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    strategy = build_strategy(sync, model, opt, bucket_mb=spec.bucket_mb)
    train_model = strategy.wrap()
    b = spec.batch_per_rank
    x = torch.randn(b, 3, spec.image_size, spec.image_size)
    y = torch.randint(0, 100, (b,))

    def run_step() -> None:
        forward_backward(train_model, x, y, precision="fp32", micro_step=strategy.micro_step)
        strategy.step()
        strategy.zero_grad()

    for _ in range(spec.warmup):
        run_step()
    times, blocking, sent = time_windows(
        run_step, strategy.flush, pdist.barrier, strategy.stats, spec.steps, spec.repeats
    )
    if rank == 0:
        Path(out).write_text(json.dumps({"step_s": statistics.median(times),
                                         "blocking_s": statistics.median(blocking),
                                         "bytes": statistics.median(sent),
                                         "spread": [min(times), max(times)]}))  # fmt: skip
    pdist.destroy()


def bench_scaling(procs: list[int], syncs: list[str], spec: BenchSpec, out_dir: Path) -> dict:
    """Run every (N, strategy) pair; compute time is the N=1 step of the same strategy."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    compute: dict[str, float] = {}
    for sync in syncs:
        for n in sorted(set([1, *procs])):
            path = out_dir / f"{sync}-{n}.json"
            spawn(_measure, n, sync, spec, str(path))
            r = json.loads(path.read_text())
            if n == 1:
                compute[sync] = r["step_s"]
            if n not in procs:
                continue
            c = compute[sync]
            rows.append({"procs": n, "sync": sync, "compute_s": c, "step_s": r["step_s"],
                         "blocking_s": r["blocking_s"], "exposed_s": max(0.0, r["step_s"] - c),
                         "bytes": r["bytes"], "spread": r["spread"]})  # fmt: skip
    return {"spec": asdict(spec), "rows": rows}


def print_scaling(result: dict[str, Any]) -> None:
    spec = result["spec"]
    print(
        f"# scaling: {spec['model']} width {spec['width']} at {spec['image_size']}px, "
        f"{spec['batch_per_rank']} images per process, gloo, whole steps: median of "
        f"{spec.get('repeats', 1)} windows of {spec['steps']} steps, each closed by flush + barrier"
    )
    print(f"{'N':>3} {'sync':>9} {'compute ms':>11} {'step ms':>9} {'blocking ms':>12} "
          f"{'exposed ms':>11} {'MB/rank':>9}")  # fmt: skip
    for r in result["rows"]:
        blocking = "-" if r["sync"] == "ddp" else f"{1e3 * r['blocking_s']:.1f}"
        print(f"{r['procs']:>3} {r['sync']:>9} {1e3 * r['compute_s']:>11.1f} "
              f"{1e3 * r['step_s']:>9.1f} {blocking:>12} {1e3 * r['exposed_s']:>11.1f} "
              f"{r['bytes'] / 1e6:>9.2f}")  # fmt: skip


def plot_scaling(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    rows = result["rows"]
    labels = [f"{r['sync']}\nN={r['procs']}" for r in rows]
    compute = [1e3 * r["compute_s"] for r in rows]
    exposed = [1e3 * r["exposed_s"] for r in rows]
    ax.bar(labels, compute, label="compute")
    ax.bar(labels, exposed, bottom=compute, label="exposed sync")
    ax.set_ylabel("ms per step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def spec_with(**kwargs: Any) -> BenchSpec:
    return replace(BenchSpec(), **{k: v for k, v in kwargs.items() if v is not None})
