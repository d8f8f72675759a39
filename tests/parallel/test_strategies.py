"""ddp, butterfly and lazy on real gloo processes: equal to one process, equal across ranks.

Each world size is one ``torch.multiprocessing.spawn`` of N processes that trains every case of
:data:`tests.parallel.workers.CASES` for a few steps of a tiny VGG (width 1/16, 32 px, fp32,
dropout 0.5 keyed by image) on its slice of each global batch of 8, flushing after every step
to compare the ranks; lazy update's deferred path (no flush between steps, as the training
loop runs it) has a spawn of its own.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from tests.helpers import free_port, relative_error
from tests.parallel import workers

pytestmark = pytest.mark.slow

RTOL = 1e-5  # max |w - w_ref| / max |w_ref|, per tensor


@pytest.fixture(scope="module")
def reference():
    return workers.reference_weights()


@pytest.fixture(scope="module", params=[2, 4])
def spawned(request, tmp_path_factory):
    world = request.param
    out = tmp_path_factory.mktemp(f"world{world}")
    mp.spawn(workers.run_strategies, args=(world, free_port(), str(out)), nprocs=world)
    reports = [json.loads((out / f"report-{r}.json").read_text()) for r in range(world)]
    return world, out, reports


@pytest.mark.parametrize("case", [f"{s}-accum{a}" for s, a in workers.CASES])
def test_same_weights_as_one_process(spawned, reference, case):
    world, out, reports = spawned
    weights = load_file(out / f"{case}.safetensors")
    for key, ref in reference.items():
        err = relative_error(weights[key], ref)
        assert err <= RTOL, f"{case} at N={world}: {key} off by {err:.2e} (relative)"
    for rank, report in enumerate(reports):
        assert all(report[case]["identical"]), f"{case}: ranks disagree (rank {rank})"


def test_bytes_counted_at_the_collectives(spawned):
    """Bytes counted where the collectives are issued (see ``workers.WireCounter``): lazy
    update and ddp send 2 (N - 1) / N of the gradient per step, butterfly the same plus at
    most the padding of its buckets; each strategy's own counter reports what was sent."""
    world, _, reports = spawned
    for report in reports:
        grad_bytes = report["ddp-accum1"]["grad_bytes"]
        expected = 2 * (world - 1) / world * grad_bytes
        for case in ("ddp-accum1", "lazy-accum1", "lazy-accum2", "ddp-accum2"):
            assert report[case]["wire"] == [expected] * workers.STEPS, case
        for case in ("lazy_shm-accum1", "lazy_shm-accum2", "butterfly_shm-accum1",
                     "butterfly_shm-accum2"):  # through memory, not a wire  # fmt: skip
            assert report[case]["wire"] == [0.0] * workers.STEPS, case
        buckets = len(report["butterfly-accum1"]["ownership"])
        padding = 2 * (world - 1) / world * buckets * (world - 1) * 4  # < N elements a bucket
        for case in ("butterfly-accum1", "butterfly-accum2"):
            for sent in report[case]["wire"]:
                assert expected <= sent <= expected + padding, case
        for case, info in report.items():
            assert info["bytes"] == pytest.approx(info["wire"], rel=1e-9), case


