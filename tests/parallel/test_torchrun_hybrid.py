"""torchrun end to end: ``--parallel hybrid`` on 2 processes ends with one process's weights.

Through the CLI with the default optimizer settings (SGD, momentum 0.9, weight decay 5e-4 on
every parameter, biases included), fp32, crop + flip augmentation, 6 steps (the horizon of
``test_cli_equivalence``, whose runs it shares): hybrid under each ``--sync`` against a plain
one-process run, within 1e-5 relative (:func:`tests.helpers.max_relative_error`).
"""

from __future__ import annotations

import pytest

from tests.helpers import max_relative_error

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("sync", ["ddp", "butterfly", "lazy"])
def test_hybrid_on_two_processes_ends_with_one_process_weights(cli_runs, sync):
    extra = ("--parallel", "hybrid", "--sync", sync)
    hybrid = cli_runs.torchrun(f"hybrid-{sync}-crop_flip-6", "crop_flip", 6, *extra)
    err = max_relative_error(hybrid, cli_runs.single("crop_flip", 6))
    assert err <= 1e-5, f"hybrid --sync {sync}: off by {err:.2e} (relative)"
