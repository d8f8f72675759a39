"""Hybrid parallelism never holds a whole FC layer: not at start-up, checkpoints or resume.

Real training runs (:func:`deepimage.train.loop.train`) on N=4 spawned gloo processes, then
resumed from their checkpoint on N=2, run under a dispatch mode that sees every tensor any
torch operation takes or makes. For each FC layer of vgg16_deepimage (width 1/4, 32 px: FC
layers 128->1024, 1024->1024, 1024->4), a matrix whose last dimension is the layer's input
width must not sit on storage larger than the biggest share one rank holds of a layer of that
input width (``ceil(out / N)`` rows): its own rows, its gradient and momentum, or the buffer
into which rank 0 receives one other rank's rows when it writes a checkpoint. A whole layer,
or a slice of a whole layer (a view keeps the whole storage), exceeds it. The softmax layer
(4 rows) is smaller than a share of FC2, which has the same input width, so only FC1 and FC2
are checked apart; they hold 99.6% of the FC weights.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from deepimage.runs import load_state
from tests.helpers import free_port, write_noise_folder

pytestmark = pytest.mark.slow

WIDTH, CROP = 0.25, 32
FC = [(128, 1024), (1024, 1024), (1024, 4)]  # (in, out) of vgg16_deepimage at WIDTH, CROP


def bounds(world: int) -> dict[int, int]:
    """Largest bytes one rank may hold of any tensor ending in each FC input width."""
    out: dict[int, int] = {}
    for fan_in, fan_out in FC:
        out[fan_in] = max(out.get(fan_in, 0), math.ceil(fan_out / world) * fan_in * 4)
    return out


class LargestFCTensor(TorchDispatchMode):
    """Records, per FC input width, the largest storage of a tensor ending in that width."""

    def __init__(self, widths: list[int]) -> None:
        super().__init__()
        self.largest = dict.fromkeys(widths, 0)
        self.where = dict.fromkeys(widths, "")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves((args, kwargs, out)):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta" or t.dim() < 2:
                continue  # FC weights, their rows and momentum are matrices
            width = t.shape[-1]
            if width in self.largest:
                nbytes = t.untyped_storage().nbytes()
                if nbytes > self.largest[width]:
                    self.largest[width] = nbytes
                    self.where[width] = f"{func} {tuple(t.shape)}"
        return out


def run_rank(rank: int, world: int, port: int, data: str, out: str, steps: int) -> None:
    import os

    from deepimage.config import TrainConfig
    from deepimage.train.loop import train

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    cfg = TrainConfig(
        data=data, out=out, cache_dir=str(Path(out).parent / "cache"), model="vgg16_deepimage",
        width=WIDTH, size=36, crop=CROP, batch_size=8, epochs=1, max_steps=steps,
        checkpoint_every=1, workers=0, precision="fp32", parallel="hybrid", sync="ddp",
        progress=False, tensorboard=False,
    )  # fmt: skip
    watch = LargestFCTensor(sorted({fan_in for fan_in, _ in FC}))
    with watch:
        train(cfg, resume=steps > 2)
    report = {"largest": watch.largest, "where": watch.where}
    (Path(out).parent / f"report-{world}-{rank}.json").write_text(json.dumps(report))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """N=4 starts the run (2 steps, a checkpoint each); N=2 resumes it to step 4."""
    root = tmp_path_factory.mktemp("hybrid-memory")
    data = write_noise_folder(root / "data")
    out = root / "run"
    for world, steps in ((4, 2), (2, 4)):
        mp.spawn(run_rank, args=(world, free_port(), str(data), str(out), steps), nprocs=world)
    return root


@pytest.mark.parametrize("world", [4, 2])
def test_no_rank_holds_more_than_its_share_of_an_fc_layer(runs, world):
    limit = bounds(world)
    for rank in range(world):
        report = json.loads((runs / f"report-{world}-{rank}.json").read_text())
        for width, nbytes in report["largest"].items():
            assert nbytes > 0, f"no tensor of width {width} seen"
            assert nbytes <= limit[int(width)], (
                f"N={world} rank {rank}: {nbytes} bytes ending in {width} "
                f"(share {limit[int(width)]}): {report['where'][width]}"
            )


def test_the_run_resumed_and_saved_unsharded_weights(runs):
    state = load_state(runs / "run" / "checkpoint.safetensors")
    assert state["global_step"] == 4
    for i, (fan_in, fan_out) in zip((1, 4, 7), FC):
        assert tuple(state["model"][f"classifier.{i}.weight"].shape) == (fan_out, fan_in)
