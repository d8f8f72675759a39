"""torch.distributed set-up and helpers that are no-ops in a single process.

``init_distributed`` reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT``) and opens a process group: NCCL when the device is CUDA, gloo
otherwise. Without those variables everything here behaves as one process of rank 0, so the
same training code runs under ``python -m deepimage`` and under ``torchrun``.

Every blocking collective goes through :func:`guard`, which turns a timeout or a dead peer
into :class:`CollectiveError` naming the rank and the operation; the timeout itself is the
process group's (``--dist-timeout``), so a hang ends instead of lasting forever. On NCCL,
whose collectives complete on the GPU, the same timeout arms the communicator's watchdog:
:func:`nccl_environment` makes it tear the process down with the rank and the operation in
its message, and torchrun then ends (or restarts) the job.

Under torchrun the ranks first agree, through the job's store, on which attempt of the job
this is and whether it resumes (:mod:`deepimage.parallel.attempt`); no per-node counter is
trusted for either.
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

from deepimage.config import ConfigError
from deepimage.parallel.attempt import Attempt, agree, mark_opened

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 600.0


class CollectiveError(RuntimeError):
    """A collective that timed out or lost a peer; the message names the rank and operation."""


_timeout_s = DEFAULT_TIMEOUT_S
_store: dist.Store | None = None  # the job's store, shared by every attempt
_attempt: Attempt | None = None


def is_distributed() -> bool:
    """True inside an initialised process group (even a group of one)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def restart_count() -> int:
    """How many times this node's torchrun agent counted a restart (differs between nodes)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def attempt() -> Attempt | None:
    """The attempt of the torchrun job every rank agreed on; None outside torchrun."""
    return _attempt


def job_restarted_after_open() -> bool:
    """True on every rank when an earlier attempt of this torchrun job opened the run folder:
    the job was restarted and must resume. The same answer on every rank and node."""
    return _attempt is not None and _attempt.resume


def mark_run_opened() -> None:
    """Rank 0, once the run folder is open: a later attempt of this job resumes it."""
    if _store is not None and rank() == 0:
        mark_opened(_store)


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def timeout_s() -> float:
    return _timeout_s


def init_distributed(
    device: torch.device, timeout: float = DEFAULT_TIMEOUT_S, backend: str | None = None
) -> torch.device:
    """Join torchrun's process group if launched by it; return the device this rank uses.

    On CUDA each rank takes GPU ``LOCAL_RANK`` (``--device cuda``); on the CPU the device is
    unchanged.
    """
    global _timeout_s
    _timeout_s = float(timeout)
    if not launched_by_torchrun() or is_distributed():
        return device
    device = rank_device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl":
        for key, value in nccl_environment().items():
            os.environ.setdefault(key, value)
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


def rank_device(device: torch.device) -> torch.device:
    """The device of this rank: ``cuda`` becomes ``cuda:LOCAL_RANK``.

    An explicit ``cuda:K`` is kept only with one process per node; with several it would put
    them all on GPU K, so it is refused.
    """
    if device.type != "cuda":
        return device
    if device.index is None:
        return torch.device("cuda", local_rank())
    if local_world_size() > 1:
        raise ConfigError(
            f"config key 'device': {device} would put all {local_world_size()} processes of "
            "this node on one GPU; pass --device cuda to give each process the GPU of its "
            "local rank (or CUDA_VISIBLE_DEVICES to choose the GPUs)"
        )
    return device


def nccl_environment() -> dict[str, str]:
    """What NCCL process groups need so that a dead or stuck peer ends the job.

    * ``TORCH_NCCL_ASYNC_ERROR_HANDLING=1``: when a collective passes the process group's
      timeout (``--dist-timeout``) or a communicator fails, the watchdog aborts the
      communicators and ends the process, naming the rank, the operation and its sequence
      number; torchrun then restarts or ends the job.
    * ``TORCH_NCCL_BLOCKING_WAIT=0``: waits stay asynchronous (a blocking wait would stall the
      CPU on every lazy exchange); the watchdog, not the waiting thread, enforces the timeout.
    * ``TORCH_NCCL_ENABLE_MONITORING=1`` with ``TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC``: if the
      watchdog itself hangs (a stuck driver), the heartbeat monitor ends the process after
      the collective timeout plus a minute.

    Values already in the environment are kept (a user's choice wins).
    """
    return {
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
        "TORCH_NCCL_BLOCKING_WAIT": "0",
        "TORCH_NCCL_ENABLE_MONITORING": "1",
        "TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC": str(int(_timeout_s) + 60),
    }


def _attempt_store() -> dist.Store:
    """torchrun's key-value store, with keys private to this attempt of the job.

    After a restart (``--max-restarts``) the agent keeps its store; without a prefix the new
    workers would read the dead workers' addresses and fail to connect. The prefix is the
    attempt all ranks agree on (:func:`deepimage.parallel.attempt.agree`), never a per-node
    restart count.
    """
    global _store, _attempt
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        int(os.environ["WORLD_SIZE"]),
        is_master=not agent and int(os.environ["RANK"]) == 0,
        timeout=datetime.timedelta(seconds=_timeout_s),
    )
    _store = store
    _attempt = agree(
        store,
        int(os.environ["RANK"]),
        int(os.environ["WORLD_SIZE"]),
        _timeout_s,
        restarted=restart_count() > 0,
    )
    logger.info("attempt %d of this job (resume: %s)", _attempt.number, _attempt.resume)
    return dist.PrefixStore(_attempt.prefix, store)


def destroy() -> None:
    global _store, _attempt
    if is_distributed():
        dist.destroy_process_group()
    _store, _attempt = None, None


_BACKEND_MARKS = ("gloo", "nccl", "connection reset", "connection closed", "timed out")


def is_backend_error(err: BaseException) -> bool:
    """Whether ``err`` came from the communication backend (a lost peer, a timeout) rather
    than from the computation around it; DDP's hooks surface such errors inside backward."""
    if isinstance(err, dist.DistError):
        return True
    text = str(err).lower()
    return any(mark in text for mark in _BACKEND_MARKS)


@contextlib.contextmanager
def guard(op: str, *, backend_errors_only: bool = False) -> Iterator[None]:
    """Re-raise a failed or timed-out collective as :class:`CollectiveError` naming rank and op.

    ``backend_errors_only`` leaves other errors as they are: for code that also computes
    (a backward pass whose hooks exchange gradients), where a RuntimeError may be the
    model's own."""
    start = time.monotonic()
    try:
        yield
    except CollectiveError:
        raise
    except RuntimeError as err:  # DistBackendError and gloo's timeouts are RuntimeErrors
        if not is_distributed() or (backend_errors_only and not is_backend_error(err)):
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


def all_gather_object(obj: Any, op: str = "all_gather(object)") -> list[Any]:
    """Every rank's picklable ``obj``, in rank order (``[obj]`` in one process)."""
    if world_size() <= 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    with guard(op):
        dist.all_gather_object(out, obj)
    return out


def host() -> str:
    """This process's host name, for messages that name a node."""
    import socket

    return socket.gethostname()


def failures_everywhere(failure: str | None, op: str) -> list[str]:
    """Every rank's failure (``"rank R on HOST: message"``), the same list on every rank.

    A rank that fails before a collective would leave the others waiting in it until the
    timeout; passing the failure through one all-gather lets every rank stop at once with the
    same message.
    """
    tagged = None if failure is None else f"rank {rank()} on {host()}: {failure}"
    return [f for f in all_gather_object(tagged, op=op) if f is not None]


def ranks_differing_from_root(
    value: Any, op: str, detail: Any = None
) -> dict[int, tuple[str, Any, Any]]:
    """{rank: (host, value, detail)} of the ranks whose ``value`` differs from rank 0's, with
    rank 0's own entry under key 0 when any differ; empty when all agree. The same on every
    rank (``detail``, e.g. a path, only travels along for the message)."""
    gathered = all_gather_object((host(), value, detail), op=op)
    differ = {r: g for r, g in enumerate(gathered) if g[1] != gathered[0][1]}
    return {0: gathered[0], **differ} if differ else {}
