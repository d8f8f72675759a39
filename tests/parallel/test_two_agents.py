"""Two torchrun agents, one process each, that rendezvous over c10d on loopback like two nodes.

Each agent has its own working directory and store cache; the data and the run folder are
shared paths. (a) They end with the weights of one process after 6 steps (1e-5, the horizon
of ``test_cli_equivalence``). (b) Under ``--max-restarts 1``, the worker of node 1 killed
mid-run makes both agents restart their workers (only node 1's agent counts it); the new
workers agree on the attempt, resume from the last checkpoint and end bitwise equal to the
uninterrupted job. Every wait is bounded, so a hang fails the test instead of lasting.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deepimage.runs import load_state
from tests.helpers import env, free_port, max_relative_error, wait_until
from tests.parallel.conftest import TORCHRUN

pytestmark = pytest.mark.slow

AUGMENT, STEPS = "crop_flip", 6
JOB_TIMEOUT = 600


def start_job(cli_runs, name: str, *flags: str) -> tuple[Path, list[subprocess.Popen]]:
    """Both agents of one job; returns the shared run folder and the agents."""
    out, port = cli_runs.root / name, free_port()
    agents = []
    for node in range(2):
        home = cli_runs.root / f"{name}-node{node}"
        home.mkdir()
        cmd = [
            *TORCHRUN, "--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", name, *flags,
            *cli_runs.args(out, AUGMENT, STEPS, cache=home / "cache"), "--dist-timeout", "60",
        ]  # fmt: skip
        log = (home / "agent.log").open("wb")
        agents.append(
            subprocess.Popen(
                cmd,
                cwd=home,
                env=env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        )
    return out, agents


def finish(agents: list[subprocess.Popen], out: Path) -> None:
    """Wait for both agents (bounded); on a hang kill them and fail with their logs."""
    try:
        for agent in agents:
            agent.wait(timeout=JOB_TIMEOUT)
    except subprocess.TimeoutExpired:
        pass
    finally:
        for agent in agents:
            if agent.poll() is None:
                os.killpg(agent.pid, signal.SIGKILL)
                agent.wait()
    logs = [(out.parent / f"{out.name}-node{n}" / "agent.log").read_text()[-2500:] for n in (0, 1)]
    assert [a.returncode for a in agents] == [0, 0], "\n----\n".join(logs)


def worker_of(agents: list[subprocess.Popen], rank: int) -> int:
    """The pid of the worker process of global rank ``rank`` (a child of either agent)."""
    parents = {a.pid for a in agents}
    for child in Path("/proc").iterdir():
        if not child.name.isdigit():
            continue
        try:
            ppid = int((child / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (child / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if ppid in parents and f"RANK={rank}".encode() in environ:
            return int(child.name)
    raise LookupError(f"no worker of rank {rank}")


@pytest.fixture(scope="module")
def uninterrupted(cli_runs) -> Path:
    out, agents = start_job(cli_runs, "agents")
    finish(agents, out)
    return out


def test_two_agents_end_with_the_weights_of_one_process(cli_runs, uninterrupted):
    assert max_relative_error(uninterrupted, cli_runs.single(AUGMENT, STEPS)) <= 1e-5


def test_a_worker_killed_on_node_1_restarts_and_ends_with_the_uninterrupted_weights(
    cli_runs, uninterrupted
):
    out, agents = start_job(cli_runs, "agents-killed", "--max-restarts", "1")
    try:
        wait_until(
            lambda: load_state(out / "checkpoint.safetensors")["global_step"] >= 2,
            JOB_TIMEOUT,
            "a checkpoint at step 2",
            alive=lambda: all(a.poll() is None for a in agents),
        )
        os.kill(worker_of(agents, 1), signal.SIGKILL)
    finally:
        finish(agents, out)
    logs = "".join(
        (cli_runs.root / f"agents-killed-node{n}" / "agent.log").read_text() for n in (0, 1)
    )
    assert "CollectiveError: rank 0 of 2" in logs  # the survivor saw its peer die
    assert load_state(out / "checkpoint.safetensors")["global_step"] == STEPS
    got, want = load_file(out / "model.safetensors"), load_file(uninterrupted / "model.safetensors")
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), f"{key} differs after the restart"
