"""deepimage.rng: keyed dropout on a slice of units, and the scope of dropout keys."""

from __future__ import annotations

import torch

from deepimage.models.common import KeyedDropout
from deepimage.rng import Stream, active_dropout_keys, dropout_keys


def test_a_slice_of_units_draws_the_masks_of_the_whole_layer_there() -> None:
    """KeyedDropout(p, stream, first_unit=lo) on columns [lo, hi) equals the full layer's
    output there: what lets hybrid parallelism's shards drop exactly one process's units."""
    x = torch.rand(5, 24) + 0.5
    full = KeyedDropout(0.5, Stream.DROPOUT_FC1).train()
    with dropout_keys(torch.arange(40, 45), seed=3, step=9):
        want = full(x)
        for lo, hi in [(0, 7), (7, 16), (16, 24)]:
            part = KeyedDropout(0.5, Stream.DROPOUT_FC1, first_unit=lo).train()
            assert torch.equal(part(x[:, lo:hi]), want[:, lo:hi])
    assert 0 < (want == 0).sum() < want.numel()  # some units dropped, not all


def test_streams_draw_independent_masks() -> None:
    x = torch.ones(8, 64)
    with dropout_keys(torch.arange(8), seed=0, step=0):
        a = KeyedDropout(0.5, Stream.DROPOUT_FC1).train()(x)
        b = KeyedDropout(0.5, Stream.DROPOUT_FC2).train()(x)
    assert not torch.equal(a, b)


def test_dropout_keys_are_scoped_and_nest() -> None:
    assert active_dropout_keys() is None
    with dropout_keys(torch.arange(3), seed=1, step=2):
        outer = active_dropout_keys()
        with dropout_keys(torch.arange(5), seed=1, step=3):
            assert active_dropout_keys().rows.numel() == 5
        assert active_dropout_keys() is outer
    assert active_dropout_keys() is None
