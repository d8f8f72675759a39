"""The ranks of a torchrun job agree on the attempt and on resuming through the job's store,
whatever each node's restart count says (two agents count restarts differently)."""

from __future__ import annotations

import threading
import time

import pytest
import torch.distributed as dist

from deepimage.parallel.attempt import AttemptError, agree, mark_opened


def run_ranks(store, restarted=(False, False), first=1, delay=0.1, timeout=10.0):
    """Every rank's :func:`agree` in its own thread; rank ``first`` starts ``delay`` s early."""
    world = len(restarted)
    out: dict[int, object] = {}

    def one(rank: int) -> None:
        try:
            out[rank] = agree(store, rank, world, timeout, restarted[rank])
        except Exception as err:  # reported below
            out[rank] = err

    threads = {r: threading.Thread(target=one, args=(r,)) for r in range(world)}
    threads[first].start()
    time.sleep(delay)
    for r, t in threads.items():
        if r != first:
            t.start()
    for t in threads.values():
        t.join(timeout + 5)
    return [out[r] for r in range(world)]


def test_first_attempt_agrees_and_does_not_resume():
    store = dist.HashStore()
    a, b = run_ranks(store)
    assert a == b and a.number == 1 and not a.resume


def test_a_restart_agrees_even_when_a_rank_reads_the_old_attempt_first():
    """Rank 1 of the restarted job starts first and reads the previous attempt's number; it
    must still join rank 0's new attempt, and both resume the run the first attempt opened,
    though only node 1's agent counted a restart."""
    store = dist.HashStore()
    run_ranks(store)
    mark_opened(store)
    a, b = run_ranks(store, restarted=(False, True), first=1, delay=0.3)
    assert a == b and a.number == 2 and a.resume


def test_a_restart_before_the_run_was_opened_does_not_resume():
    """E.g. the first attempt failed on a run folder that already held another run: the
    restarted job must not quietly take that run over."""
    store = dist.HashStore()
    run_ranks(store)
    a, b = run_ranks(store, restarted=(True, True))
    assert a == b and a.number == 2 and not a.resume


def test_a_store_new_for_every_attempt_falls_back_to_any_ranks_restart_count():
    a, b, c = run_ranks(dist.HashStore(), restarted=(False, False, True))
    assert a == b == c and a.number == 1 and a.resume


def test_a_rank_that_never_comes_is_named_after_the_timeout():
    store = dist.HashStore()
    with pytest.raises(AttemptError, match=r"rank 0 of 2: rank 1 did not join attempt 1"):
        agree(store, 0, 2, 0.3, False)
    a, b = run_ranks(store)  # the next attempt still agrees
    assert a == b and a.number == 2
