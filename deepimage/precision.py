"""Precision and memory layout chosen by what the hardware does well (``precision: auto``).

bf16 autocast is several times *slower* than fp32 on a CPU that lacks native bf16 (no
AVX-512 BF16, no AMX, no ARM BF16): PyTorch then emulates it. So the automatic choice is:

- CUDA: bf16 where the device supports it natively, else fp16 with a gradient scaler.
- CPU with native bf16: a short probe times a step of *this* model at *this* input size in
  fp32 and in bf16 (channels_last); bf16 only if it is measurably faster. The result is
  cached per (machine, torch version, model, input size, mode) so the probe runs once.
- CPU without native bf16, and any other device: fp32.

``channels_last: auto`` follows the precision: NHWC for bf16/fp16 (what oneDNN and cuDNN's
reduced-precision kernels want) and on CUDA; the default NCHW for fp32 on the CPU.

Every choice comes with a one-line reason, printed once at start and recorded in the run.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from deepimage.files import atomic_write_text

logger = logging.getLogger(__name__)

PrecisionName = Literal["bf16", "fp16", "fp32"]
AUTO = "auto"
PRECISIONS: tuple[str, ...] = ("bf16", "fp16", "fp32")
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 /proc/cpuinfo "flags"
ARM_BF16_FLAGS = ("bf16",)  # aarch64 /proc/cpuinfo "Features"
REPORTED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "bf16")
PROBE_MARGIN = 0.95  # bf16 must take at most this fraction of fp32's step time
Probe = Callable[[], dict[str, float]]


@dataclass(frozen=True)
class ExecutionChoice:
    """The precision and memory layout a run uses, and why."""

    precision: PrecisionName
    channels_last: bool
    reason: str

    def describe(self) -> str:
        layout = "channels_last" if self.channels_last else "contiguous"
        return f"precision {self.precision} ({layout}): {self.reason}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class CpuInfo:
    """The CPU's model name and feature flags (empty where they cannot be read)."""

    model: str
    flags: frozenset[str]

    @property
    def native_bf16(self) -> bool:
        return has_native_bf16(self.flags)

    def reported_flags(self) -> list[str]:
        """The flags that decide precision speed, those present in order."""
        return [f for f in REPORTED_FLAGS if f in self.flags]


