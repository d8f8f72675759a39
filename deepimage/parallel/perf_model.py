"""The analytic scaling model (``deepimage bench simulate``): step time and speedup vs N, no torch.

A step is compute ``b * F / (peak * u)`` plus the exposed part of the exchange. The exchange
has two independent inputs:

* the **collective algorithm** (:data:`ALGORITHMS`), which fixes how many bytes each device
  sends and how many of them cross its node's network link (:func:`traffic`): ``direct``
  (every device sends its whole gradient to every other), ``butterfly`` (paper 3.1: part k of
  every gradient goes straight to device k, which sends the sum back to all), ``ring`` and
  ``hierarchical`` (reduce-scatter in the node, all-reduce between nodes, all-gather in the
  node);
* the **strategy** (``ddp``, ``butterfly``, ``lazy``, ``hybrid``), which fixes how much of the
  exchange hides behind compute (:func:`overlap`): butterfly none, DDP's buckets the backward
  pass (2/3), lazy update a byte-weighted window of backward-below plus forward-below each layer.

Hybrid (model-data) parallelism exchanges only the convolution gradients but all-gathers the
fully-connected activations of the global batch, forward and backward, without overlap
(paper 3.2-3.3).

Calibration on Minwa uses physical constants (:data:`MINWA`) and fits the achieved fraction of
K40m peak ``u`` to some of the paper's figures (:func:`calibrate`); :func:`held_out` predicts
the figures the fit did not see and reports the error.
"""

from __future__ import annotations

import math
import os
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

VGG_A = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]
"""8 convolutions + 3 FC layers (VGG configuration A): the paper's scaling network (3.3)."""

VGG_D = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
"""13 convolutions + 3 FC layers: ``vgg16_deepimage``, the network ``bench scaling`` runs."""


@dataclass
class Net:
    """What the model needs of a network: training FLOPs and bytes per image, parameters."""

    name: str
    flops: float  # training FLOPs per image (3 x forward: forward, input and weight gradients)
    param_bytes: float
    conv_param_bytes: float
    fc_activation_bytes: float  # per image: FC inputs and logits (hybrid exchanges them)
    layers: list[tuple[float, float]] = field(default_factory=list)  # (fwd FLOPs, bytes)
    fc_layers: list[tuple[int, int]] = field(default_factory=list)  # (in, out) of each FC


def vgg_net(
    cfg: list, image: int = 224, fc: int = 4096, classes: int = 1000, width: float = 1.0
) -> Net:
    """Count FLOPs and parameters of a VGG-style network analytically, layer by layer."""
    c_in, side, layers = 3, image, []
    for v in cfg:
        if v == "M":
            side //= 2
            continue
        c = max(1, round(v * width))
        layers.append((2.0 * side * side * c_in * c * 9, 4.0 * (c_in * c * 9 + c)))
        c_in = c
    n_conv = len(layers)
    fc_in = c_in * side * side
    fc_layers = [(fc_in, fc), (fc, fc), (fc, classes)]
    for i, o in fc_layers:
        layers.append((2.0 * i * o, 4.0 * (i * o + o)))
    return Net(
        name=f"vgg({n_conv} conv + 3 FC) at {image}px",
        flops=3 * sum(f for f, _ in layers),
        param_bytes=sum(b for _, b in layers),
        conv_param_bytes=sum(b for _, b in layers[:n_conv]),
        fc_activation_bytes=4.0 * (fc_in + 2 * fc + classes),
        layers=layers,
        fc_layers=fc_layers,
    )


