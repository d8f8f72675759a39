"""The scaling model: paper calibration, physical plausibility, monotonicity, local validation."""

from __future__ import annotations

import pytest

from deepimage.parallel.perf_model import (
    MINWA,
    UTILISATION_PLAUSIBLE,
    VGG_A,
    Fit,
    calibrate,
    crossover,
    overlap,
    speedup,
    step_time,
    validate_local,
    vgg_net,
)

NET = vgg_net(VGG_A)


def test_network_counts() -> None:
    # VGG-A: ~133M parameters, ~7.6 GMAC forward per 224px image.
    assert NET.param_bytes / 4 == pytest.approx(132.9e6, rel=0.01)
    assert NET.flops / 6 == pytest.approx(7.6e9, rel=0.02)


def test_calibration_is_plausible_and_hits_47x() -> None:
    fit = calibrate(NET, MINWA)
    lo, hi = UTILISATION_PLAUSIBLE
    assert lo <= fit.utilisation <= hi
    assert speedup(NET, MINWA, fit, 64, 1024, "lazy") == pytest.approx(47.0, rel=0.01)


def test_crossover_brackets_paper() -> None:
    # Paper: data parallelism wins above 16 GPUs. Lazy (full overlap) and butterfly (none)
    # bracket it; the butterfly bound is reported as the model's error.
    fit = calibrate(NET, MINWA)
    lazy, butterfly = crossover(NET, MINWA, fit, "lazy"), crossover(NET, MINWA, fit, "butterfly")
    assert lazy is not None and butterfly is not None
    assert lazy <= 16 < butterfly <= 64


def test_monotonic() -> None:
    fit = Fit(0.34)
    assert overlap(NET, "butterfly") < overlap(NET, "ddp") < overlap(NET, "lazy") <= 1
    lazy = [speedup(NET, MINWA, fit, n, 1024, "lazy") for n in (1, 2, 4, 8, 16, 32, 64)]
    assert lazy == sorted(lazy)
    for n in (2, 8, 64):  # overlap never hurts; more data per step never lowers the speedup
        assert (
            step_time(NET, MINWA, fit, n, 16, "lazy")["step"]
            <= step_time(NET, MINWA, fit, n, 16, "butterfly")["step"]
        )
        assert speedup(NET, MINWA, fit, n, 64 * n, "lazy") >= speedup(
            NET, MINWA, fit, n, 1024, "lazy"
        )
    hybrid = [step_time(NET, MINWA, fit, n, 64, "hybrid")["step"] for n in (8, 16, 32, 64)]
    assert hybrid == sorted(hybrid)


def _row(n: int, sync: str, step: float, nbytes: float) -> dict:
    return {"procs": n, "sync": sync, "compute_s": 0.1, "step_s": step, "bytes": nbytes}


def test_validate_local_errors() -> None:
    # 2 cores; butterfly N=2 exposes 0.1 s for 10 MB: ~100 MB/s once latency is removed.
    rows = [_row(1, "butterfly", 0.1, 0), _row(2, "butterfly", 0.2, 10e6),
            _row(4, "butterfly", 0.5, 15e6)]  # fmt: skip
    out = validate_local({"spec": {}, "rows": rows}, cores=2)
    assert out["bandwidth_bytes_s"] == pytest.approx(10e6 / (0.1 - 2 * 50e-6))
    (r,) = out["rows"]  # the fitted point is not reported as validation
    predicted = 2 * 0.1 + 15e6 / out["bandwidth_bytes_s"] + 6 * 50e-6  # compute x 4/2 + comm
    assert r["predicted_step_s"] == pytest.approx(predicted)
    assert r["error"] == pytest.approx(predicted / 0.5 - 1)
    assert out["mean_abs_error"] == pytest.approx(abs(r["error"]))
