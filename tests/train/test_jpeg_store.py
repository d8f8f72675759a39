"""Training from a JPEG store keeps the exactness contracts of the raw store.

Decoding a stored JPEG is deterministic, so a run killed with SIGKILL and resumed ends
bitwise equal to an uninterrupted one, and two processes end with the weights of one
(the patterns of ``tests/train/test_resume.py`` and ``tests/parallel/test_torchrun.py``).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from tests.helpers import env, max_relative_error, train_cmd, write_noise_folder
from tests.parallel.test_torchrun import FLAGS, module_cmd, torchrun
from tests.train.test_resume import assert_same_run, wait_for_step

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def jpeg_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("jpeg")
    data = write_noise_folder(root / "data")
    store = root / "store"
    prepare = [sys.executable, "-m", "deepimage", "-q", "prepare", str(data), "--sizes", "40",
               "--encoding", "jpeg", "--shard-mb", "0.05", "--out", str(store),
               "--no-progress"]  # fmt: skip
    subprocess.run(prepare, check=True, env=env(), timeout=300)
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["encoding"] == "jpeg" and len(manifest["shards"]["40"]) > 1
    return root, store


def test_sigkill_then_resume_from_a_jpeg_store_is_bitwise_exact(jpeg_store):
    root, store = jpeg_store
    ref, out = root / "uninterrupted", root / "killed"
    subprocess.run(train_cmd(store, ref, root / "cache"), check=True, env=env(), timeout=300)
    cmd = train_cmd(store, out, root / "cache")
    proc = subprocess.Popen(cmd, env=env())
    reached = wait_for_step(out, 5, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and reached % 8 != 0  # mid-epoch
    subprocess.run(cmd + ["--resume"], check=True, env=env(), timeout=300)
    assert_same_run(ref, out)


def test_two_processes_match_one_on_a_jpeg_store(jpeg_store):
    root, store = jpeg_store
    cache = root / "cache"
    single = train_cmd(store, root / "single", cache, *FLAGS)
    subprocess.run(single, check=True, env=env(), timeout=300)
    two = torchrun(*module_cmd(train_cmd(store, root / "two", cache, *FLAGS)))
    subprocess.run(two, check=True, env=env(), timeout=300, capture_output=True)
    assert max_relative_error(root / "two", root / "single") <= 1e-5
