"""The strategies' own SGD update (:func:`sgd_update_many_`) against ``torch.optim.SGD``."""

from __future__ import annotations

import pytest
import torch

from deepimage.parallel.base import sgd_update_many_


def torch_sgd(params, steps, first_step_of, hyper):
    """torch.optim.SGD (single-tensor loop); parameter i has a gradient from step
    ``first_step_of[i]`` on (before that it is skipped, as a parameter without gradient)."""
    ps = [p.clone().requires_grad_() for p in params]
    opt = torch.optim.SGD(ps, foreach=False, **hyper)
    for step, grads in enumerate(steps):
        for p, g, first in zip(ps, grads, first_step_of):
            p.grad = g.clone() if step >= first else None
        opt.step()
    return [p.detach() for p in ps]


@pytest.mark.parametrize("momentum", [0.9, 0.0])
def test_many_equals_torch_sgd_with_buffers_starting_at_different_steps(momentum):
    torch.manual_seed(0)
    hyper = {"lr": 0.1, "momentum": momentum, "weight_decay": 5e-4}
    params = [torch.randn(64, 33), torch.randn(7), torch.randn(3, 3, 5, 5)]
    steps = [[torch.randn_like(p) for p in params] for _ in range(4)]
    first_step_of = [0, 2, 1]  # momentum buffers of different ages in one call
    ps = [p.clone() for p in params]
    bufs: list = [None] * len(ps)
    for step, grads in enumerate(steps):
        live = [i for i in range(len(ps)) if step >= first_step_of[i]]
        kept = [g.clone() for g in grads]
        new = sgd_update_many_([ps[i] for i in live], [grads[i] for i in live],
                               [bufs[i] for i in live], **hyper)  # fmt: skip
        for i, b in zip(live, new):
            bufs[i] = b
        assert all(torch.equal(a, b) for a, b in zip(grads, kept))  # gradients only read
    for got, want in zip(ps, torch_sgd(params, steps, first_step_of, hyper)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_a_gradient_or_buffer_in_another_memory_layout_than_its_parameter():
    # the fused kernel walks memory in order: a channels_last weight with contiguous gradient
    # and momentum (a flat exchange buffer's view, a buffer restored from a checkpoint)
    torch.manual_seed(1)
    hyper = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}
    param = torch.randn(8, 3, 3, 3).to(memory_format=torch.channels_last)
    grad, buf = torch.randn(8, 3, 3, 3), torch.randn(8, 3, 3, 3)  # both contiguous
    got = param.clone(memory_format=torch.preserve_format)
    sgd_update_many_([got], [grad], [buf.clone()], **hyper)
    want = param.clone().requires_grad_()
    want.grad = grad.clone()
    opt = torch.optim.SGD([want], foreach=False, **hyper)
    opt.state[want]["momentum_buffer"] = buf.clone()
    opt.step()
    torch.testing.assert_close(got, want.detach(), rtol=0, atol=1e-6)
