"""Synchronised batch norm on gloo: N processes end where one process on the whole batch ends.

Unit tests check that :class:`SyncBatchNorm2d` outside a process group is ``nn.BatchNorm2d``;
the spawned test trains a tiny ResNet-18 (width 1/8, 32 px, fp32) for three SGD steps on
global batches of 8 split over two gloo processes, under ddp, butterfly and lazy.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch import nn

from deepimage.parallel.sync_bn import SyncBatchNorm2d, convert_sync_batchnorm
from tests.helpers import free_port, relative_error
from tests.parallel import workers

RTOL = 1e-5  # max |w - w_ref| / max |w_ref|, per tensor (weights and running statistics)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_one_process_is_batchnorm2d(momentum: float | None) -> None:
    torch.manual_seed(0)
    plain = nn.BatchNorm2d(5, momentum=momentum)
    with torch.no_grad():
        plain.weight.uniform_(0.5, 1.5)
        plain.bias.uniform_(-0.5, 0.5)
    synced = convert_sync_batchnorm(copy.deepcopy(plain))
    assert isinstance(synced, SyncBatchNorm2d)
    for _ in range(3):
        x = torch.randn(6, 5, 4, 4) * 3 + 1
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = plain(xa), synced(xb)
        g = torch.randn_like(ya)
        ya.backward(g)
        yb.backward(g)
        torch.testing.assert_close(yb, ya, rtol=0, atol=0)
        torch.testing.assert_close(xb.grad, xa.grad, rtol=0, atol=0)
        for (name, a), b in zip(plain.state_dict().items(), synced.state_dict().values()):
            torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)
        for a, b in zip(plain.parameters(), synced.parameters()):
            torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=0)
    plain.eval()
    synced.eval()
    x = torch.randn(2, 5, 4, 4)
    torch.testing.assert_close(synced(x), plain(x), rtol=0, atol=0)


def test_conversion_keeps_parameters_and_keys() -> None:
    plain = workers.build_bn_model()
    params = {n: p for n, p in plain.named_parameters()}
    keys = list(plain.state_dict())
    model = convert_sync_batchnorm(plain)
    assert not any(type(m) is nn.BatchNorm2d for m in model.modules())
    assert any(isinstance(m, SyncBatchNorm2d) for m in model.modules())
    assert list(model.state_dict()) == keys
    assert all(p is params[n] for n, p in model.named_parameters())
    workers.build_bn_model().load_state_dict(model.state_dict())  # loads into the plain model


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path) -> None:
    """Tolerance per tensor: 1e-5 relative, or twice the fp32 rounding of the one-process run
    itself (its distance to the same run in fp64) where that is larger: batch norm's backward
    cancels, so in fp32 a few BN biases of this net carry ~1e-4 of pure rounding noise."""
    world = 2
    mp.spawn(workers.run_sync_bn, args=(world, free_port(), str(tmp_path)), nprocs=world)
    reference = workers.bn_reference_state()
    exact = workers.bn_reference_state(torch.float64)
    reports = [json.loads((tmp_path / f"bn-report-{r}.json").read_text()) for r in range(world)]
    for sync in workers.BN_CASES:
        state = load_file(tmp_path / f"bn-{sync}.safetensors")
        assert state.keys() == reference.keys()
        for key, ref in reference.items():
            tol = max(RTOL, 2 * relative_error(ref, exact[key]))
            err = relative_error(state[key], ref)
            assert err <= tol, f"{sync}: {key} off by {err:.2e} (relative), tolerance {tol:.1e}"
        for rank, report in enumerate(reports):
            assert all(report[sync]["identical"]), f"{sync}: ranks disagree (rank {rank})"


@pytest.mark.slow
def test_plain_batch_norm_statistics_are_rank_zeros_on_every_rank_under_each_strategy(
    tmp_path,
) -> None:
    """Without --sync-bn each rank's running statistics follow its own slice of the batch;
    after flush every rank holds rank 0's, which are DDP's, under butterfly and lazy too."""
    from tests.parallel import buffer_workers

    ctx = mp.spawn(
        buffer_workers.run_bn_buffers, args=(2, free_port(), str(tmp_path)), nprocs=2, join=False
    )
    ctx.join(timeout=300)
    reports = [json.loads((tmp_path / f"buffers-{r}.json").read_text()) for r in range(2)]
    for report in reports:
        for sync, seen in report.items():
            assert not seen["before"], f"{sync}: the slices should give different statistics"
            assert seen["after"], f"{sync}: ranks hold different statistics after flush"
    ddp = load_file(tmp_path / "buffers-ddp.safetensors")
    for sync in ("butterfly", "lazy"):
        got = load_file(tmp_path / f"buffers-{sync}.safetensors")
        assert got.keys() == ddp.keys()
        for key, value in ddp.items():
            if value.is_floating_point():
                assert relative_error(got[key], value) <= RTOL, (sync, key)
            else:
                assert torch.equal(got[key], value), (sync, key)
