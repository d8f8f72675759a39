"""Hybrid (model-data) parallelism on real gloo processes: equal to one process, FC split 1/N.

One ``torch.multiprocessing.spawn`` per world size (2 and 4) trains the tiny VGG of
:mod:`tests.parallel.workers` (width 1/16, 32 px, fp32, keyed dropout 0.5) with the FC layers
split across ranks and the conv gradients synchronised by ddp, butterfly and lazy, then
resumes from a checkpoint written at another world size.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from deepimage.parallel.head import fc_bytes, shard_bounds, shard_classifier
from deepimage.parallel.hybrid import HybridStrategy
from deepimage.runs import load_state, save_state
from tests.helpers import free_port, max_relative_error
from tests.parallel import workers

RTOL = 1e-5  # max |w - w_ref| / max |w_ref|, per tensor
CASES = [("ddp", 1), ("butterfly", 1), ("lazy", 1), ("ddp", 2)]
RESUME_AT = 1  # the checkpoint is written after this many steps


def _hybrid(sync: str) -> tuple[torch.nn.Module, HybridStrategy]:
    model = workers.build_model()
    from deepimage.parallel.base import broadcast_model

    broadcast_model(model)
    shard_classifier(model)
    opt = torch.optim.SGD(model.parameters(), **workers.HYPER)
    return model, HybridStrategy(model, opt, sync, bucket_mb=0.05)


def _train(
    strategy: HybridStrategy,
    steps: range,
    accum: int = 1,
    wire: workers.WireCounter | None = None,
) -> list[bool]:
    """Train on this rank's slice of each global batch; return 'ranks agree on the trunk'.

    ``wire`` counts the bytes of the training steps' collectives (not of the check)."""
    from deepimage.parallel import dist as pdist
    from deepimage.train.step import forward_backward

    world, rank = pdist.world_size(), pdist.rank()
    local = workers.GLOBAL_BATCH // world
    lo, hi = rank * local, (rank + 1) * local
    train_model = strategy.wrap()
    identical = []
    for step in steps:
        x, y, rows = workers.batch(step)
        with wire.counting() if wire is not None else contextlib.nullcontext():
            forward_backward(
                train_model, x[lo:hi], y[lo:hi], accum_steps=accum, precision="fp32",
                micro_step=strategy.micro_step, dropout_key=(rows[lo:hi], workers.SEED, step),
            )  # fmt: skip
            strategy.step()
            strategy.zero_grad()
            strategy.flush()
        if world > 1:
            flat = torch.cat([p.detach().reshape(-1) for p in strategy.model.features.parameters()])
            gathered = [torch.empty_like(flat) for _ in range(world)]
            torch.distributed.all_gather(gathered, flat)
            identical.append(all(torch.equal(gathered[0], t) for t in gathered))
    return identical


def _checkpoint(strategy: HybridStrategy) -> dict:
    return {"model": strategy.model_state_dict(), "optimizer": strategy.state_dict()}


def _save_weights(strategy: HybridStrategy, path: Path) -> None:
    """The full weights, streamed to rank 0 as the training run writes them (collective)."""
    from deepimage.parallel import dist as pdist

    save_state(path, {"model": strategy.model_state_dict()}, write=pdist.rank() == 0)


def run_hybrid(rank: int, world: int, port: int, out: str, resume_from: str) -> None:
    """Every case for STEPS steps; then resume a checkpoint written at another world size."""
    from deepimage.parallel import dist as pdist

    wire = workers.WireCounter()
    wire.install()
    workers.setup(rank, world, port)
    out_dir = Path(out)
    report: dict = {}
    for sync, accum in CASES:
        case = f"{sync}-accum{accum}"
        model, strategy = _hybrid(sync)
        wire.take()
        identical = _train(strategy, range(RESUME_AT), accum, wire)
        state = _checkpoint(strategy)
        if case == "ddp-accum1":  # collective: the FC rows stream to rank 0
            save_state(out_dir / "checkpoint.safetensors", state, write=rank == 0)
        identical += _train(strategy, range(RESUME_AT, workers.STEPS), accum, wire)
        _save_weights(strategy, out_dir / f"{case}.safetensors")
        report[case] = {
            "identical": identical,
            "fc_bytes": fc_bytes(strategy.head),
            "fc_momentum_numel": [0 if m is None else m.numel() for m in strategy.fc_momentum],
            "bytes": strategy.stats.bytes_sent,
            "wire": wire.take(),
        }
        strategy.close()
    for sync in ("ddp", "butterfly"):  # resume the other world size's checkpoint
        model, strategy = _hybrid(sync)
        state = load_state(resume_from, strategy.stored_lazily)  # this rank's rows only
        strategy.load_model_state_dict(state["model"])
        strategy.load_state_dict(state["optimizer"])
        _train(strategy, range(RESUME_AT, workers.STEPS))
        _save_weights(strategy, out_dir / f"resumed-{sync}.safetensors")
        strategy.close()
    (out_dir / f"report-{rank}.json").write_text(json.dumps(report))
    pdist.barrier()
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def reference():
    return workers.reference_weights()


