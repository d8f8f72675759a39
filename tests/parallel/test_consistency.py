"""Every rank holds the same data and training state, or every rank stops at once with one
error naming the ranks; none waits for a collective timeout (2 spawned processes, gloo)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch.multiprocessing as mp
from PIL import Image

from deepimage.train.loop import train
from tests.helpers import free_port, write_noise_folder
from tests.parallel import train_workers

pytestmark = pytest.mark.slow


def run_two(tmp_path, specs) -> list[dict]:
    """Spawn 2 ranks of :func:`train_workers.run_train`; their results, in rank order."""
    ctx = mp.spawn(
        train_workers.run_train, args=(2, free_port(), specs, str(tmp_path)), nprocs=2, join=False
    )
    for p in ctx.processes:
        p.join(timeout=240)
        assert p.exitcode is not None, "a rank hung"
    return [json.loads((tmp_path / f"result_{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A run stopped after 2 steps (a), and a copy of it trained one step further (b)."""
    root = tmp_path_factory.mktemp("consistency")
    data = write_noise_folder(root / "data")
    cache = root / "cache"
    train(train_workers.config(data, root / "a", cache, max_steps=2))
    shutil.copytree(root / "a", root / "b")
    train(train_workers.config(data, root / "b", cache, max_steps=3), resume=True)
    return root, data, cache


def test_ranks_that_load_different_checkpoints_stop_naming_the_rank(runs, tmp_path):
    root, data, cache = runs
    base = {"data": data, "cache": cache, "max_steps": 5, "resume": True}
    results = run_two(tmp_path, [{**base, "out": root / "a"}, {**base, "out": root / "b"}])
    for r in results:
        assert r["error"] == "CheckpointError", r
        assert "rank 1 on " in r["message"] and "every rank must see the same run" in r["message"]


def test_a_run_that_exists_stops_every_rank_at_once(runs, tmp_path):
    """Only rank 0's folder holds the run (rank 1's is empty: another node)."""
    root, data, cache = runs
    base = {"data": data, "cache": cache}
    results = run_two(tmp_path, [{**base, "out": root / "a"}, {**base, "out": tmp_path / "x"}])
    for r in results:
        assert r["error"] == "RunExistsError", r
        assert r["seconds"] < 30  # the collective timeout is 60 s


def test_a_rank_without_the_data_stops_every_rank_naming_it(runs, tmp_path):
    root, data, cache = runs
    missing = tmp_path / "not-mounted"
    specs = [
        {"data": data, "cache": cache, "out": tmp_path / "run"},
        {"data": missing, "cache": cache, "out": tmp_path / "run"},
    ]
    for r in run_two(tmp_path, specs):
        assert r["error"] == "DataError", r
        assert "rank 1 on " in r["message"] and str(missing) in r["message"]
        assert r["seconds"] < 30


def test_another_node_prepares_its_own_copy_and_a_differing_copy_is_refused(runs, tmp_path):
    """Rank 1 plays the first process of a second node with its own cache folder (and its
    own copy of the images): it prepares the stores itself and trains with rank 0. When one
    image of its copy differs, every rank stops, naming rank 1 and its store."""
    root, data, cache = runs
    copy = shutil.copytree(data, tmp_path / "node1-data")
    node1 = {"data": copy, "cache": tmp_path / "node1-cache", "local_rank": 0}
    specs = [
        {"data": data, "cache": cache, "out": tmp_path / "run", "max_steps": 1},
        {**node1, "out": tmp_path / "run", "max_steps": 1},
    ]
    assert [r["error"] for r in run_two(tmp_path, specs)] == [None, None]
    assert list((tmp_path / "node1-cache").iterdir())  # prepared there
    first = sorted((copy / "class0").iterdir())[0]
    pixels = np.asarray(Image.open(first)).copy()
    pixels[:4] = 255 - pixels[:4]
    Image.fromarray(pixels).save(first)
    specs = [{**s, "out": tmp_path / "run2"} for s in specs]
    for r in run_two(tmp_path, specs):
        assert r["error"] == "DataError", r
        assert "rank 1 on " in r["message"] and "node1-cache" in r["message"]
