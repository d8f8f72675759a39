"""The one report writer of the benchmarks: machine, versions, medians and spread over repeats,
and the JSON table a harness leaves behind."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import torch

    threads = torch.get_num_threads()
    return f"{cpu}, {os.cpu_count()} cores, torch threads {threads}, {platform.platform()}"


def versions() -> str:
    import numpy
    import PIL
    import torch
    import torchvision

    import deepimage

    return (
        f"python {sys.version.split()[0]}, torch {torch.__version__}, "
        f"torchvision {torchvision.__version__}, numpy {numpy.__version__}, "
        f"pillow {PIL.__version__}, deepimage {deepimage.__version__}"
    )


def spread(values: list[float]) -> str:
    """Median and range of repeated measurements, e.g. '123.4 (min 120.1, max 130.2, n=5)'."""
    return (
        f"{statistics.median(values):.1f} "
        f"(min {min(values):.1f}, max {max(values):.1f}, n={len(values)})"
    )


def ratio(rates: dict[str, list[float]], a: str, b: str) -> tuple[float, str]:
    """The ratio of two paths' median rates, and as text with its spread over the repeats
    (each repeat's paths ran together): '2.31x (per repeat 2.10-2.52x)'."""
    median = statistics.median(rates[a]) / statistics.median(rates[b])
    per = [x / y for x, y in zip(rates[a], rates[b], strict=True)]
    return median, f"{median:.2f}x (per repeat {min(per):.2f}-{max(per):.2f}x)"


def cpu_line() -> str:
    """CPU model and the flags that decide which precision is fast (avx2, avx512f,
    avx512_bf16, amx), and whether bf16 is native here."""
    from deepimage.precision import machine_summary

    return machine_summary()


def header(title: str) -> None:
    print(f"# {title}")
    print(f"machine : {machine()}")
    print(f"cpu     : {cpu_line()}")
    print(f"versions: {versions()}")


def write_json(result: dict[str, Any], path: str | Path) -> Path:
    """Write a harness's result table as indented JSON; return the path."""
    path = Path(path)
    path.write_text(json.dumps(result, indent=2))
    return path