@pytest.fixture(scope="module")
def one_process_checkpoint(tmp_path_factory):
    """A hybrid run on one process (no process group), checkpointed after RESUME_AT steps."""
    path = tmp_path_factory.mktemp("world1") / "checkpoint.safetensors"
    _, strategy = _hybrid("ddp")
    _train(strategy, range(RESUME_AT))
    save_state(path, _checkpoint(strategy))
    return path


@pytest.fixture(scope="module")
def spawned(tmp_path_factory, one_process_checkpoint):
    """N=2 resumes the one-process checkpoint; N=4 resumes N=2's."""
    runs = {}
    previous = one_process_checkpoint
    for world in (2, 4):
        out = tmp_path_factory.mktemp(f"hybrid{world}")
        args = (world, free_port(), str(out), str(previous))
        mp.spawn(run_hybrid, args=args, nprocs=world)
        reports = [json.loads((out / f"report-{r}.json").read_text()) for r in range(world)]
        runs[world] = (out, reports)
        previous = out / "checkpoint.safetensors"
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("case", [f"{s}-accum{a}" for s, a in CASES])
def test_same_weights_as_one_process(spawned, reference, world, case):
    out, reports = spawned[world]
    err = max_relative_error(load_state(out / f"{case}.safetensors")["model"], reference)
    assert err <= RTOL, f"hybrid {case} at N={world}: off by {err:.2e} (relative)"
    for rank, report in enumerate(reports):
        assert all(report[case]["identical"]), f"{case}: trunks differ (rank {rank})"
        assert report[case]["bytes"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_fc_parameters_and_optimizer_state_split_evenly(spawned, world):
    _, reports = spawned[world]
    full = workers.build_model().classifier
    total = sum(p.numel() * 4 for p in full.parameters())
    for case in ("ddp-accum1", "butterfly-accum1"):
        per_rank = [r[case]["fc_bytes"] for r in reports]
        assert sum(per_rank) == total
        for nbytes in per_rank:
            assert abs(nbytes - total / world) <= 0.01 * total / world
    momentum = [sum(r["butterfly-accum1"]["fc_momentum_numel"]) * 4 for r in reports]
    assert sum(momentum) == total and max(momentum) <= 1.01 * total / world


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("sync", ["ddp", "butterfly"])
def test_resume_on_another_world_size(spawned, reference, world, sync):
    out, _ = spawned[world]
    err = max_relative_error(load_state(out / f"resumed-{sync}.safetensors")["model"], reference)
    assert err <= RTOL, f"resumed at N={world} ({sync}): off by {err:.2e}"


def test_one_process_hybrid_equals_plain_training(reference):
    _, strategy = _hybrid("ddp")
    _train(strategy, range(workers.STEPS))
    assert max_relative_error(strategy.model_state_dict(), reference) <= RTOL  # N=1: tensors


@pytest.mark.parametrize("world", [2, 3, 4, 8])
def test_split_of_a_large_head_is_even(world):
    """vgg16_deepimage's real head (25088 -> 4096 -> 4096 -> 1000): every rank within 1%."""
    from deepimage.models import get_model

    with torch.device("meta"):
        model = get_model("vgg16_deepimage", num_classes=1000, image_size=224)
    total = sum(p.numel() * 4 for p in model.classifier.parameters())
    classifier = model.classifier
    per_rank = []
    for rank in range(world):
        model.classifier = classifier
        per_rank.append(fc_bytes(shard_classifier(model, rank, world)))
    assert sum(per_rank) == total
    assert max(abs(b - total / world) for b in per_rank) <= 0.01 * total / world


def test_shard_bounds_tile_and_rotate_remainders():
    assert shard_bounds(10, 4) == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert shard_bounds(10, 4, start=2) == [(0, 2), (2, 4), (4, 7), (7, 10)]
    assert shard_bounds(2, 4) == [(0, 1), (1, 2), (2, 2), (2, 2)]


def test_head_refuses_unkeyed_dropout():
    model = workers.build_model()
    model.classifier[3] = torch.nn.Dropout(0.5)
    with pytest.raises(ValueError, match="KeyedDropout"):
        shard_classifier(model, 0, 2)


@pytest.mark.slow
def test_torchrun_hybrid_resumes_on_one_process_and_loads_unsharded(tmp_path):
    """``torchrun --nproc_per_node 2 ... --parallel hybrid`` stopped mid-epoch, resumed on one
    process, ends with the weights of a plain one-process run; the run's model.safetensors
    loads into an ordinary one-process model."""
    import subprocess
    import sys

    from deepimage.cli import main
    from deepimage.runs import load_model
    from tests.helpers import env, train_cmd, write_noise_folder

    data = write_noise_folder(tmp_path / "data")
    cache = tmp_path / "cache"
    flags = ["--precision", "fp32", "--epochs", "1", "--workers", "0"]
    single = train_cmd(data, tmp_path / "single", cache, *flags)
    assert main(single[3:]) == 0  # in this process: ``python -m deepimage`` dropped
    hybrid = train_cmd(data, tmp_path / "hybrid", cache, *flags, "--parallel", "hybrid")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", "2", *hybrid[1:], "--max-steps", "3"]  # fmt: skip
    subprocess.run(torchrun, check=True, env=env(), timeout=300, capture_output=True)
    assert load_state(tmp_path / "hybrid" / "checkpoint.safetensors")["step_in_epoch"] == 3
    assert main([*hybrid[3:], "--resume", "--max-steps", "8"]) == 0
    weights = load_file(tmp_path / "hybrid" / "model.safetensors")
    assert max_relative_error(weights, load_file(tmp_path / "single" / "model.safetensors")) <= RTOL
    model, meta = load_model(tmp_path / "hybrid")
    assert meta.model == "vgg16_deepimage"
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 4)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_bytes_sent_match_the_scaling_model(spawned, world):
    """Every rank sends what the scaling model's hybrid term predicts, counted where the
    collectives are issued (``workers.WireCounter``); the strategy's counter agrees."""
    from deepimage.parallel.perf_model import hybrid_bytes

    _, reports = spawned[world]
    model = workers.build_model()
    fcs = [(m.in_features, m.out_features) for m in model.classifier if hasattr(m, "in_features")]
    conv = sum(p.numel() * 4 for p in model.features.parameters())
    per_step = hybrid_bytes(fcs, conv, workers.GLOBAL_BATCH // world, world)
    for report in reports:
        assert report["ddp-accum1"]["wire"] == pytest.approx(workers.STEPS * per_step)
        for case in report:
            assert report[case]["bytes"] == pytest.approx(report[case]["wire"], rel=1e-9)


def test_hybrid_needs_a_model_with_fc_layers():
    from deepimage.config import ConfigError, resolve_config

    assert resolve_config(overrides={"parallel": "hybrid", "model": "alexnet"}).parallel == "hybrid"
    with pytest.raises(ConfigError, match="config key 'parallel'.*resnet18"):
        resolve_config(overrides={"parallel": "hybrid", "model": "resnet18"})


def test_frozen_fc_layers_stay_frozen_and_are_still_saved():
    model = workers.build_model()
    model.classifier[1].requires_grad_(False)
    head = shard_classifier(model, 1, 2)
    assert not head[1].weight.requires_grad and head[4].weight.requires_grad
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], **workers.HYPER)
    strategy = HybridStrategy(model, opt, "ddp")
    assert "classifier.1.weight" not in [n for n, _, _ in strategy.fc_params]
    assert "classifier.1.weight" in [n for n, _, _ in strategy.sharded]


def test_bench_peak_rss_is_the_measured_high_water_mark():
    """``bench hybrid`` reports the process's measured peak resident memory: 200 MB of plain
    bytes (no tensor), touched and freed again, still count."""
    import subprocess
    import sys

    code = ("from deepimage.bench.hybrid import peak_rss; a = peak_rss(); "
            "b = bytearray(200 * 2**20); del b; print(a, peak_rss())")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    before, after = map(int, out.stdout.split())
    assert after - before >= 180 * 2**20
