"""``bench scaling`` times whole steps: what a window leaves in flight is paid inside it."""

from __future__ import annotations

import time

from deepimage.bench.scaling import time_windows
from deepimage.parallel.base import CommStats

SETTLE_S = 0.05  # what the deferred exchange costs when the window's flush settles it


class DeferredStrategy:
    """Steps that return at once and leave their exchange for the flush, as lazy's do."""

    def __init__(self) -> None:
        self.stats = CommStats()
        self.in_flight = 0
        self.events: list[str] = []

    def step(self) -> None:
        self.in_flight += 1
        self.stats.record("all_reduce", 100.0)
        self.events.append("step")

    def flush(self) -> None:
        if self.in_flight:
            time.sleep(SETTLE_S)
        self.in_flight = 0
        self.events.append("flush")

    def barrier(self) -> None:
        assert self.in_flight == 0, "a window starts or ends with an exchange in flight"
        self.events.append("barrier")


def test_a_window_includes_the_exchanges_its_steps_deferred():
    strategy = DeferredStrategy()
    steps, repeats = 4, 3
    times, _, sent = time_windows(
        strategy.step, strategy.flush, strategy.barrier, strategy.stats, steps, repeats
    )
    assert len(times) == repeats
    assert all(t >= SETTLE_S / steps for t in times)  # the flush's wait is inside the timer
    assert sent == [100.0] * repeats  # bytes per step, not per window
    window = ["step"] * steps + ["flush", "barrier"]
    assert strategy.events == (["flush", "barrier"] + window) * repeats
