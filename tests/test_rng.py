"""deepimage.rng: the one scheme from seed to consumers, keyed dropout on a slice of units,
and the scope of dropout keys."""

from __future__ import annotations

import numpy as np
import torch

from deepimage import rng
from deepimage.augment.params import draw_uniforms
from deepimage.data.loader import epoch_order, stratified_split
from deepimage.evaluate.corrupt import corrupt
from deepimage.models.common import KeyedDropout
from deepimage.rng import Stream, active_dropout_keys, dropout_keys, seed_global


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


def _draws(seed: int) -> dict[str, np.ndarray]:
    """What every consumer of a run's seed draws from it (small, fixed counters)."""
    labels = np.repeat(np.arange(3), 10)
    rows = np.arange(30)
    with dropout_keys(torch.arange(4), seed=seed, step=5):
        mask = KeyedDropout(0.5, Stream.DROPOUT_FC1).train()(torch.ones(4, 32))
    seed_global(seed)
    init = torch.nn.Linear(4, 4).weight.detach()
    images = torch.full((2, 8, 8, 3), 128, dtype=torch.uint8)
    return {
        "validation split": np.concatenate(stratified_split(labels, 0.3, seed)),
        "epoch order": epoch_order(rows, seed, 2),
        "augmentation": draw_uniforms(seed, 2, [3, 4])["crop"],
        "dropout": mask.numpy(),
        "weight init": init.numpy(),
        "corruption": corrupt(images, np.array([0, 1]), "noise", 3, seed).numpy(),
    }


def test_every_consumer_draws_from_the_seed_only_through_stream_seed(monkeypatch) -> None:
    """The one scheme: replace stream_seed by a function that ignores the seed, and no
    consumer can tell two seeds apart any more (each one would if it read the seed itself)."""
    one, two = _draws(1), _draws(2)
    for name in one:
        assert not np.array_equal(one[name], two[name]), f"{name} ignores the seed"
    monkeypatch.setattr(rng, "stream_seed", lambda seed, stream: 1000 + int(stream))
    one, two = _draws(1), _draws(2)
    for name in one:
        assert np.array_equal(one[name], two[name]), f"{name} reads the seed outside stream_seed"


def test_streams_have_distinct_keys_and_are_documented() -> None:
    for seed in (0, 1, 2**40 + 3):
        keys = {rng.stream_seed(seed, s) for s in Stream}
        assert len(keys) == len(Stream)
    for stream in Stream:
        if stream is not Stream.DEFAULT:
            assert f"Stream.{stream.name}" in rng.__doc__, f"{stream.name} missing from the table"
