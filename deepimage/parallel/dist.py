"""torch.distributed set-up and helpers that are no-ops in a single process.

``init_distributed`` reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT``) and opens a process group: NCCL when the device is CUDA, gloo
otherwise. Without those variables everything here behaves as one process of rank 0, so the
same training code runs under ``python -m deepimage`` and under ``torchrun``.

Every blocking collective goes through :func:`guard`, which turns a timeout or a dead peer
into :class:`CollectiveError` naming the rank and the operation; the timeout itself is the
process group's (``--dist-timeout``), so a hang ends instead of lasting forever.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 600.0


class CollectiveError(RuntimeError):
    """A collective that timed out or lost a peer; the message names the rank and operation."""


_timeout_s = DEFAULT_TIMEOUT_S


def is_distributed() -> bool:
    """True inside an initialised process group (even a group of one)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def restart_count() -> int:
    """How many times torchrun has restarted this job (0 for the first attempt)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def timeout_s() -> float:
    return _timeout_s


def init_distributed(
    device: torch.device, timeout: float = DEFAULT_TIMEOUT_S, backend: str | None = None
) -> torch.device:
    """Join torchrun's process group if launched by it; return the device this rank uses.

    On CUDA each rank takes GPU ``LOCAL_RANK``; on the CPU the device is unchanged.
    """
    global _timeout_s
    _timeout_s = float(timeout)
    if not launched_by_torchrun() or is_distributed():
        return device
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    dist.init_process_group(
        backend=backend,
        store=_attempt_store(),
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        timeout=datetime.timedelta(seconds=_timeout_s),
        device_id=device if device.type == "cuda" else None,
    )
    logger.info(
        "distributed: %d processes, backend %s, collective timeout %gs",
        world_size(),
        backend,
        _timeout_s,
    )
    return device


def _attempt_store() -> dist.Store:
    """torchrun's key-value store, with keys private to this attempt of the job.

    After a restart (``--max-restarts``) the agent may keep its store; without a prefix the new
    workers would read the dead workers' addresses and fail to connect.
    """
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        int(os.environ["WORLD_SIZE"]),
        is_master=not agent and int(os.environ["RANK"]) == 0,
        timeout=datetime.timedelta(seconds=_timeout_s),
    )
    return dist.PrefixStore(f"deepimage/attempt_{restart_count()}", store)


def destroy() -> None:
    if is_distributed():
        dist.destroy_process_group()


@contextlib.contextmanager
def guard(op: str) -> Iterator[None]:
    """Re-raise a failed or timed-out collective as :class:`CollectiveError` naming rank and op."""
    start = time.monotonic()
    try:
        yield
    except CollectiveError:
        raise
    except RuntimeError as err:  # DistBackendError and gloo's timeouts are RuntimeErrors
        if not is_distributed():
            raise
        waited = time.monotonic() - start
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CollectiveError(
            f"rank {rank()} of {world_size()}: collective '{op}' failed after {waited:.1f}s "
            f"(timeout {_timeout_s:g}s; a peer may have died or stopped): {first}"
        ) from err


def wait(work: dist.Work | None, op: str) -> None:
    """Wait for an async collective, with :func:`guard`'s error on timeout or a lost peer."""
    if work is None:
        return
    with guard(op):
        work.wait()


def barrier(op: str = "barrier") -> None:
    if world_size() > 1:
        with guard(op):
            dist.barrier()


def all_reduce_(tensors: Sequence[torch.Tensor], op: str = "all_reduce") -> None:
    """Sum ``tensors`` in place across ranks (one flattened collective per dtype)."""
    if world_size() <= 1 or not tensors:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    device = comm_device()
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group]).to(device)
        with guard(op):
            dist.all_reduce(flat)
        flat = flat.cpu() if group[0].device.type == "cpu" else flat
        offset = 0
        for t in group:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def all_reduce_meter(meter) -> None:
    """Sum a :class:`~deepimage.metrics.ClassificationMeter`'s count tensors over all ranks."""
    tensors = [t.clone() for t in meter.state_tensors()]
    all_reduce_(tensors, op="all_reduce(metrics)")
    meter.load_state_tensors(tensors)


def all_reduce_scalars(values: Sequence[float], op: str = "all_reduce(scalars)") -> list[float]:
    """Sum a few Python numbers across ranks, in float64."""
    t = torch.tensor(list(values), dtype=torch.float64)
    all_reduce_([t], op=op)
    return t.tolist()


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any rank (e.g. a stop request)."""
    if world_size() <= 1:
        return flag
    return all_reduce_scalars([float(flag)], op="all_reduce(stop flag)")[0] > 0


def broadcast_(tensors: Sequence[torch.Tensor], src: int = 0, op: str = "broadcast") -> None:
    """Copy ``tensors`` from rank ``src`` to every rank, in place."""
    if world_size() <= 1:
        return
    with guard(op):
        for t in tensors:
            dist.broadcast(t.data, src)


def broadcast_object(obj: Any, src: int = 0, op: str = "broadcast(object)") -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank (small values such as a decision)."""
    if world_size() <= 1:
        return obj
    box = [obj]
    with guard(op):
        dist.broadcast_object_list(box, src)
    return box[0]


def comm_device() -> torch.device:
    """Where collective buffers must live: the GPU for NCCL, the CPU for gloo."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