@pytest.mark.parametrize("case", ["butterfly-accum1", "butterfly_shm-accum1"])
def test_butterfly_ownership_is_explicit_and_sharded(spawned, case):
    world, out, reports = spawned
    for rank, report in enumerate(reports):
        info = report[case]
        assert len(info["ownership"]) > 1  # several buckets, in layer order
        names = [n for bucket in info["ownership"] for n in bucket["params"]]
        model = workers.build_model()
        assert names == [n for n, _ in model.named_parameters()]
        for bucket, numel in zip(info["ownership"], info["momentum_numel"]):
            parts = sorted(bucket["parts"].values())
            assert parts[0][0] == 0 and parts[-1][1] == bucket["padded"]
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))  # a tiling
            start, stop = bucket["parts"][str(rank)]
            assert (start, stop) == (rank * bucket["padded"] // world,
                                     (rank + 1) * bucket["padded"] // world)  # fmt: skip
            assert numel == stop - start == bucket["padded"] // world  # optimizer state / N
    # The gathered momentum is torch.optim.SGD's, so a run can resume on any N.
    ref_model = workers.build_model()
    opt = torch.optim.SGD(ref_model.parameters(), **workers.HYPER)
    from deepimage.train.step import forward_backward

    for step in range(workers.STEPS):
        x, y, rows = workers.batch(step)
        forward_backward(ref_model, x, y, precision="fp32", dropout_key=(rows, workers.SEED, step))
        opt.step()
        opt.zero_grad()
    gathered = load_file(out / f"{case}-momentum.safetensors")
    refs = [opt.state[p]["momentum_buffer"] for p in ref_model.parameters()]
    # The whole momentum within RTOL of its largest entry, and each tensor within 10 x RTOL of
    # its own: a bias whose momentum is a near-cancelling sum of ~1e-6 terms meets 1e-5 of
    # itself only sometimes (the half-batch gradients round differently), while a wrong
    # shard, owner or gather is off by O(1).
    flat = torch.cat([gathered[str(i)].flatten() for i in range(len(refs))])
    assert relative_error(flat, torch.cat([r.flatten() for r in refs])) <= RTOL
    for i, ref in enumerate(refs):
        assert relative_error(gathered[str(i)], ref) <= 10 * RTOL, f"momentum of parameter {i}"


def test_lazy_leaves_exchanges_in_flight_after_backward(spawned):
    _, _, reports = spawned
    for report in reports:
        for case in ("lazy-accum1", "lazy-accum2", "lazy_shm-accum1", "lazy_shm-accum2"):
            info = report[case]
            assert info["pending_after_backward"] == [info["n_layers"]] * workers.STEPS


def test_butterfly_reduce_scatters_start_during_backward(spawned):
    """Butterfly overlaps its reduce-scatters with backward, as DDP's buckets do: by the time
    backward reaches the input image (the first layer's gradient), every bucket but the one
    holding the first layers has issued its reduce-scatter (counted where the collectives
    are called); launching them all in step() would leave none."""
    _, _, reports = spawned
    for report in reports:
        for case in ("butterfly-accum1", "butterfly-accum2", "butterfly_shm-accum1",
                     "butterfly_shm-accum2"):  # fmt: skip
            info = report[case]
            buckets = len(info["ownership"])
            assert buckets > 2
            launched = [n / info["calls_per_bucket"] for n in info["launched_before_input_grad"]]
            assert len(launched) == workers.STEPS, case
            assert all(buckets - 1 <= n <= buckets for n in launched), (case, launched)


@pytest.mark.parametrize("sync", ["lazy", "lazy_shm", "butterfly", "butterfly_shm"])
def test_deferred_updates_equal_one_process_sgd(tmp_path, sync):
    """Lazy update and butterfly without a flush between steps, as the training loop runs
    them: two gloo processes for DEFERRED_STEPS steps with a learning rate that changes every
    step, then one flush, end with the weights of torch.optim.SGD on the whole batch in one
    process (within RTOL). Between steps every layer's update (lazy) or every bucket's
    all-gather (butterfly) was still in flight, so the next forward pass applied it, with
    the learning rate of its own step."""
    world = 2
    mp.spawn(workers.run_deferred, args=(world, free_port(), str(tmp_path), sync), nprocs=world)
    for rank in range(world):
        report = json.loads((tmp_path / f"deferred-{sync}-{rank}.json").read_text())
        assert report["units"] > 1
        assert report["in_flight_between_steps"] == [report["units"]] * workers.DEFERRED_STEPS
    reference = workers.reference_weights(workers.DEFERRED_STEPS, schedule=True)
    weights = load_file(tmp_path / f"{sync}-deferred.safetensors")
    for key, ref in reference.items():
        err = relative_error(weights[key], ref)
        assert err <= RTOL, f"{sync} deferred: {key} off by {err:.2e} (relative)"
