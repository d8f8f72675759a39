"""The process-group configuration under torchrun, checked without a GPU: which device each
rank takes, what ``init_process_group`` is given, the NCCL environment, and which CUDA
generator a resumed run restores."""

from __future__ import annotations

import datetime

import pytest
import torch

from deepimage.config import ConfigError
from deepimage.parallel import dist as pdist
from deepimage.train.loop import restore_cuda_rng

NCCL_KEYS = [
    "TORCH_NCCL_ASYNC_ERROR_HANDLING",
    "TORCH_NCCL_BLOCKING_WAIT",
    "TORCH_NCCL_ENABLE_MONITORING",
    "TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC",
]


@pytest.fixture
def torchrun_env(monkeypatch):
    """Rank 3 of 4, local rank 1 of 2 processes on this node."""
    for key, value in {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "1",
    }.items():
        monkeypatch.setenv(key, value)
    for key in NCCL_KEYS:
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def captured_init(monkeypatch) -> dict:
    """Replace the process-group start-up with a recorder of its arguments."""
    seen: dict = {}
    monkeypatch.setattr(pdist.dist, "init_process_group", lambda **kw: seen.update(kw))
    monkeypatch.setattr(pdist, "_attempt_store", lambda: "the attempt store")
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: seen.setdefault("set_device", d))
    monkeypatch.setattr(pdist, "is_distributed", lambda: False)
    return seen


def test_cuda_under_torchrun_takes_the_local_rank_gpu_with_nccl_settings(torchrun_env):
    seen = captured_init(torchrun_env)
    device = pdist.init_distributed(torch.device("cuda"), timeout=42)
    assert device == torch.device("cuda", 1) == seen["set_device"] == seen["device_id"]
    assert seen["backend"] == "nccl" and seen["store"] == "the attempt store"
    assert (seen["rank"], seen["world_size"]) == (3, 4)
    assert seen["timeout"] == datetime.timedelta(seconds=42)
    env = pdist.os.environ
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert env["TORCH_NCCL_BLOCKING_WAIT"] == "0"
    assert int(env["TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC"]) > 42


def test_a_users_nccl_setting_wins(torchrun_env):
    torchrun_env.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
    captured_init(torchrun_env)
    pdist.init_distributed(torch.device("cuda"), timeout=42)
    assert pdist.os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"


def test_gloo_on_the_cpu_leaves_the_nccl_environment_alone(torchrun_env):
    seen = captured_init(torchrun_env)
    assert pdist.init_distributed(torch.device("cpu"), timeout=42) == torch.device("cpu")
    assert seen["backend"] == "gloo" and seen["device_id"] is None
    assert not any(key in pdist.os.environ for key in NCCL_KEYS)


def test_an_explicit_gpu_for_several_local_processes_is_refused(torchrun_env):
    captured_init(torchrun_env)
    with pytest.raises(ConfigError, match=r"'device': cuda:0 would put all 2 processes"):
        pdist.init_distributed(torch.device("cuda:0"), timeout=42)


def test_an_explicit_gpu_is_kept_with_one_process_per_node(torchrun_env):
    torchrun_env.setenv("LOCAL_WORLD_SIZE", "1")
    seen = captured_init(torchrun_env)
    assert pdist.init_distributed(torch.device("cuda:2"), timeout=42) == torch.device("cuda", 2)
    assert seen["device_id"] == torch.device("cuda", 2)


def test_resume_restores_only_this_ranks_cuda_generator(monkeypatch):
    """A checkpoint written on a 4-GPU host resumes on cuda:1 of a 2-GPU host: one generator,
    this rank's, is set (setting all four would fail there)."""
    calls = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, d: calls.append((s, d)))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: calls.append(states))
    rank0 = [torch.full((4,), i, dtype=torch.uint8) for i in range(4)]
    restore_cuda_rng(rank0, torch.device("cuda", 1))
    assert len(calls) == 1 and torch.equal(calls[0][0], rank0[0])
    assert calls[0][1] == torch.device("cuda", 1)
    calls.clear()
    restore_cuda_rng(rank0[2], torch.device("cuda", 0))  # the current format: one state
    assert len(calls) == 1 and torch.equal(calls[0][0], rank0[2])
    calls.clear()
    restore_cuda_rng(rank0, torch.device("cpu"))
    assert calls == []
