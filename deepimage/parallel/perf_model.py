"""The analytic scaling model (``deepimage bench simulate``): step time and speedup vs N, no torch.

The model predicts a step as compute ``b * F / (peak * u)`` plus the exposed part of the
gradient exchange ``2 (N-1)/N * P / bw + 2 (N-1) * latency``. Each strategy hides the exchange
behind a fraction of the compute that follows from when gradients are ready and when weights
are needed (:func:`overlap`): butterfly none, DDP's buckets the backward pass (2/3), lazy a
byte-weighted window of backward-below plus forward-below each layer. Beyond one node the node
link carries the off-node share of all its GPUs' traffic. Hybrid (model-data) parallelism
exchanges only the convolution gradients but all-gathers the fully-connected activations of the
global batch, forward and backward, without overlap (paper 3.2-3.3).

Calibration on Minwa uses physical constants (see :data:`MINWA`) and fits one parameter, the
achieved fraction of K40m peak ``u``, to the paper's 47x at 64 GPUs (batch 1024); the
data-parallel/hybrid crossover (paper: above 16 GPUs) is then a prediction, not a fit.
"""

from __future__ import annotations

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


def comm_seconds(net_bytes: float, m: Machine, n: int) -> float:
    """Seconds of a ring/butterfly all-reduce of ``net_bytes`` per device over n devices.

    Within a node each device sends ``2 (N-1)/N`` of the bytes over the intra-node fabric;
    beyond it, the node link carries the off-node share ``(N-g)/N`` of its g devices' traffic.
    """
    if n == 1:
        return 0.0
    lat = 2 * (n - 1) * m.latency_s
    if n <= m.gpus_per_node:
        return 2 * (n - 1) / n * net_bytes / m.intra_bytes_s + lat
    g = m.gpus_per_node
    off_node = g * 2 * net_bytes * (n - g) / n
    on_node = 2 * (n - 1) / n * net_bytes
    return max(off_node / (m.link_bytes_s * m.links_per_node), on_node / m.intra_bytes_s) + lat


def compute_seconds(net: Net, m: Machine, fit: Fit, n: int, batch_per_device: int) -> float:
    """Compute per step; slowed by ``N * threads / cores`` when processes share CPU cores."""
    share = max(1.0, n * m.threads_per_proc / m.cores) if m.cores else 1.0
    return share * batch_per_device * net.flops / (m.peak_flops * fit.utilisation)


def step_time(
    net: Net, m: Machine, fit: Fit, n: int, batch_per_device: int, strategy: str
) -> dict[str, float]:
    """Seconds per step of one device: compute, exchange and what of it is exposed."""
    compute = compute_seconds(net, m, fit, n, batch_per_device)
    if n == 1:
        return {"compute": compute, "comm": 0.0, "exposed": 0.0, "step": compute}
    if strategy == "hybrid":
        g = min(n, m.gpus_per_node)
        acts = n / (n - 1) * hybrid_activation_bytes(net.fc_layers, batch_per_device, n)
        if n <= m.gpus_per_node:
            act_s = (n - 1) / n * acts / m.intra_bytes_s
        else:
            act_s = g * (n - g) / n * acts / (m.link_bytes_s * m.links_per_node)
        act_s += hybrid_collectives(net.fc_layers) * (n - 1) * m.latency_s
        comm = act_s + comm_seconds(net.conv_param_bytes, m, n)
        return {"compute": compute, "comm": comm, "exposed": comm, "step": compute + comm}
    comm = comm_seconds(net.param_bytes, m, n)
    exposed = max(0.0, comm - overlap(net, strategy) * compute)
    return {"compute": compute, "comm": comm, "exposed": exposed, "step": compute + exposed}