def hybrid_activation_bytes(
    fc_layers: list[tuple[int, int]], batch_per_device: int, n: int
) -> float:
    """Bytes one device sends per step exchanging activations in hybrid parallelism.

    As :mod:`deepimage.parallel.hybrid` does it: an all-gather of the first FC layer's input
    rows (the conv features of the global batch), an all-gather of every FC layer's output
    columns (``ceil(out / n)`` per device, padded), and a reduce-scatter of the same size in
    backward for each; plus the images' dropout keys and the batch sizes (8-byte integers).
    Ring accounting: a collective over ``n x chunk`` bytes sends ``(n - 1) x chunk``.
    """
    if n == 1:
        return 0.0
    b = batch_per_device
    chunks = b * fc_layers[0][0] * 4 + sum(b * n * -(-o // n) * 4 for _, o in fc_layers)
    return (n - 1) * (2 * chunks + 8 * b + 8)


def hybrid_collectives(fc_layers: list[tuple[int, int]]) -> int:
    """Activation collectives per hybrid step: a gather before each FC layer and of the logits,
    a reduce-scatter for each in backward, and the gathers of batch sizes and dropout keys."""
    return 2 * (len(fc_layers) + 1) + 2


def hybrid_bytes(
    fc_layers: list[tuple[int, int]], conv_param_bytes: float, batch_per_device: int, n: int
) -> float:
    """Bytes one device sends per hybrid step: activations plus the conv gradient all-reduce."""
    if n == 1:
        return 0.0
    conv = 2 * (n - 1) / n * conv_param_bytes
    return hybrid_activation_bytes(fc_layers, batch_per_device, n) + conv


def overlap(net: Net, strategy: str) -> float:
    """Fraction of the step's compute that can hide the gradient exchange, from layer order.

    Butterfly exchanges after the backward pass: 0. DDP's buckets run during the backward pass
    only: 2/3 (backward is two thirds of training FLOPs). Lazy update sends layer i's gradient
    when the backward pass produces it and waits only when the next forward pass reaches layer
    i: its window is the backward and forward compute of the layers below i, i.e. the share of
    forward FLOPs below i; the byte-weighted mean of that window is the overlap.
    """
    if strategy in ("butterfly", "hybrid"):
        return 0.0
    if strategy == "ddp":
        return 2.0 / 3.0
    total_f = sum(f for f, _ in net.layers)
    total_b = sum(b for _, b in net.layers)
    below, acc = 0.0, 0.0
    for f, b in net.layers:
        acc += b * below / total_f
        below += f
    return acc / total_b


@dataclass
class Machine:
    """Per-device peak FLOPs and the links a device's exchange crosses."""

    name: str
    peak_flops: float  # per device
    link_bytes_s: float  # achieved bandwidth of one network link (one direction)
    intra_bytes_s: float  # achieved bandwidth between devices of one node
    gpus_per_node: int
    latency_s: float  # per message
    links_per_node: int = 1
    cores: int = 0  # CPU cores shared by the processes (0: devices do not share compute)
    threads_per_proc: int = 1


MINWA = Machine("Minwa (K40m, 56 Gb/s FDR)", 4.29e12, 6.0e9, 10.0e9, 4, 2e-6)
"""Paper section 2: 4.29 TFLOPS fp32 per K40m, 4 GPUs and one FDR link per node. FDR 4x signals
56 Gb/s, 54.5 Gb/s after 64b/66b coding (6.8 GB/s); MPI over FDR typically reaches ~6 GB/s
one way and ~1-2 us latency with GPUDirect RDMA. PCIe 3.0 x16 between K40m: ~10 GB/s."""

H100 = Machine("H100 SXM (bf16 dense), 400 Gb/s per GPU", 989e12, 44e9, 370e9, 8, 5e-6, 8)
"""989 TFLOPS bf16 dense; one 400 Gb/s NIC per GPU at the same 88% achieved/nominal as FDR;
NVLink 4 at 450 GB/s nominal, ~370 GB/s achieved all-reduce bus bandwidth."""

UTILISATION_PLAUSIBLE = (0.30, 0.50)
"""Achieved fraction of peak for cuDNN-era (v1-v2) VGG training on Kepler (K40m)."""


@dataclass
class Fit:
    """The model's one fitted parameter."""

    utilisation: float = 0.4  # achieved fraction of peak FLOPs


ALGORITHMS = ("direct", "butterfly", "ring", "hierarchical")
"""Collective algorithms the model knows; every exchange names one (:func:`traffic`)."""

COLLECTIVES = ("all_reduce", "reduce_scatter", "all_gather")


@dataclass(frozen=True)
class Traffic:
    """Where the bytes of one collective go, per device and per node (one direction)."""

    sent: float  # bytes one device sends in all
    intra: float  # of those, bytes over its node's own fabric (the busiest device)
    node_link: float  # bytes one node's network link carries out of the node
    messages: int  # messages one device sends in sequence (latency terms)
    phased: bool = False  # intra-node and network phases run one after the other


def traffic(collective: str, nbytes: float, n: int, per_node: int, algorithm: str) -> Traffic:
    """Bytes of one ``collective`` over ``nbytes`` (the full buffer: all-reduce buffer,
    reduce-scatter input, all-gather output) on ``n`` devices, ``per_node`` to a node.

    With ``p = nbytes``, ``g`` devices per node and ``m = n / g`` nodes (devices numbered node
    by node; a ring visits them in that order), an all-reduce is:

    * ``direct``: every device sends all of ``p`` to each of the ``n - 1`` others; ``n - g`` of
      them live off-node, so the node link carries ``g (n - g) p``.
    * ``butterfly``: part k (``p / n``) of every device goes to device k, which sends the sum of
      part k to every device: ``2 (n - 1) / n p`` per device, ``g * 2 (n - g) / n p`` on the
      node link (every device's parts for off-node owners leave the node separately).
    * ``ring``: ``2 (n - 1)`` steps of ``p / n`` to the next device; one ring edge per node
      leaves it, so the node link carries one device's ``2 (n - 1) / n p``.
    * ``hierarchical``: reduce-scatter in the node (``(g - 1) / g p``), a ring all-reduce of
      each device's ``p / g`` across the m nodes (``g`` of them share the link:
      ``2 (m - 1) / m p``), all-gather in the node; the phases run in sequence.

    A reduce-scatter or an all-gather is the first or the second half of butterfly, ring or
    hierarchical; ``direct`` sends each part straight to its owner, which is butterfly's half.
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown collective algorithm {algorithm!r}; one of {ALGORITHMS}")
    if collective not in COLLECTIVES:
        raise ValueError(f"unknown collective {collective!r}; one of {COLLECTIVES}")
    if n <= 1:
        return Traffic(0.0, 0.0, 0.0, 0)
    g = min(n, per_node)
    if n > g and n % g:
        raise ValueError(f"{n} devices do not fill nodes of {per_node}")
    p, m = float(nbytes), n // g
    half = collective != "all_reduce"
    if algorithm == "direct" and half:
        algorithm = "butterfly"
    if algorithm == "direct":
        return Traffic((n - 1) * p, (g - 1) * p, g * (n - g) * p, n - 1)
    k = 1 if half else 2  # phases: reduce-scatter and/or all-gather
    if algorithm == "butterfly":
        return Traffic(k * (n - 1) / n * p, k * (g - 1) / n * p, g * k * (n - g) / n * p,
                       k * (n - 1))  # fmt: skip
    if algorithm == "ring":
        link = k * (n - 1) / n * p if m > 1 else 0.0
        return Traffic(k * (n - 1) / n * p, k * (n - 1) / n * p, link, k * (n - 1))
    intra = k * (g - 1) / g * p  # hierarchical
    link = k * (m - 1) / m * p
    return Traffic(intra + link / g, intra, link, k * (g - 1 + m - 1), phased=True)


def traffic_seconds(t: Traffic, m: Machine) -> float:
    """Seconds of a collective: the busier of the node link and the node fabric (both at
    once), or their sum when the algorithm runs them in sequence, plus message latency."""
    link = t.node_link / (m.link_bytes_s * m.links_per_node)
    intra = t.intra / m.intra_bytes_s
    wire = link + intra if t.phased else max(link, intra)
    return wire + t.messages * m.latency_s


def comm_seconds(net_bytes: float, m: Machine, n: int, algorithm: str) -> float:
    """Seconds of an all-reduce of ``net_bytes`` per device over n devices of ``m``."""
    return traffic_seconds(traffic("all_reduce", net_bytes, n, m.gpus_per_node, algorithm), m)


def compute_seconds(net: Net, m: Machine, fit: Fit, n: int, batch_per_device: int) -> float:
    """Compute per step; slowed by ``N * threads / cores`` when processes share CPU cores."""
    share = max(1.0, n * m.threads_per_proc / m.cores) if m.cores else 1.0
    return share * batch_per_device * net.flops / (m.peak_flops * fit.utilisation)


def hybrid_exchange_seconds(
    net: Net, m: Machine, n: int, batch_per_device: int, algorithm: str
) -> float:
    """Hybrid's exchange per step: every FC activation gather and its backward reduce-scatter
    (the rows of the global batch, as :func:`hybrid_activation_bytes` counts them), the small
    gathers of batch sizes and dropout keys (latency only), and the conv gradient all-reduce."""
    if n == 1:
        return 0.0
    b, g = batch_per_device, m.gpus_per_node
    gathers = [n * b * net.fc_layers[0][0] * 4] + [n * b * n * -(-o // n) * 4
                                                  for _, o in net.fc_layers]  # fmt: skip
    seconds = 0.0
    for out_bytes in gathers:
        for collective in ("all_gather", "reduce_scatter"):
            seconds += traffic_seconds(traffic(collective, out_bytes, n, g, algorithm), m)
    seconds += 2 * (n - 1) * m.latency_s
    return seconds + comm_seconds(net.conv_param_bytes, m, n, algorithm)


def step_time(
    net: Net,
    m: Machine,
    fit: Fit,
    n: int,
    batch_per_device: int,
    strategy: str,
    *,
    algorithm: str,
) -> dict[str, float]:
    """Seconds per step of one device: compute, exchange and what of it is exposed."""
    compute = compute_seconds(net, m, fit, n, batch_per_device)
    if n == 1:
        return {"compute": compute, "comm": 0.0, "exposed": 0.0, "step": compute}
    if strategy == "hybrid":
        comm = hybrid_exchange_seconds(net, m, n, batch_per_device, algorithm)
        return {"compute": compute, "comm": comm, "exposed": comm, "step": compute + comm}
    comm = comm_seconds(net.param_bytes, m, n, algorithm)
    exposed = max(0.0, comm - overlap(net, strategy) * compute)
    return {"compute": compute, "comm": comm, "exposed": exposed, "step": compute + exposed}


def speedup(
    net: Net, m: Machine, fit: Fit, n: int, global_batch: int, strategy: str, *, algorithm: str
) -> float:
    """Images per second on n devices over one device (same per-device batch)."""
    b = max(1, global_batch // n)
    one = step_time(net, m, fit, 1, b, strategy, algorithm=algorithm)["step"]
    return n * one / step_time(net, m, fit, n, b, strategy, algorithm=algorithm)["step"]


def device_counts(m: Machine, top: int = 256) -> list[int]:
    """1 to a node's devices, then whole nodes."""
    g = m.gpus_per_node
    return list(range(1, g + 1)) + list(range(2 * g, top + 1, g))


def crossover(
    net: Net, m: Machine, fit: Fit, strategy: str, *, algorithm: str, per_device: int = 64
) -> int | None:
    """Smallest device count (:func:`device_counts`) where data parallelism with ``strategy``
    is faster than hybrid at ``per_device`` images per device; both use ``algorithm``."""
    for n in device_counts(m)[1:]:
        dp = step_time(net, m, fit, n, per_device, strategy, algorithm=algorithm)["step"]
        hy = step_time(net, m, fit, n, per_device, "hybrid", algorithm=algorithm)["step"]
        if dp < hy:
            return n
    return None


@dataclass(frozen=True)
class PaperSpeedup:
    """A speedup over one GPU that the paper states in its text."""

    what: str
    gpus: int
    global_batch: int
    speedup: float


PAPER_SPEEDUPS = {
    "fig2b": PaperSpeedup("images/s, Figure 2b (3.3)", 64, 1024, 47.0),
    "fig3": PaperSpeedup("time to 80% accuracy, Figure 3 (3.3)", 32, 1024, 24.7),
}
"""Figure 2b: 47x images/s at 64 GPUs, batch 1024. Figure 3: 24.7x less time to 80% accuracy at
32 GPUs; read as a throughput speedup it assumes the same number of epochs to 80% at 1 and 32
GPUs (the same global batch; the paper states none, Figure 2b's largest, 1024, is taken)."""

PAPER_CROSSOVER = (16, 32)
"""Figure 2a (64 images per GPU): hybrid is faster up to 16 GPUs, data parallelism above."""

PAPER_SYSTEM = {"strategy": "lazy", "algorithm": "butterfly"}
"""Minwa's data parallelism: lazy update over butterfly synchronisation (paper 3.1)."""


def calibrate(
    net: Net, m: Machine, points: tuple[str, ...] = ("fig2b",), *, algorithm: str,
    strategy: str = "lazy",
) -> Fit:  # fmt: skip
    """Fit utilisation (the one free parameter) to the named :data:`PAPER_SPEEDUPS`, least
    squares in log speedup. Speedup falls as utilisation rises (faster compute exposes more
    exchange), so the error is unimodal; golden-section search on [0.01, 1]."""

    def loss(u: float) -> float:
        return sum(
            math.log(
                speedup(net, m, Fit(u), p.gpus, p.global_batch, strategy, algorithm=algorithm)
                / p.speedup
            )
            ** 2  # fmt: skip
            for p in (PAPER_SPEEDUPS[k] for k in points)
        )

    lo, hi = 0.01, 1.0
    r = (5**0.5 - 1) / 2
    for _ in range(80):
        a, b = hi - r * (hi - lo), lo + r * (hi - lo)
        if loss(a) <= loss(b):
            hi = b
        else:
            lo = a
    return Fit((lo + hi) / 2)


def held_out(
    net: Net, m: Machine, fit_on: tuple[str, ...] = ("fig2b",), *, algorithm: str,
    strategy: str = "lazy",
) -> dict[str, Any]:  # fmt: skip
    """Fit on ``fit_on``; predict every other paper speedup and Figure 2a's crossover.

    Returns the fit, one row per paper speedup (``fitted`` says whether the fit saw it) with the
    relative error of the model, and the crossover the model predicts against the paper's band.
    """
    fit = calibrate(net, m, fit_on, algorithm=algorithm, strategy=strategy)
    rows = []
    for key, p in PAPER_SPEEDUPS.items():
        s = speedup(net, m, fit, p.gpus, p.global_batch, strategy, algorithm=algorithm)
        rows.append({"point": key, "what": p.what, "gpus": p.gpus, "batch": p.global_batch,
                     "paper": p.speedup, "model": s, "error": s / p.speedup - 1,
                     "fitted": key in fit_on})  # fmt: skip
    lo, hi = PAPER_CROSSOVER
    n = crossover(net, m, fit, strategy, algorithm=algorithm)
    return {"algorithm": algorithm, "strategy": strategy, "fit_on": list(fit_on),
            "utilisation": fit.utilisation, "speedups": rows,
            "crossover": {"paper": [lo, hi], "model": n,
                          "inside": n is not None and lo < n <= hi}}  # fmt: skip


GLOO = {
    "all_reduce": ("all_reduce", "ring"),
    "reduce_scatter": ("all_reduce", "ring"),
    "all_gather": ("all_gather", "ring"),
}
"""What gloo runs for each collective (bytes each process writes to its sockets, measured in
tests/parallel/test_scaling.py): a ring all-reduce and all-gather, and for reduce-scatter a
whole all-reduce, so it sends ``2 (N-1)/N`` of its input, twice a ring reduce-scatter."""


def simulate(measured: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fit on the paper's Figure 2b, predict its other figures per algorithm, predict an H100
    cluster, and check local measurements."""
    net = vgg_net(VGG_A)
    g = MINWA.gpus_per_node
    link = {a: traffic("all_reduce", net.param_bytes, 64, g, a).node_link for a in ALGORITHMS}
    held = [held_out(net, MINWA, ("fig2b",), algorithm=a, strategy=s)
            for a in ALGORITHMS for s in ("butterfly", "lazy")]  # fmt: skip
    held += [held_out(net, MINWA, ("fig3",), algorithm=a, strategy="butterfly")
             for a in ALGORITHMS]  # fmt: skip
    fit = calibrate(net, MINWA, ("fig2b",), **PAPER_SYSTEM)
    rows = []
    for n in (1, 2, 4, 8, 16, 32, 64):
        row: dict[str, Any] = {"gpus": n}
        for a in ("butterfly", "ring"):
            row[f"minwa_lazy_{a}_b1024"] = speedup(net, MINWA, fit, n, 1024, "lazy", algorithm=a)
            row[f"minwa_dp_{a}_b64pg"] = step_time(net, MINWA, fit, n, 64, "butterfly",
                                                   algorithm=a)["step"]  # fmt: skip
            row[f"minwa_hybrid_{a}_b64pg"] = step_time(net, MINWA, fit, n, 64, "hybrid",
                                                       algorithm=a)["step"]  # fmt: skip
        for a in ("ring", "hierarchical"):
            row[f"h100_ddp_{a}_b1024"] = speedup(net, H100, fit, n, 1024, "ddp", algorithm=a)
        rows.append(row)
    result: dict[str, Any] = {
        "net": {k: v for k, v in asdict(net).items() if k != "layers"},
        "machine": asdict(MINWA),
        "fit": asdict(fit),
        "paper_system": PAPER_SYSTEM,
        "overlap": {s: overlap(net, s) for s in ("butterfly", "ddp", "lazy")},
        "node_link_bytes_64": link,
        "held_out": held,
        "rows": rows,
    }
    if measured:
        result["local"] = validate_local(measured)
    return result


LOCAL_LATENCY_S = 50e-6
"""Per-message latency of gloo over loopback TCP (order of a loopback round trip)."""


def validate_local(
    measured: dict[str, Any], cores: int | None = None, fit_on: tuple[int, str] = (2, "butterfly")
) -> dict[str, Any]:
    """Predict measured step times from a model of this machine; report per-point errors.

    Compute per step is each strategy's N=1 step, scaled by ``max(1, N * threads / cores)``
    when the processes outnumber the cores. Gloo's effective bandwidth is fitted once, on
    ``fit_on`` (butterfly at N=2: no overlap, no oversubscription), as bytes per second of
    exposed time; every other N > 1 point is a prediction with the overlap of :func:`overlap`.
    """
    cores = cores or os.cpu_count() or 1
    spec = measured.get("spec", {})
    width = float(spec.get("width", 0.25))
    net = vgg_net(VGG_D, image=int(spec.get("image_size", 64)), fc=round(4096 * width),
                  classes=100, width=width)  # fmt: skip
    rows = measured["rows"]
    compute = {r["sync"]: r["compute_s"] for r in rows if r["procs"] == 1}
    base = next(r for r in rows if (r["procs"], r["sync"]) == fit_on)
    share = max(1.0, fit_on[0] / cores)
    base_exposed = base["step_s"] - share * compute[base["sync"]]
    base_exposed -= 2 * (fit_on[0] - 1) * LOCAL_LATENCY_S
    bw = base["bytes"] / max(base_exposed, 1e-9)
    out = []
    for r in rows:
        n, sync = r["procs"], r["sync"]
        if n == 1 or (n, sync) == fit_on:
            continue
        c = max(1.0, n / cores) * compute.get(sync, r["compute_s"])
        comm = r["bytes"] / bw + 2 * (n - 1) * LOCAL_LATENCY_S
        predicted = c + max(0.0, comm - overlap(net, sync) * c)
        out.append({"procs": n, "sync": sync, "measured_step_s": r["step_s"],
                    "predicted_step_s": predicted,
                    "error": (predicted - r["step_s"]) / r["step_s"]})  # fmt: skip
    mae = statistics.fmean(abs(r["error"]) for r in out) if out else 0.0
    return {"cores": cores, "bandwidth_bytes_s": bw, "fit_on": list(fit_on),
            "latency_s": LOCAL_LATENCY_S, "rows": out, "mean_abs_error": mae}  # fmt: skip


def _cell(r: dict[str, Any]) -> str:
    mark = "*" if r["fitted"] else " "
    return f"{r['model']:.1f}x {100 * r['error']:+.0f}%{mark}"


def print_simulation(result: dict[str, Any]) -> None:
    """Print the traffic per algorithm, the held-out errors, and the prediction table."""
    net, m = result["net"], result["machine"]
    ov = result["overlap"]
    print(f"# scaling model: {net['name']}, {net['param_bytes'] / 1e6:.0f} MB of parameters "
          f"({net['conv_param_bytes'] / 1e6:.0f} MB conv), "
          f"{net['flops'] / 1e9:.1f} GFLOP per training image")  # fmt: skip
    print(f"Minwa: {m['peak_flops'] / 1e12:.2f} TFLOPS/GPU, FDR {m['link_bytes_s'] / 1e9:.1f} GB/s "
          f"per node of {m['gpus_per_node']}, PCIe {m['intra_bytes_s'] / 1e9:.0f} GB/s, "
          f"latency {m['latency_s'] * 1e6:.0f} us")  # fmt: skip
    print(f"overlap (from layer order): butterfly {ov['butterfly']:.2f}, ddp {ov['ddp']:.2f}, "
          f"lazy {ov['lazy']:.3f}")  # fmt: skip
    link = result["node_link_bytes_64"]
    print("node link per all-reduce of the gradient at 64 GPUs: " + ", ".join(
        f"{a} {v / 1e9:.2f} GB ({link['butterfly'] / v:.2f}x less than butterfly)"
        if a in ("ring", "hierarchical") else f"{a} {v / 1e9:.2f} GB"
        for a, v in link.items()))  # fmt: skip
    lo, hi = UTILISATION_PLAUSIBLE
    print(f"\nfit: utilisation of K40m peak (plausible {lo:.2f}-{hi:.2f}); '*' = fitted point")
    print(f"{'algorithm':>12} {'exchange':>9} {'fit on':>6} {'util':>5} "
          + " ".join(f"{k + ' (paper ' + format(p.speedup, '.1f') + 'x)':>22}"
                     for k, p in PAPER_SPEEDUPS.items())
          + f" {'DP beats hybrid from':>20}")  # fmt: skip
    for h in result["held_out"]:
        timing = "exposed" if h["strategy"] == "butterfly" else h["strategy"]
        cells = " ".join(f"{_cell(r):>22}" for r in h["speedups"])
        c = h["crossover"]
        print(
            f"{h['algorithm']:>12} {timing:>9} {','.join(h['fit_on']):>6} "
            f"{h['utilisation']:5.3f} {cells} {str(c['model']) + ' (paper 17-32)':>20}"
        )
    print()
    header = ("gpus", "lazy bfly", "lazy ring", "dp bfly s", "hyb bfly s", "dp ring s",
              "hyb ring s", "H100 ring", "H100 hier")  # fmt: skip
    print(" ".join(f"{h:>11}" for h in header))
    for r in result["rows"]:
        vals = [r["gpus"], r["minwa_lazy_butterfly_b1024"], r["minwa_lazy_ring_b1024"],
                r["minwa_dp_butterfly_b64pg"], r["minwa_hybrid_butterfly_b64pg"],
                r["minwa_dp_ring_b64pg"], r["minwa_hybrid_ring_b64pg"],
                r["h100_ddp_ring_b1024"], r["h100_ddp_hierarchical_b1024"]]  # fmt: skip
        print(" ".join(f"{v:>11}" if isinstance(v, int) else f"{v:>11.3f}" for v in vals))
    print(
        "(speedups at global batch 1024 with the fit of lazy update over butterfly; step "
        "times in seconds at 64 images per GPU, data parallelism with its exchange exposed)"
    )
    if "local" in result:
        loc = result["local"]
        n_fit, s_fit = loc["fit_on"]
        print()
        print(f"local validation: {loc['cores']} cores, compute x max(1, N/cores), gloo "
              f"{loc['bandwidth_bytes_s'] / 1e6:.0f} MB/s fitted on {s_fit} N={n_fit}, "
              f"latency {loc['latency_s'] * 1e6:.0f} us")  # fmt: skip
        for r in loc["rows"]:
            print(f"  N={r['procs']} {r['sync']:>9}: measured {r['measured_step_s'] * 1e3:8.1f} ms"
                  f"  predicted {r['predicted_step_s'] * 1e3:8.1f} ms"
                  f"  error {100 * r['error']:+.0f}%")  # fmt: skip
        print(f"  mean absolute error {100 * loc['mean_abs_error']:.0f}%")
