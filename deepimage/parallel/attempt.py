"""Which attempt of a torchrun job this is, agreed by every rank through the job's store.

torchrun restarts the workers of every node after a failure (``--max-restarts``), but each
agent counts restarts for itself: an agent that restarts its workers because another node
rejoined does not count it, so ``TORCHELASTIC_RESTART_COUNT`` differs between nodes. Keys
derived from it send the ranks of one attempt to different places of the store, and ranks
that decide from it whether to resume disagree. Both facts are therefore agreed here:

* rank 0 bumps a generation counter in the job's store (the agent's store, which outlives
  the workers) and waits until every other rank has said hello under that generation;
* every other rank reads the counter, says hello under it with a token of its own and waits
  for rank 0's answer carrying that token; if the counter moves on meanwhile (it read the
  previous attempt's value before rank 0 bumped it), it says hello again under the new one.
  Old workers are all gone before torchrun starts new ones, and an old answer lacks the new
  token, so only this attempt's rank 0 can answer;
* the answer carries the generation and whether to resume: yes when an earlier attempt of
  this job opened the run folder (:func:`mark_opened`). Where the store does not outlive the
  workers (``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``: generation 1 every time), any rank's
  restart count above 0 says so instead.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

import torch.distributed as dist

GENERATION = "deepimage/generation"
OPENED = "deepimage/run_opened"


class AttemptError(RuntimeError):
    """The ranks of a job could not agree on the attempt within the timeout."""


@dataclass(frozen=True)
class Attempt:
    number: int  # 1 for the job's first attempt, counted in the job's store
    resume: bool  # an earlier attempt of this job opened the run folder

    @property
    def prefix(self) -> str:
        """Store prefix private to this attempt."""
        return f"deepimage/attempt_{self.number}"


def _hello(number: int, rank: int) -> str:
    return f"deepimage/attempt_{number}/hello_{rank}"


def _answer(number: int, rank: int) -> str:
    return f"deepimage/attempt_{number}/answer_{rank}"


def agree(
    store: dist.Store,
    rank: int,
    world: int,
    timeout_s: float,
    restarted: bool,
    poll_s: float = 0.01,
) -> Attempt:
    """The attempt every rank of this job agrees on (see the module docstring).

    ``restarted``: this worker's own restart count is above 0 (used only where the store is
    new for every attempt). Raises :class:`AttemptError` naming the rank after ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    if rank == 0:
        number = store.add(GENERATION, 1)
        hellos: list[str] = []
        for r in range(1, world):
            while not store.check([_hello(number, r)]):
                if time.monotonic() > deadline:
                    raise AttemptError(
                        f"rank 0 of {world}: rank {r} did not join attempt {number} of the job "
                        f"within {timeout_s:g}s"
                    )
                time.sleep(poll_s)
            hellos.append(store.get(_hello(number, r)).decode())
        any_restarted = restarted or any(h.endswith(",1") for h in hellos)
        resume = store.check([OPENED]) or (number == 1 and any_restarted)
        for r, hello in enumerate(hellos, start=1):  # answer each worker by its token
            store.set(_answer(number, r), f"{hello.split(',')[0]},{int(resume)}")
        return Attempt(number, resume)
    token = secrets.token_hex(8)  # this worker's: an earlier attempt's answer lacks it
    while True:
        number = store.add(GENERATION, 0)
        if number > 0:
            store.set(_hello(number, rank), f"{token},{int(restarted)}")
            while store.add(GENERATION, 0) == number:
                if store.check([_answer(number, rank)]):
                    got, resume = store.get(_answer(number, rank)).decode().split(",")
                    if got == token:
                        return Attempt(number, resume == "1")
                if time.monotonic() > deadline:
                    break
                time.sleep(poll_s)
        if time.monotonic() > deadline:
            raise AttemptError(
                f"rank {rank} of {world}: rank 0 did not start this attempt of the job "
                f"within {timeout_s:g}s"
            )
        time.sleep(poll_s)


def mark_opened(store: dist.Store) -> None:
    """Record that this job opened its run folder, so that its later attempts resume."""
    store.set(OPENED, "1")
