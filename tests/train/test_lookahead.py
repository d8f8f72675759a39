"""Lookahead (airbench's EMA of weights): the update rule, its schedule and its state."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deepimage.train.lookahead import Lookahead


def test_updates_every_n_steps_with_a_cubic_decay_and_ends_on_the_average():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    la = Lookahead(net, every=2, decay=0.5, total_steps=5)
    start = {k: v.clone() for k, v in net.state_dict().items()}
    w = net[0].weight
    with torch.no_grad():
        w.add_(1.0)  # step 1: no update
    la.after_step(1)
    assert torch.equal(w, start["0.weight"] + 1.0)
    with torch.no_grad():
        w.add_(1.0)  # step 2: ema = start + (1 - d)(w - start), w = ema
    la.after_step(2)
    d = 0.5 * (2 / 5) ** 3
    assert la.decay_at(2) == pytest.approx(d)
    torch.testing.assert_close(w, start["0.weight"] + (1 - d) * 2.0)
    assert torch.equal(net[1].num_batches_tracked, start["1.num_batches_tracked"])
    ema = w.clone()
    with torch.no_grad():
        w.add_(3.0)
    la.after_step(5)  # the last step: the weights become the average, which stays
    torch.testing.assert_close(w, ema)


def test_state_round_trips_and_reset_takes_the_current_weights():
    net = nn.Linear(3, 2)
    la = Lookahead(net, every=1, decay=0.9, total_steps=10)
    with torch.no_grad():
        net.weight.fill_(2.0)
    other = Lookahead(net, every=1, decay=0.9, total_steps=10)
    other.load_state_dict(la.state_dict())
    assert not torch.equal(other.ema["weight"], net.weight)
    other.reset()
    assert torch.equal(other.ema["weight"], net.weight)
    with pytest.raises(KeyError):
        other.load_state_dict({})
