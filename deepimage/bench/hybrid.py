"""``deepimage bench hybrid``: hybrid (model-data) against pure data parallelism at N = 1, 2, 4.

Both modes train the same model on the same per-rank batch with ddp conv sync, in N gloo
processes each, and report per rank: the median step time (and its spread), the measured peak
resident memory of the process (``VmHWM``: start-up, model building and the steps included;
hybrid builds only this rank's FC rows, as training does), the FC parameter and
optimizer-state bytes this rank holds, the activations saved for backward (FC part and
total, counted with saved-tensor hooks, each storage once), and the bytes sent per step (ring
accounting, see :mod:`deepimage.parallel.base`). The bytes each hybrid rank sends are also
predicted from the layer sizes by :func:`deepimage.parallel.perf_model.hybrid_bytes`, the term the
scaling model uses, so the table checks that term.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from deepimage.bench.spawn import rank_env, spawn


@dataclass
class HybridSpec:
    model: str = "vgg16_deepimage"
    width: float = 0.25
    image_size: int = 96
    classes: int = 100
    batch_per_rank: int = 16
    steps: int = 5
    warmup: int = 2
    rounds: int = 3  # data and hybrid alternate, round after round, so load hits both alike


class _SavedBytes:
    """Bytes of the activations autograd saves for backward (parameters excluded), split into
    conv trunk and FC head."""

    def __init__(self, params: list) -> None:
        self.section = "conv"
        self.seen: set[int] = {p.untyped_storage().data_ptr() for p in params}
        self.bytes = {"conv": 0, "fc": 0}

    def pack(self, t):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in self.seen and storage.nbytes():
            self.seen.add(key)
            self.bytes[self.section] += storage.nbytes()
        return t


def peak_rss() -> int:
    """Peak resident bytes of this process: ``VmHWM`` of its address space (Linux; unlike
    ``ru_maxrss`` it does not count the spawning parent's pages held before ``exec``),
    else ``ru_maxrss``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _measure(rank: int, world: int, port: int, mode: str, spec: HybridSpec, out: str) -> None:
    """One rank of a ``data`` or ``hybrid`` run; ``compute``: N independent one-process runs
    side by side (the compute time of one rank under the same sharing of the cores)."""
    import torch

    if mode != "compute":
        rank_env(rank, world, port)
    torch.set_num_threads(1)
    from deepimage.models import get_model
    from deepimage.models.common import deferred_fc_init
    from deepimage.parallel import dist as pdist
    from deepimage.parallel.base import broadcast_model
    from deepimage.parallel.head import fc_bytes, shard_classifier
    from deepimage.parallel.hybrid import build_hybrid
    from deepimage.parallel.registry import build_strategy
    from deepimage.train.step import forward_backward

    pdist.init_distributed(torch.device("cpu"), timeout=300)
    world = pdist.world_size()
    torch.manual_seed(0)
    with deferred_fc_init(mode == "hybrid"):  # hybrid: this rank's FC rows only, as in training
        model = get_model(spec.model, num_classes=spec.classes, image_size=spec.image_size,
                          width=spec.width)  # fmt: skip
    if mode == "hybrid":
        shard_classifier(model)
        broadcast_model(model.features)
    else:
        broadcast_model(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    build = build_hybrid if mode == "hybrid" else build_strategy
    strategy = build("ddp", model, opt)
    train_model = strategy.wrap()
    b = spec.batch_per_rank
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(b, 3, spec.image_size, spec.image_size, generator=g)
    y = torch.randint(0, spec.classes, (b,), generator=g)
    rows = torch.arange(rank * b, (rank + 1) * b)
    saved = _SavedBytes(list(model.parameters()))
    model.classifier.register_forward_pre_hook(lambda *_: setattr(saved, "section", "fc"))
    model.classifier.register_forward_hook(lambda *_: setattr(saved, "section", "conv"))
    times, sent, exchange = [], [], []
    for step in range(spec.warmup + spec.steps):
        pdist.barrier()  # no-op in compute mode: the processes merely run side by side
        strategy.stats.reset()
        record = step == spec.warmup
        hooks = (torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t)
                 if record else _null())  # fmt: skip
        start = time.perf_counter()
        with hooks:
            forward_backward(train_model, x, y, precision="fp32", micro_step=strategy.micro_step,
                             dropout_key=(rows, 0, step))  # fmt: skip
        strategy.step()
        strategy.zero_grad()
        if step >= spec.warmup:
            times.append(time.perf_counter() - start)
            sent.append(strategy.stats.bytes_sent)
            exchange.append(strategy.stats.blocking_s)
    link = _link(world) if mode == "hybrid" else None
    head = model.classifier
    fc_params = [p for p in head.parameters()]
    fc_param_b = sum(p.numel() * p.element_size() for p in fc_params)
    fc_state_b = sum(
        t.numel() * t.element_size()
        for p in fc_params
        for t in opt.state.get(p, {}).values()
        if torch.is_tensor(t)
    )
    if mode == "hybrid":
        assert fc_param_b == fc_bytes(head)
    state_b = sum(p.numel() * p.element_size() for p in model.parameters())
    state_b += sum(
        t.numel() * t.element_size()
        for s in opt.state.values()
        for t in s.values()
        if torch.is_tensor(t)
    )
    result = {
        "rank": rank,
        "step_s": statistics.median(times),
        "spread": [min(times), max(times)],
        "bytes": statistics.median(sent),
        "exchange_s": statistics.median(exchange),
        "link": link,
        "fc_param_bytes": fc_param_b,
        "fc_optimizer_bytes": fc_state_b,
        "param_optimizer_bytes": state_b,
        "activation_bytes": dict(saved.bytes),
        "peak_rss": peak_rss(),
    }
    Path(f"{out}.{rank}").write_text(json.dumps(result))
    strategy.close()
    pdist.destroy()


def _link(world: int, big: int = 2**21) -> dict[str, float] | None:
    """gloo's latency (8-byte all-gathers) and bandwidth (8 MiB all-gathers) on this machine."""
    import torch
    import torch.distributed as dist

    from deepimage.parallel.collectives import all_gather_into

    if world == 1:
        return None

    def timed(numel: int, repeats: int) -> float:
        x = torch.zeros(numel)
        out = torch.empty(world * numel)
        dist.barrier()
        start = time.perf_counter()
        for _ in range(repeats):
            all_gather_into(out, x)
        return (time.perf_counter() - start) / repeats

    latency = timed(2, 20) / (world - 1)
    per_byte = (timed(big, 3) / (world - 1) - latency) / (big * 4)
    return {"latency_s": latency, "bytes_s": 1 / max(per_byte, 1e-12)}


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def fc_layer_sizes(spec: HybridSpec) -> list[tuple[int, int]]:
    """(in, out) of the FC layers of ``spec.model`` (built on the meta device)."""
    import torch

    from deepimage.models import get_model

    with torch.device("meta"):
        model = get_model(spec.model, num_classes=spec.classes, image_size=spec.image_size,
                          width=spec.width)  # fmt: skip
    fcs = [m for m in model.classifier if isinstance(m, torch.nn.Linear)]
    conv = sum(p.numel() for p in model.features.parameters())
    return [(m.in_features, m.out_features) for m in fcs], conv


def bench_hybrid(procs: list[int], spec: HybridSpec, out_dir: Path) -> dict[str, Any]:
    """Measure data and hybrid at every N, alternating, ``spec.rounds`` times; one row per
    (mode, N) with the worst rank's figures and the median (and range) over rounds of the
    slowest rank's median step."""
    from deepimage.parallel.perf_model import hybrid_bytes

    out_dir.mkdir(parents=True, exist_ok=True)
    fcs, conv_params = fc_layer_sizes(spec)
    runs: dict[tuple[int, str], list[list[dict]]] = {}
    for _ in range(spec.rounds):
        for n in procs:
            for mode in ("compute", "data", "hybrid"):
                path = out_dir / f"{mode}-{n}.json"
                spawn(_measure, n, mode, spec, str(path))
                ranks = [json.loads(Path(f"{path}.{r}").read_text()) for r in range(n)]
                runs.setdefault((n, mode), []).append(ranks)
    compute = {
        n: statistics.median(max(r["step_s"] for r in ranks) for ranks in runs[(n, "compute")])
        for n in procs
    }
    rows = []
    for (n, mode), repeats in runs.items():
        if mode == "compute":
            continue
        worst = max(repeats[-1], key=lambda r: r["fc_param_bytes"])
        row = {"procs": n, "mode": mode, **{k: v for k, v in worst.items() if k != "rank"}}
        # measured peak resident memory per rank (median over rounds), and the worst rank's
        row["peak_rss_ranks"] = [
            statistics.median(ranks[r]["peak_rss"] for ranks in repeats) for r in range(n)
        ]
        row["peak_rss"] = max(row["peak_rss_ranks"])
        steps = [max(r["step_s"] for r in ranks) for ranks in repeats]
        row["step_s"], row["spread"] = statistics.median(steps), [min(steps), max(steps)]
        row["compute_s"] = compute[n]
        if mode == "hybrid":
            row["predicted_bytes"] = hybrid_bytes(fcs, conv_params * 4, spec.batch_per_rank, n)
        rows.append(row)
    import torch

    result = {
        "spec": asdict(spec),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, gloo, 1 thread per process",
        "versions": f"torch {torch.__version__}, python {platform.python_version()}",
        "rows": rows,
    }
    result["model"] = validate_local(result)
    return result


def validate_local(result: dict[str, Any]) -> dict[str, Any]:
    """The scaling model's exchange and step times for these runs, and its error.

    Nothing is fitted to the runs being predicted. The link is measured in the same processes
    after the timed steps: latency from 8-byte all-gathers, bandwidth from 8 MiB ones. Hybrid's
    activation exchange is predicted as ``collectives x (N-1) x latency + bytes / bandwidth``
    (:func:`~deepimage.parallel.perf_model.hybrid_collectives`,
    :func:`~deepimage.parallel.perf_model.hybrid_activation_bytes`). Step times add compute
    measured at N (N independent processes side by side, so the sharing of the cores is in
    the baseline); ddp's gradient all-reduces, data parallelism's and hybrid's conv ones, hide
    behind the backward pass (two thirds of the compute).
    """
    from deepimage.parallel.perf_model import hybrid_activation_bytes, hybrid_collectives

    spec = HybridSpec(**result["spec"])
    fcs, _ = fc_layer_sizes(spec)
    rows = {(r["procs"], r["mode"]): r for r in result["rows"]}
    out = []
    for (n, mode), r in sorted(rows.items()):
        link = rows.get((n, "hybrid"), {}).get("link")
        if n == 1 or not link:
            continue
        lat, bw = link["latency_s"], link["bytes_s"]
        c = r["compute_s"]
        act = hybrid_activation_bytes(fcs, spec.batch_per_rank, n) if mode == "hybrid" else 0.0
        exch = hybrid_collectives(fcs) * (n - 1) * lat + act / bw if mode == "hybrid" else 0.0
        grad = r["bytes"] - act
        exposed = max(0.0, grad / bw + 2 * (n - 1) * lat - 2 / 3 * c)
        predicted = c + exch + exposed
        row = {"procs": n, "mode": mode, "measured_step_s": r["step_s"],
               "predicted_step_s": predicted,
               "error": (predicted - r["step_s"]) / r["step_s"], "link": link}  # fmt: skip
        if mode == "hybrid":
            row.update(measured_exchange_s=r["exchange_s"], predicted_exchange_s=exch,
                       exchange_error=(exch - r["exchange_s"]) / r["exchange_s"])  # fmt: skip
        out.append(row)
    mae = statistics.fmean(abs(r["error"]) for r in out) if out else None
    return {"rows": out, "mean_abs_error": mae}


def print_hybrid(result: dict[str, Any]) -> None:
    spec = result["spec"]
    print(f"# hybrid vs data parallel: {spec['model']} width {spec['width']} at "
          f"{spec['image_size']}px, {spec['classes']} classes, {spec['batch_per_rank']} images "
          f"per process, fp32, ddp conv sync; median over {spec['rounds']} rounds of the "
          f"median of {spec['steps']} steps")  # fmt: skip
    print(f"machine : {result['machine']}")
    print(f"versions: {result['versions']}")
    head = (f"{'N':>2} {'mode':>6} {'step ms':>8} {'(min-max)':>13} {'vs data':>7} "
            f"{'compute':>7} {'exch ms':>7} {'peak RSS MB':>11} {'vs data':>7} "
            f"{'FC par MB':>9} {'FC opt MB':>9} {'act FC MB':>9} "
            f"{'act all MB':>10} {'sent MB':>8} {'model MB':>8}")  # fmt: skip
    print(head)
    data_step = {r["procs"]: r["step_s"] for r in result["rows"] if r["mode"] == "data"}
    data_rss = {r["procs"]: r["peak_rss"] for r in result["rows"] if r["mode"] == "data"}
    mb = 1e6
    for r in result["rows"]:
        act = r["activation_bytes"]
        lo, hi = r["spread"]
        ratio = r["step_s"] / data_step[r["procs"]]
        exch = f"{1e3 * r['exchange_s']:.1f}" if r["mode"] == "hybrid" else "-"
        pred = f"{r['predicted_bytes'] / mb:8.2f}" if "predicted_bytes" in r else f"{'-':>8}"
        print(f"{r['procs']:>2} {r['mode']:>6} {1e3 * r['step_s']:>8.1f} "
              f"{f'({1e3 * lo:.0f}-{1e3 * hi:.0f})':>13} {ratio:>7.2f} "
              f"{1e3 * r['compute_s']:>7.1f} {exch:>7} {r['peak_rss'] / mb:>11.0f} "
              f"{r['peak_rss'] / data_rss[r['procs']]:>7.2f} "
              f"{r['fc_param_bytes'] / mb:>9.2f} {r['fc_optimizer_bytes'] / mb:>9.2f} "
              f"{act['fc'] / mb:>9.2f} "
              f"{(act['fc'] + act['conv']) / mb:>10.2f} "
              f"{r['bytes'] / mb:>8.2f} {pred}")  # fmt: skip
    check = result.get("model")
    if check and check["rows"]:
        print("scaling model on these runs (link measured; compute measured at N):")
        for r in check["rows"]:
            link = r["link"]
            line = (
                f"  N={r['procs']} {r['mode']:>6}: step measured "
                f"{1e3 * r['measured_step_s']:7.1f} ms, predicted "
                f"{1e3 * r['predicted_step_s']:7.1f} ms ({100 * r['error']:+.0f}%)"
            )
            if "predicted_exchange_s" in r:
                line += (f"; exchange measured {1e3 * r['measured_exchange_s']:.1f} ms, predicted "
                         f"{1e3 * r['predicted_exchange_s']:.1f} ms "
                         f"({100 * r['exchange_error']:+.0f}%; gloo {1e6 * link['latency_s']:.0f}"
                         f" us, {link['bytes_s'] / 1e6:.0f} MB/s)")  # fmt: skip
            print(line)
        print(f"  mean absolute error {100 * check['mean_abs_error']:.0f}%")
    print("(per rank, worst rank; 'vs data': step time, then peak RSS, over data parallel's "
          "at the same N; 'peak RSS': the process's measured peak resident memory (VmHWM), "
          "median over rounds; "
          "'compute': ms per step of N independent processes side by side; 'exch': time in "
          "hybrid's activation collectives; "
          "'model MB': bytes sent predicted by the scaling model's hybrid term)")  # fmt: skip


def spec_with(**kwargs: Any) -> HybridSpec:
    return replace(HybridSpec(), **{k: v for k, v in kwargs.items() if v is not None})
