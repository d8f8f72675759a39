"""Agree on a stop request across ranks without a blocking collective per step.

A signal reaches one rank (or some ranks) at any instant; every rank must still stop after
the same step, so that they write one consistent checkpoint. :class:`StopVote` makes that
decision without waiting on the network in the training loop: after step ``t`` each rank
launches an asynchronous all-reduce (sum) of its local flag, and reads the result after step
``t + lag``. By then the exchange has long completed behind ``lag`` steps of compute, so the
read does not wait; on NCCL, where collectives complete in issue order, it does not hold the
next forward pass behind in-flight gradient exchanges either. Every rank reads the same sum
after the same step, so all ranks stop together, ``lag`` steps after the first request.

:meth:`StopVote.settle` reads every vote still in flight (blocking); the loop calls it where
it synchronises anyway (end of an epoch, end of the run), so no request is lost.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from deepimage.parallel import dist as pdist

DEFAULT_LAG = 2


def _launch_all_reduce(flag: torch.Tensor) -> Any:
    return dist.all_reduce(flag, async_op=True)


class _Pending:
    """One vote in flight: the collective's handle and where its sum will be readable."""

    def __init__(self, flag: torch.Tensor, work: Any) -> None:
        self.flag, self.work = flag, work
        self.host: torch.Tensor | None = None
        self.event: Any = None
        if flag.device.type == "cuda":  # order the copy after the collective, read it later
            pdist.wait(work, "all_reduce(stop vote)")  # stream-ordered; the host goes on
            self.host = torch.empty(1, dtype=flag.dtype, pin_memory=True)
            self.host.copy_(flag, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()

    def result(self) -> bool:
        if self.event is not None:
            self.event.synchronize()
            return bool(self.host.item() > 0)
        pdist.wait(self.work, "all_reduce(stop vote)")
        return bool(self.flag.item() > 0)


class StopVote:
    """Per-step stop vote whose answer arrives ``lag`` steps later, identically on every rank.

    Call :meth:`cast` once after every step on every rank; it returns True on every rank
    after the same step once any rank has voted True. ``launch`` starts the asynchronous
    sum of a one-element tensor over ranks and returns a handle with ``wait()`` (default:
    ``torch.distributed.all_reduce(..., async_op=True)``).
    """

    def __init__(
        self,
        world: int | None = None,
        lag: int = DEFAULT_LAG,
        launch: Callable[[torch.Tensor], Any] | None = None,
        device: torch.device | None = None,
    ) -> None:
        if lag < 1:
            raise ValueError(f"stop vote lag must be at least 1 step, got {lag}")
        self.world = pdist.world_size() if world is None else world
        self.lag = lag
        self._launch = launch or _launch_all_reduce
        self.device = device
        self._pending: deque[_Pending] = deque()

    def cast(self, flag: bool) -> bool:
        """Vote ``flag`` for this step; True when a vote ``lag`` steps ago was True anywhere."""
        if self.world <= 1:
            return flag
        device = self.device if self.device is not None else pdist.comm_device()
        tensor = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
        with pdist.guard("all_reduce(stop vote)"):
            work = self._launch(tensor)
        self._pending.append(_Pending(tensor, work))
        if len(self._pending) <= self.lag:
            return False
        return self._pending.popleft().result()

    def settle(self) -> bool:
        """Read every vote in flight (blocking): True when any of them was True anywhere."""
        stop = False
        while self._pending:
            stop = self._pending.popleft().result() or stop
        return stop

    @property
    def in_flight(self) -> int:
        return len(self._pending)