def speedup(net: Net, m: Machine, fit: Fit, n: int, global_batch: int, strategy: str) -> float:
    """Images per second on n devices over one device (same per-device batch)."""
    b = max(1, global_batch // n)
    one = step_time(net, m, fit, 1, b, strategy)["step"]
    return n * one / step_time(net, m, fit, n, b, strategy)["step"]


def crossover(
    net: Net, m: Machine, fit: Fit, strategy: str = "lazy", per_device: int = 64
) -> int | None:
    """Smallest device count (multiple of a node beyond one node) where data parallelism with
    ``strategy`` is faster than hybrid at ``per_device`` images per device."""
    counts = [2, 3, 4] + list(range(8, 257, 4))
    for n in counts:
        dp = step_time(net, m, fit, n, per_device, strategy)["step"]
        hy = step_time(net, m, fit, n, per_device, "hybrid")["step"]
        if dp < hy:
            return n
    return None


def hybrid_crossover_exposure(
    net: Net, m: Machine, fit: Fit, lo: int = 16, hi: int = 32, per_device: int = 64
) -> tuple[float, float]:
    """The band of exposed fractions ``e`` of data parallelism's gradient exchange for which
    hybrid is faster at ``lo`` devices and data parallelism faster at ``hi`` (Figure 2a).

    Hybrid's exchange (FC activations of the global batch plus conv gradients) grows with N and
    is on the critical path; data parallelism's is about constant beyond a node, of which a
    fraction ``e`` is exposed. Crossover in ``(lo, hi]`` needs
    ``hybrid(lo) / dp(lo) < e <= hybrid(hi) / dp(hi)``, comparing exchange seconds.
    """

    def ratio(n: int) -> float:
        hybrid = step_time(net, m, fit, n, per_device, "hybrid")["comm"]
        return hybrid / comm_seconds(net.param_bytes, m, n)

    return ratio(lo), ratio(hi)


def _exposed_share(net: Net, fit: Fit, n: int, strategy: str, per_device: int = 64) -> float:
    t = step_time(net, MINWA, fit, n, per_device, strategy)
    return t["exposed"] / t["comm"] if t["comm"] else 0.0


def crossover_at_exposure(
    net: Net, m: Machine, fit: Fit, exposed: float, per_device: int = 64
) -> int | None:
    """Smallest device count where data parallelism exposing ``exposed`` of its exchange beats
    hybrid (the device counts of :func:`crossover`)."""
    counts = [2, 3, 4] + list(range(8, 257, 4))
    for n in counts:
        dp = exposed * comm_seconds(net.param_bytes, m, n)
        if dp < step_time(net, m, fit, n, per_device, "hybrid")["comm"]:
            return n
    return None


def calibrate(net: Net, m: Machine, target: float = 47.0, gpus: int = 64, batch: int = 1024) -> Fit:
    """Fit utilisation (the one free parameter) so lazy update gives ``target``x at ``gpus``.

    Speedup falls as utilisation rises (faster compute exposes more exchange); bisection.
    """
    lo, hi = 0.01, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if speedup(net, m, Fit(mid), gpus, batch, "lazy") > target:
            lo = mid
        else:
            hi = mid
    return Fit((lo + hi) / 2)


def simulate(measured: dict[str, Any] | None = None) -> dict[str, Any]:
    """Calibrate on the paper, predict an H100 cluster, and check local measurements."""
    net = vgg_net(VGG_A)
    fit = calibrate(net, MINWA)
    rows = []
    for n in (1, 2, 4, 8, 16, 32, 64):
        rows.append(
            {
                "gpus": n,
                "minwa_lazy_b1024": speedup(net, MINWA, fit, n, 1024, "lazy"),
                "minwa_butterfly_b1024": speedup(net, MINWA, fit, n, 1024, "butterfly"),
                "minwa_lazy_b64pg": step_time(net, MINWA, fit, n, 64, "lazy")["step"],
                "minwa_butterfly_b64pg": step_time(net, MINWA, fit, n, 64, "butterfly")["step"],
                "minwa_hybrid_b64pg": step_time(net, MINWA, fit, n, 64, "hybrid")["step"],
                "h100_lazy_b1024": speedup(net, H100, fit, n, 1024, "lazy"),
                "h100_butterfly_b1024": speedup(net, H100, fit, n, 1024, "butterfly"),
                "h100_lazy_b64pg": speedup(net, H100, fit, n, 64 * n, "lazy"),
            }
        )
    model_47 = speedup(net, MINWA, fit, 64, 1024, "lazy")
    result: dict[str, Any] = {
        "net": {k: v for k, v in asdict(net).items() if k != "layers"},
        "machine": asdict(MINWA),
        "fit": asdict(fit),
        "overlap": {s: overlap(net, s) for s in ("butterfly", "ddp", "lazy")},
        "paper": {
            "speedup_64_gpus_batch_1024": {
                "paper": 47.0,
                "model": model_47,
                "error": model_47 / 47.0 - 1,
            },
            "dp_beats_hybrid_from": {
                "paper": ">16",
                "model_lazy": crossover(net, MINWA, fit, "lazy"),
                "model_butterfly": crossover(net, MINWA, fit, "butterfly"),
                "exposed_band_16_32": list(hybrid_crossover_exposure(net, MINWA, fit)),
                "exposed_lazy_16": _exposed_share(net, fit, 16, "lazy"),
            },
        },
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


def print_simulation(result: dict[str, Any]) -> None:
    """Print the calibration, the paper points with their error, and the prediction table."""
    net, fit, paper, m = result["net"], result["fit"], result["paper"], result["machine"]
    ov = result["overlap"]
    print(f"# scaling model: {net['name']}, {net['param_bytes'] / 1e6:.0f} MB of parameters "
          f"({net['conv_param_bytes'] / 1e6:.0f} MB conv), "
          f"{net['flops'] / 1e9:.1f} GFLOP per training image")  # fmt: skip
    print(f"Minwa: {m['peak_flops'] / 1e12:.2f} TFLOPS/GPU, FDR {m['link_bytes_s'] / 1e9:.1f} GB/s "
          f"per node of {m['gpus_per_node']}, PCIe {m['intra_bytes_s'] / 1e9:.0f} GB/s, "
          f"latency {m['latency_s'] * 1e6:.0f} us")  # fmt: skip
    print(f"overlap (from layer order): butterfly {ov['butterfly']:.2f}, ddp {ov['ddp']:.2f}, "
          f"lazy {ov['lazy']:.3f}")  # fmt: skip
    lo, hi = UTILISATION_PLAUSIBLE
    print(f"fitted (one parameter): utilisation {fit['utilisation']:.3f} of peak "
          f"(plausible for K40m cuDNN-era VGG: {lo:.2f}-{hi:.2f})")  # fmt: skip
    s = paper["speedup_64_gpus_batch_1024"]
    c = paper["dp_beats_hybrid_from"]
    print(f"64 GPUs, batch 1024: paper {s['paper']:.0f}x, model {s['model']:.1f}x "
          f"(error {100 * s['error']:+.1f}%, the fitted point)")  # fmt: skip
    print(f"data parallel beats hybrid (64/GPU) from: paper >16 GPUs, model {c['model_lazy']} "
          f"GPUs with lazy overlap, {c['model_butterfly']} GPUs without (butterfly)")  # fmt: skip
    e_lo, e_hi = c["exposed_band_16_32"]
    print(f"hybrid wins up to 16 GPUs and loses from 32 when data parallelism exposes "
          f"{100 * e_lo:.0f}-{100 * e_hi:.0f}% of its exchange (model at 16 GPUs: lazy "
          f"{100 * c['exposed_lazy_16']:.0f}%, butterfly 100%)")  # fmt: skip
    print()
    header = ("gpus", "Minwa lazy", "Minwa bfly", "lazy s/step", "bfly s/step", "hybrid s/step",
              "H100 lazy", "H100 bfly", "H100 64/GPU")  # fmt: skip
    print(" ".join(f"{h:>13}" for h in header))
    for r in result["rows"]:
        vals = [r["gpus"], r["minwa_lazy_b1024"], r["minwa_butterfly_b1024"],
                r["minwa_lazy_b64pg"], r["minwa_butterfly_b64pg"], r["minwa_hybrid_b64pg"],
                r["h100_lazy_b1024"], r["h100_butterfly_b1024"], r["h100_lazy_b64pg"]]  # fmt: skip
        print(" ".join(f"{v:>13}" if isinstance(v, int) else f"{v:>13.3f}" for v in vals))
    print("(speedups at global batch 1024 unless '64/GPU'; step times in seconds at 64/GPU)")
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
