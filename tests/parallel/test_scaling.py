"""The scaling model: traffic per collective algorithm against explicit message schedules,
held-out paper figures, monotonicity, and bytes gloo really writes (slow)."""

from __future__ import annotations

import json
from collections import defaultdict

import pytest
import torch.multiprocessing as mp

from deepimage.parallel.perf_model import (
    ALGORITHMS,
    GLOO,
    MINWA,
    VGG_A,
    Fit,
    calibrate,
    held_out,
    overlap,
    speedup,
    step_time,
    traffic,
    validate_local,
    vgg_net,
)
from tests.helpers import free_port

NET = vgg_net(VGG_A)


def test_network_counts() -> None:
    # VGG-A: ~133M parameters, ~7.6 GMAC forward per 224px image.
    assert NET.param_bytes / 4 == pytest.approx(132.9e6, rel=0.01)
    assert NET.flops / 6 == pytest.approx(7.6e9, rel=0.02)


def _schedule(collective: str, algorithm: str, n: int, g: int, p: float) -> list[tuple]:
    """Every message (source, destination, bytes) of one collective, written out one by one;
    hierarchical as its three phases in order."""
    part = p / n
    msgs: list[tuple] = []
    rs = collective in ("all_reduce", "reduce_scatter")
    ag = collective in ("all_reduce", "all_gather")
    if algorithm == "direct" and collective == "all_reduce":
        return [(s, d, p) for s in range(n) for d in range(n) if s != d]
    if algorithm in ("direct", "butterfly"):
        for phase in (rs, ag):  # to the owner of each part; then from the owner to all
            if phase:
                msgs += [(s, d, part) for s in range(n) for d in range(n) if s != d]
        return msgs
    if algorithm == "ring":
        steps = (n - 1) * (rs + ag)
        return [(s, (s + 1) % n, part) for _ in range(steps) for s in range(n)]
    nodes = n // g if n > g else 1
    g = min(g, n)
    local = [[k * g + i for i in range(g)] for k in range(nodes)]
    for members in local:  # reduce-scatter inside the node: a ring on p, chunks of p / g
        if rs:
            msgs += [(members[i], members[(i + 1) % g], p / g)
                     for _ in range(g - 1) for i in range(g)]  # fmt: skip
    for i in range(g):  # ring over the nodes, one per local index, on p / g
        ring = [k * g + i for k in range(nodes)]
        steps = (nodes - 1) * (rs + ag)
        msgs += [(ring[k], ring[(k + 1) % nodes], p / g / nodes)
                 for _ in range(steps) for k in range(nodes)]  # fmt: skip
    for members in local:  # all-gather inside the node
        if ag:
            msgs += [(members[i], members[(i + 1) % g], p / g)
                     for _ in range(g - 1) for i in range(g)]  # fmt: skip
    return msgs


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("collective", ["all_reduce", "reduce_scatter", "all_gather"])
@pytest.mark.parametrize("n", [2, 3, 4, 8, 16, 64])
def test_traffic_matches_the_messages_written_out(algorithm, collective, n) -> None:
    """The closed forms of :func:`traffic` against every message of the algorithm counted:
    bytes a device sends, the busiest device's bytes inside its node, and the bytes leaving
    the busiest node (4 devices to a node, as on Minwa)."""
    g, p = 4, 1.0
    if n > g and n % g:
        pytest.skip("whole nodes only")
    node = [i // g for i in range(n)]
    sent, intra, out = defaultdict(float), defaultdict(float), defaultdict(float)
    for s, d, b in _schedule(collective, algorithm, n, g, p):
        sent[s] += b
        if node[s] == node[d]:
            intra[s] += b
        else:
            out[node[s]] += b
    t = traffic(collective, p, n, g, algorithm)
    assert t.sent == pytest.approx(max(sent.values()))
    assert t.intra == pytest.approx(max(intra.values(), default=0.0))
    assert t.node_link == pytest.approx(max(out.values(), default=0.0))


def test_ring_and_hierarchical_cut_a_nodes_link_about_4x_on_minwa() -> None:
    """Paper setup: 64 K40m, 4 to a node and one FDR link. Butterfly sends each device's parts
    to their 60 off-node owners separately; a ring leaves the node once, hierarchical sends
    each part across nodes once. Derived: ``g (n-g) / (n-1)`` = 3.81x and ``n/(n-g)`` x
    ``(n-g)/n`` x g = 4.0x."""
    link = {a: traffic("all_reduce", 1.0, 64, 4, a).node_link for a in ALGORITHMS}
    assert link["butterfly"] / link["ring"] == pytest.approx(4 * 60 / 63)
    assert link["butterfly"] / link["hierarchical"] == pytest.approx(4.0)
    assert link["direct"] / link["butterfly"] == pytest.approx(32.0)  # whole gradients, n/2


HELD_OUT_TOLERANCE = 0.20
"""Relative error allowed on a paper figure the fit did not see. The two figures measure
different things (images/s at batch 1024; time to 80% accuracy, read as images/s under the
assumption of the same epochs and batch at 1 and 32 GPUs, which the paper does not state), and
the model leaves out what the paper names as a gain at more GPUs (more of the data cached in
device memory) and any change of K40m efficiency between 16 and 32 images per GPU. The errors
are +10% to +11% (fit on 2b) and -15% to -17% (fit on 3): the model's speedup falls faster from
32 to 64 GPUs than the paper's does."""


@pytest.mark.parametrize("algorithm", ["butterfly", "ring", "hierarchical"])
@pytest.mark.parametrize("fit_on", ["fig2b", "fig3"])
def test_held_out_paper_speedup(algorithm, fit_on) -> None:
    """Fit utilisation on one of the paper's two speedups (exchange not hidden), predict the
    other within :data:`HELD_OUT_TOLERANCE`. With lazy update's layer-order overlap the model
    misses Figure 3 by +30% (it hides the whole exchange at 32 images per GPU); `bench
    simulate` reports that row, this test pins the exposed exchange, which fits both."""
    result = held_out(NET, MINWA, (fit_on,), algorithm=algorithm, strategy="butterfly")
    fitted = [r for r in result["speedups"] if r["fitted"]]
    predicted = [r for r in result["speedups"] if not r["fitted"]]
    assert len(fitted) == 1 and len(predicted) == 1
    assert abs(fitted[0]["error"]) < 1e-3  # the fit reached its point
    error = predicted[0]["error"]
    assert abs(error) <= HELD_OUT_TOLERANCE, f"{predicted[0]['point']}: {100 * error:+.1f}%"


@pytest.mark.parametrize("algorithm", ["butterfly", "ring", "hierarchical"])
def test_data_parallel_exchange_is_constant_and_hybrids_grows(algorithm) -> None:
    """Paper 3.3 (Figure 2a's reason, not fitted): beyond one node data parallelism's exchange
    "is constant when the size of model is fixed", while hybrid's grows with the global batch.
    From 16 to 64 GPUs at 64 images per GPU (4 to 16 nodes) the first grows at most 30%
    (butterfly's node link carries ``g * 2 (n-g)/n``: 3 to 3.75 gradients), the second at least
    3x (the global batch's activations grow 4x)."""
    fit = calibrate(NET, MINWA, ("fig2b",), algorithm=algorithm, strategy="butterfly")

    def comm(n: int, strategy: str) -> float:
        return step_time(NET, MINWA, fit, n, 64, strategy, algorithm=algorithm)["comm"]

    assert comm(64, "butterfly") / comm(16, "butterfly") <= 1.3
    assert comm(64, "hybrid") / comm(16, "hybrid") >= 3.0


def test_direct_exchange_cannot_give_the_papers_speedup() -> None:
    """Whole gradients to every device: the node link's bytes grow with N, and at 64 GPUs the
    speedup stays below 47x even at 1% of K40m peak; the fit lands on its floor."""
    assert speedup(NET, MINWA, Fit(0.01), 64, 1024, "butterfly", algorithm="direct") < 47
    assert calibrate(NET, MINWA, ("fig2b",), algorithm="direct").utilisation < 0.011


def test_unknown_algorithm_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown collective algorithm 'tree'"):
        traffic("all_reduce", 1.0, 8, 4, "tree")
    with pytest.raises(ValueError, match="do not fill nodes of 4"):
        traffic("all_reduce", 1.0, 6, 4, "ring")


def test_monotonic() -> None:
    fit = Fit(0.34)
    assert overlap(NET, "butterfly") < overlap(NET, "ddp") < overlap(NET, "lazy") <= 1
    for algorithm in ("butterfly", "ring", "hierarchical"):
        lazy = [speedup(NET, MINWA, fit, n, 1024, "lazy", algorithm=algorithm)
                for n in (1, 2, 4, 8, 16, 32, 64)]  # fmt: skip
        assert lazy == sorted(lazy)
        for n in (2, 8, 64):  # overlap never hurts; more data per step never lowers the speedup
            assert (
                step_time(NET, MINWA, fit, n, 16, "lazy", algorithm=algorithm)["step"]
                <= step_time(NET, MINWA, fit, n, 16, "butterfly", algorithm=algorithm)["step"]
            )
            assert speedup(NET, MINWA, fit, n, 64 * n, "lazy", algorithm=algorithm) >= speedup(
                NET, MINWA, fit, n, 1024, "lazy", algorithm=algorithm
            )
        hybrid = [step_time(NET, MINWA, fit, n, 64, "hybrid", algorithm=algorithm)["step"]
                  for n in (8, 16, 32, 64)]  # fmt: skip
        assert hybrid == sorted(hybrid)
    for n in (8, 64):  # less on the node link: a faster exchange
        secs = {a: step_time(NET, MINWA, fit, n, 16, "butterfly", algorithm=a)["comm"]
                for a in ALGORITHMS}  # fmt: skip
        assert secs["hierarchical"] < secs["butterfly"] < secs["direct"]
        assert secs["ring"] < secs["butterfly"]


def _row(n: int, sync: str, step: float, nbytes: float) -> dict:
    return {"procs": n, "sync": sync, "compute_s": 0.1, "step_s": step, "bytes": nbytes}


def test_validate_local_errors() -> None:
    # 2 cores; butterfly N=2 exposes 0.1 s for 10 MB: ~100 MB/s once latency is removed.
    rows = [_row(1, "butterfly", 0.1, 0), _row(2, "butterfly", 0.2, 10e6),
            _row(4, "butterfly", 0.5, 15e6)]  # fmt: skip
    out = validate_local({"spec": {}, "rows": rows}, cores=2)
    assert out["bandwidth_bytes_s"] == pytest.approx(10e6 / (0.1 - 2 * 50e-6))
    (r,) = out["rows"]  # the fitted point is not reported as validation
    predicted = 2 * 0.1 + 15e6 / out["bandwidth_bytes_s"] + 6 * 50e-6  # compute x 4/2 + comm
    assert r["predicted_step_s"] == pytest.approx(predicted)
    assert r["error"] == pytest.approx(predicted / 0.5 - 1)
    assert out["mean_abs_error"] == pytest.approx(abs(r["error"]))


WIRE_FLOATS = 3 * 2**18  # 3 MiB, divisible by 2, 3 and 4 processes


def _written() -> int:
    """Bytes this process has passed to write()/writev() (sockets included): /proc/self/io."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("wchar"))


def _wire_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    from tests.parallel import workers

    workers.setup(rank, world, port)
    from deepimage.parallel.collectives import all_gather_into, reduce_scatter_into

    full = torch.ones(WIRE_FLOATS)
    part = torch.ones(WIRE_FLOATS // world)
    ops = {
        "all_reduce": lambda: dist.all_reduce(full),
        "reduce_scatter": lambda: reduce_scatter_into(part, full),
        "all_gather": lambda: all_gather_into(full, part),
    }
    written = {}
    for name, op in ops.items():
        dist.barrier()
        before = _written()
        op()
        written[name] = _written() - before
    with open(f"{out}.{rank}", "w") as f:
        json.dump(written, f)
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_gloo_writes_the_bytes_the_model_says(tmp_path, world) -> None:
    """Bytes each gloo process writes to its sockets (the kernel's count, not a formula) for
    each collective deepimage issues, against :func:`traffic` with gloo's algorithms
    (:data:`GLOO`). Within 1%: gloo adds a few dozen bytes of header per message to 3 MiB."""
    out = tmp_path / "wire"
    mp.spawn(_wire_worker, args=(world, free_port(), str(out)), nprocs=world)
    for rank in range(world):
        written = json.loads(out.with_suffix(f".{rank}").read_text())
        for name, (runs_as, algorithm) in GLOO.items():
            t = traffic(runs_as, WIRE_FLOATS * 4, world, world, algorithm)
            assert written[name] == pytest.approx(t.sent, rel=0.01), (name, rank)