def cpu_info(path: str | Path = "/proc/cpuinfo") -> CpuInfo:
    """Read the CPU model and flags from ``/proc/cpuinfo`` (Linux, x86 and ARM)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path(path).read_text()
    except OSError:
        return CpuInfo(model, frozenset())
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model") and model in ("", platform.machine()):
            model = value.strip()
        elif key in ("flags", "features"):
            flags.update(value.split())
    return CpuInfo(model, frozenset(flags))


def has_native_bf16(flags: frozenset[str] | set[str]) -> bool:
    """True where bf16 matrix arithmetic runs in hardware (x86 AVX-512 BF16/AMX, ARM BF16)."""
    return any(f in flags for f in (*NATIVE_BF16_FLAGS, *ARM_BF16_FLAGS))


def machine_summary(info: CpuInfo | None = None) -> str:
    """One line for benchmark headers: CPU model, the flags that matter, threads, torch."""
    info = info or cpu_info()
    flags = " ".join(info.reported_flags()) or "none of avx2/avx512f/avx512_bf16/amx"
    native = "native bf16" if info.native_bf16 else "no native bf16"
    return (
        f"{info.model} | flags: {flags} ({native}) | {torch.get_num_threads()} threads | "
        f"torch {torch.__version__}"
    )


def default_channels_last(precision: str, device: torch.device) -> bool:
    """NHWC for reduced precision and on CUDA; NCHW for fp32 on the CPU."""
    return device.type == "cuda" or precision != "fp32"


def choose(
    precision: str,
    channels_last: bool | str,
    device: torch.device,
    *,
    cpu: CpuInfo | None = None,
    probe: Probe | None = None,
    cuda_bf16: bool | None = None,
    fp16_ok: bool = True,
) -> ExecutionChoice:
    """Resolve ``auto`` for ``precision`` and ``channels_last`` on ``device``.

    ``fp16_ok`` says whether the caller can apply a gradient scaler (training with a torch
    optimizer) or needs none (inference). ``probe`` returns the step time in seconds as
    ``{"fp32": ..., "bf16": ...}``; it is called only on a CPU with native bf16. ``cpu`` and
    ``cuda_bf16`` default to this machine's.
    """
    if precision != AUTO:
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; known: auto, {PRECISIONS}")
        chosen, reason = precision, "as requested"
    elif device.type == "cuda":
        if cuda_bf16 is None:
            cuda_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        if cuda_bf16:
            chosen, reason = "bf16", "this GPU computes in bf16 natively"
        elif not fp16_ok:
            chosen, reason = "fp32", "this GPU has no native bf16; fp16 needs sync ddp"
        else:
            chosen, reason = "fp16", "this GPU has no native bf16: fp16 with a gradient scaler"
    elif device.type == "cpu":
        cpu = cpu or cpu_info()
        if not cpu.native_bf16:
            chosen, reason = "fp32", "this CPU has no native bf16"
        elif probe is None:
            chosen, reason = "bf16", "this CPU has native bf16 (not probed)"
        else:
            times = probe()
            ratio = times["bf16"] / times["fp32"]
            if ratio <= PROBE_MARGIN:
                chosen = "bf16"
                reason = f"native bf16, a step measured {1 / ratio:.2f}x faster than fp32"
            else:
                chosen = "fp32"
                reason = f"native bf16, but a step measured {ratio:.2f}x the time of fp32"
    else:
        chosen, reason = "fp32", f"no automatic reduced precision on {device.type}"
    if channels_last == AUTO:
        layout = default_channels_last(chosen, device)
    elif isinstance(channels_last, bool):
        layout = channels_last
    else:
        raise ValueError(f"channels_last must be true, false or auto, got {channels_last!r}")
    return ExecutionChoice(chosen, layout, reason)  # type: ignore[arg-type]


# --- autocast --------------------------------------------------------------------------


def autocast_dtype(precision: str) -> torch.dtype | None:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast to bf16 or fp16 on ``device``, or nothing for fp32."""
    dtype = autocast_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def needs_grad_scaler(precision: str) -> bool:
    """fp16 gradients underflow without loss scaling; bf16 and fp32 do not need it."""
    return precision == "fp16"


# --- the probe -------------------------------------------------------------------------


