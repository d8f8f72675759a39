"""The stop vote: every rank stops after the same step, and no step waits on its own vote.

Ranks are simulated in one process: :class:`FakeGroup` pairs the i-th launch of every rank
into one sum, and refuses to complete a sum that a rank has not yet joined (a real
collective would hang there), so an implementation that waits on a vote before the other
ranks have cast it fails instead of passing.
"""

from __future__ import annotations

import pytest
import torch

from deepimage.parallel.stop_vote import StopVote


class FakeGroup:
    """An all-reduce (sum) across ``world`` simulated ranks, matched by call order."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.slots: list[list[torch.Tensor]] = []
        self.calls = [0] * world
        self.awaited: list[tuple[int, int]] = []  # (rank, slot) in the order waited on

    def launcher(self, rank: int):
        def launch(t: torch.Tensor):
            i = self.calls[rank]
            self.calls[rank] += 1
            if i == len(self.slots):
                self.slots.append([])
            self.slots[i].append(t)
            return _Work(self, rank, i)

        return launch


class _Work:
    def __init__(self, group: FakeGroup, rank: int, slot: int) -> None:
        self.group, self.rank, self.slot = group, rank, slot

    def wait(self) -> None:
        joined = self.group.slots[self.slot]
        if len(joined) < self.group.world:
            raise RuntimeError(f"rank {self.rank} waits on vote {self.slot} nobody else cast")
        total = sum(int(t.item()) for t in joined)
        for t in joined:
            t.fill_(total)
        self.group.awaited.append((self.rank, self.slot))


def votes(world: int, lag: int) -> tuple[FakeGroup, list[StopVote]]:
    group = FakeGroup(world)
    return group, [
        StopVote(world, lag=lag, launch=group.launcher(r), device=torch.device("cpu"))
        for r in range(world)
    ]


@pytest.mark.parametrize("lag", [1, 2, 3])
@pytest.mark.parametrize("asker", [0, 1, 2])
def test_all_ranks_stop_after_the_same_step(lag, asker):
    """One rank is signalled before step 4's vote; every rank answers True first after step
    4 + lag, the same step, and False before."""
    group, ranks = votes(3, lag)
    answers: list[list[bool]] = [[] for _ in ranks]
    for step in range(12):
        for r, vote in enumerate(ranks):
            answers[r].append(vote.cast(r == asker and step >= 4))
    for r in range(3):
        assert answers[r].index(True) == 4 + lag, f"rank {r}: {answers[r]}"
    assert answers[0] == answers[1] == answers[2]


@pytest.mark.parametrize("lag", [1, 2])
def test_a_step_reads_the_vote_cast_lag_steps_earlier(lag):
    """The vote a step launches stays in flight: after step s, rank r has waited on votes
    up to s - lag only."""
    group, ranks = votes(2, lag)
    for step in range(6):
        for vote in ranks:
            vote.cast(False)
            assert vote.in_flight == min(step + 1, lag)
    assert [slot for rank, slot in group.awaited if rank == 0] == list(range(6 - lag))


def test_settle_reads_the_votes_still_in_flight():
    """A request in the last steps before the loop ends (an epoch's end) is not lost."""
    group, ranks = votes(2, lag=2)
    for step in range(5):
        answers = [vote.cast(r == 1 and step == 4) for r, vote in enumerate(ranks)]
        assert answers == [False, False]
    assert [vote.settle() for vote in ranks] == [True, True]
    assert [vote.in_flight for vote in ranks] == [0, 0]
    assert [vote.settle() for vote in ranks] == [False, False]


def test_one_process_answers_at_once_without_a_collective():
    def launch(t):
        raise AssertionError("no collective in one process")

    vote = StopVote(1, launch=launch)
    assert vote.cast(False) is False and vote.cast(True) is True and vote.settle() is False


def test_lag_must_be_positive():
    with pytest.raises(ValueError, match="at least 1 step"):
        StopVote(2, lag=0)
