"""The direct (point-to-point) reduce-scatter and all-gather of butterfly on gloo, against
gloo's own collectives, on real processes."""

from __future__ import annotations

import json

import pytest
import torch.multiprocessing as mp

from tests.helpers import free_port
from tests.parallel import collective_workers

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("world", [2, 3])
def test_direct_collectives_equal_gloos_own(tmp_path, world):
    mp.spawn(collective_workers.run_direct, args=(world, free_port(), str(tmp_path)), nprocs=world)
    for rank in range(world):
        report = json.loads((tmp_path / f"direct-{rank}.json").read_text())
        assert max(report["reduce_scatter"]) <= 1e-6, report  # the same sums, another order
        assert all(report["rank_order"])  # bitwise: summed in rank order on every rank
        assert all(report["all_gather"])  # bitwise


@pytest.mark.parametrize("world", [2, 3])
def test_shared_memory_exchange_gives_the_mean_in_rank_order(tmp_path, world):
    mp.spawn(collective_workers.run_shm, args=(world, free_port(), str(tmp_path)), nprocs=world)
    for rank in range(world):
        report = json.loads((tmp_path / f"shm-{rank}.json").read_text())
        assert report["created"], report
        assert len(report["mean"]) == 16
        assert max(report["mean"]) <= 1e-6, report  # gloo's all-reduce, another order
        assert all(report["rank_order"])  # bitwise: summed in rank order on every rank