def _time_step(
    model: torch.nn.Module,
    x: torch.Tensor,
    labels: torch.Tensor,
    precision: str,
    train: bool,
) -> float:
    """Seconds of one forward (and backward, when ``train``) pass of ``model`` on ``x``."""
    device = x.device
    start = time.perf_counter()
    if train:
        with autocast(device, precision):
            logits = model(x)
        F.cross_entropy(logits.float(), labels).backward()
        model.zero_grad(set_to_none=True)
    else:
        with torch.inference_mode(), autocast(device, precision):
            model(x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def probe_batch_size(input_size: int) -> int:
    """About as many pixels as 8 images of 224 x 224 (2 to 64 images): enough work per
    step that small inputs are timed at a realistic batch, little enough to stay short."""
    return max(2, min(64, 8 * 224**2 // input_size**2))


def measure_step_times(
    model: torch.nn.Module,
    input_size: int,
    *,
    train: bool = True,
    batch_size: int | None = None,
    repeats: int = 3,
    budget_s: float = 8.0,
) -> dict[str, float]:
    """Fastest of ``repeats`` steps of a copy of ``model`` in fp32 (NCHW) and bf16 (NHWC).

    The two sides alternate (fp32, bf16, fp32, ...) after two warm-up steps each, and each
    side's fastest step counts: other work on a shared machine only ever adds time, and
    alternating spreads a slow spell over both sides instead of one. The model and the
    global RNG are left untouched (deep copies run on inputs from a private generator). The
    bf16 side stops after its first warm-up when that alone exceeds ``budget_s``: emulated
    bf16 can be many times slower and needs no precise figure.
    """
    device = next(model.parameters()).device
    batch_size = batch_size or probe_batch_size(input_size)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, 3, input_size, input_size, generator=gen).to(device)
    with torch.random.fork_rng(devices=[]):
        nchw = copy.deepcopy(model).eval()
        with torch.no_grad():
            num_classes = nchw(x[:1]).shape[1]
        nchw.train(train)
        nhwc = copy.deepcopy(nchw).to(memory_format=torch.channels_last)
        xc = x.contiguous(memory_format=torch.channels_last)
        labels = torch.randint(0, num_classes, (batch_size,), generator=gen).to(device)
        sides = {"fp32": (nchw, x), "bf16": (nhwc, xc)}
        if _time_step(nhwc, xc, labels, "bf16", train) >= budget_s:  # first warm-up
            return {"fp32": _time_step(nchw, x, labels, "fp32", train), "bf16": budget_s}
        for name, (net, inputs) in sides.items():  # oneDNN picks and caches its kernels
            for _ in range(1 if name == "bf16" else 2):
                _time_step(net, inputs, labels, name, train)
        times: dict[str, list[float]] = {"fp32": [], "bf16": []}
        for _ in range(max(1, repeats)):
            for name, (net, inputs) in sides.items():
                times[name].append(_time_step(net, inputs, labels, name, train))
    return {name: min(values) for name, values in times.items()}


# bumped when the way the probe measures changes, so that older figures are measured again
PROBE_METHOD = "alternating-min"


ISA_LIMITS = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")
"""Environment variables that cap the instruction sets oneDNN and ATen use: with them set, a
CPU with native bf16 runs it emulated, so a probe measured without them does not apply."""


class ProbeCache:
    """Probe results in a JSON file, keyed by machine, torch version, model and input size."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @staticmethod
    def key(model: str, input_size: int, train: bool, cpu: CpuInfo | None = None) -> str:
        cpu = cpu or cpu_info()
        isa = "|".join(os.environ.get(v, "") for v in ISA_LIMITS)  # what the kernels may use
        machine = f"{cpu.model}|{' '.join(sorted(cpu.flags))}|{torch.get_num_threads()}|{isa}"
        digest = hashlib.sha1(machine.encode()).hexdigest()[:12]
        mode = "train" if train else "infer"
        return f"{digest}|torch {torch.__version__}|{model}|{input_size}|{mode}|{PROBE_METHOD}"

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, key: str) -> dict[str, float] | None:
        entry = self._read().get(key)
        if isinstance(entry, dict) and {"fp32", "bf16"} <= entry.keys():
            return {"fp32": float(entry["fp32"]), "bf16": float(entry["bf16"])}
        return None

    def put(self, key: str, times: dict[str, float]) -> None:
        data = self._read()
        data[key] = times
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, json.dumps(data, indent=1, sort_keys=True))
        except OSError as err:  # a read-only cache only costs a probe next time
            logger.debug("could not cache the precision probe in %s: %s", self.path, err)


def cached_probe(
    model: torch.nn.Module,
    model_name: str,
    input_size: int,
    cache_dir: str | Path,
    *,
    train: bool = True,
) -> Probe:
    """A probe for :func:`choose` that reads and fills the cache under ``cache_dir``."""

    def run() -> dict[str, float]:
        cache = ProbeCache(Path(cache_dir) / "precision-probe.json")
        key = ProbeCache.key(model_name, input_size, train)
        times = cache.get(key)
        if times is None:
            start = time.perf_counter()
            times = measure_step_times(model, input_size, train=train)
            logger.debug(
                "precision probe %s: %s in %.1f s", key, times, time.perf_counter() - start
            )
            cache.put(key, times)
        return times

    return run


def resolve(
    precision: str,
    channels_last: bool | str,
    device: torch.device,
    model: torch.nn.Module,
    model_name: str,
    input_size: int,
    cache_dir: str | Path,
    *,
    train: bool = True,
    fp16_ok: bool = True,
) -> ExecutionChoice:
    """:func:`choose` on this machine, probing ``model`` where the choice needs it."""
    probe = None
    if precision == AUTO:
        probe = cached_probe(model, model_name, input_size, cache_dir, train=train)
    return choose(precision, channels_last, device, probe=probe, fp16_ok=fp16_ok)
