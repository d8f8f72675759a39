"""Through the command line, 2 processes end with the weights of 1 process, over the horizon
where fp32 training can promise it.

fp32 sums in another order on another number of processes (and threads); training amplifies
that rounding, and a discrete event (a max-pool or ReLU decision flipping) turns it into a
jump. So equivalence is tested where it is meaningful: after 2 steps with the default
augmentation, and after 6 steps with crop + flip (README, "Distributed training"). Default
optimizer settings (momentum, weight decay), vgg16_deepimage at width 1/4, batch 16.
"""

from __future__ import annotations

import pytest

from tests.helpers import max_relative_error

pytestmark = pytest.mark.slow

HORIZONS = [("deepimage", 2), ("crop_flip", 6)]  # (augmentation, steps)


@pytest.mark.parametrize(("augment", "steps"), HORIZONS)
@pytest.mark.parametrize("sync", ["ddp", "butterfly", "lazy"])
def test_two_processes_end_with_the_weights_of_one(cli_runs, sync, augment, steps):
    two = cli_runs.torchrun(f"two-{sync}-{augment}-{steps}", augment, steps, "--sync", sync)
    assert max_relative_error(two, cli_runs.single(augment, steps)) <= 1e-5
