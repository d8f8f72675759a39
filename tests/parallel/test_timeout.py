"""A collective whose peer never comes ends within the timeout, naming the rank and the op."""

from __future__ import annotations

import json

import pytest
import torch.multiprocessing as mp

from tests.helpers import free_port
from tests.parallel import workers

pytestmark = pytest.mark.slow


def test_hung_collective_raises_naming_rank_and_operation(tmp_path):
    ctx = mp.spawn(workers.run_hang, args=(2, free_port(), str(tmp_path)), nprocs=2, join=False)
    ctx.join(timeout=60)
    result = json.loads((tmp_path / "hang.json").read_text())
    assert "rank 0 of 2" in result["message"]
    assert "all_reduce(test)" in result["message"]
    assert result["seconds"] < 10  # timeout 3 s, the silent peer sleeps 12 s
    for p in ctx.processes:
        p.join(timeout=30)
