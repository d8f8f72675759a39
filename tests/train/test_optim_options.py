"""Optimizer and schedule options of the CIFAR-10 recipe: Nesterov, parameter groups for
normalisation layers and the whitening bias, the linear (triangular) schedule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deepimage.config import ConfigError, resolve_config
from deepimage.models import get_model
from deepimage.parallel.optim import build_optimizer, set_lr
from deepimage.train.schedule import LRSchedule


def test_linear_schedule_is_a_triangle_from_warmup_start_to_min_lr():
    cfg = resolve_config(None, {"schedule": "linear", "lr": 1.0, "min_lr": 0.1, "epochs": 4,
                                "warmup_epochs": 1.0, "warmup_start": 0.2})  # fmt: skip
    s = LRSchedule(cfg, steps_per_epoch=10)  # 40 steps, 10 of warm-up
    lrs = [s.lr_at(step // 10, step % 10) for step in range(40)]
    assert lrs[0] == pytest.approx(0.2 + 0.8 / 10)
    assert lrs[9] == pytest.approx(1.0) and lrs[10] == pytest.approx(1.0)
    assert lrs[39] == pytest.approx(0.1)  # the last step reaches min_lr
    down = lrs[10:]
    steps = [b - a for a, b in zip(down, down[1:])]
    assert all(d == pytest.approx(-0.9 / 29) for d in steps)  # a straight line
    capped = LRSchedule(resolve_config(None, {**cfg.__dict__, "max_steps": 20}), 10)
    assert capped.lr_at(1, 9) == pytest.approx(0.1)  # max_steps ends the line earlier


def test_warmup_from_zero_is_unchanged_by_warmup_start_default():
    cfg = resolve_config(None, {"schedule": "constant", "lr": 0.5, "warmup_epochs": 1.0})
    assert LRSchedule(cfg, 4).lr_at(0, 0) == 0.5 * 1 / 4


def airbench_groups(**values):
    model = get_model("airbench94", 10, width=0.125)
    cfg = resolve_config(None, {"lr": 2.0, "weight_decay": 0.01, "nesterov": True, **values})
    return model, build_optimizer(model, cfg)


def test_norm_and_whitening_bias_groups():
    model, opt = airbench_groups(norm_bias_lr_scale=64.0, whiten_bias_epochs=3)
    names = [g["name"] for g in opt.param_groups]
    assert names == ["main", "norm", "whiten_bias"]
    main, norm, late = opt.param_groups
    bn_biases = {id(m.bias) for m in model.modules() if isinstance(m, nn.BatchNorm2d)}
    assert {id(p) for p in norm["params"]} == bn_biases
    assert [id(p) for p in late["params"]] == [id(model.features[0].bias)]
    assert norm["weight_decay"] == pytest.approx(0.01 / 64)  # same decay per step
    assert all(g["nesterov"] for g in opt.param_groups)
    n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in opt.param_groups) == n_trainable
    set_lr(opt, 0.5, epoch=2)
    assert [g["lr"] for g in opt.param_groups] == [0.5, 32.0, 0.5]
    set_lr(opt, 0.5, epoch=3)
    assert [g["lr"] for g in opt.param_groups] == [0.5, 32.0, 0.0]


def test_frozen_whitening_bias_does_not_move():
    model, opt = airbench_groups(norm_bias_lr_scale=4.0, whiten_bias_epochs=1)
    bias = model.features[0].bias
    for epoch in (0, 1, 2):
        before = bias.detach().clone()
        set_lr(opt, 0.1, epoch=epoch)
        model(torch.randn(4, 3, 32, 32)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        assert torch.equal(bias, before) == (epoch >= 1), epoch


def test_one_group_by_default_and_plain_sgd_strategies_refuse_the_options():
    _, opt = airbench_groups()
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["nesterov"]
    for key, value in (("nesterov", True), ("norm_bias_lr_scale", 2.0),
                       ("whiten_bias_epochs", 1), ("lookahead_every", 5)):  # fmt: skip
        with pytest.raises(ConfigError, match=key):
            resolve_config(None, {key: value, "sync": "butterfly"})
    with pytest.raises(ConfigError, match="nesterov"):
        resolve_config(None, {"nesterov": True, "momentum": 0.0})


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_sgd_runs_the_fused_kernel_except_under_fp16s_gradient_scaler(precision):
    model = get_model("airbench94", 10, width=0.125)
    opt = build_optimizer(model, resolve_config(None, {"precision": precision}))
    # torch 2.14's fused SGD, skipping a first step on inf, leaves momentum uninitialised
    assert bool(opt.defaults.get("fused")) is (precision != "fp16")
    assert bool(opt.defaults.get("foreach")) is (precision == "fp16")


def test_fused_sgd_steps_a_channels_last_model_with_a_restored_contiguous_momentum():
    # load_state_dict restores momentum contiguous; torch's fused CPU kernel would then
    # update the wrong elements of every channels_last conv weight
    torch.manual_seed(0)
    cfg = resolve_config(None, {"precision": "fp32", "lr": 0.1})
    models = [get_model("airbench94", 10, width=0.125).to(memory_format=torch.channels_last)]
    models.append(get_model("airbench94", 10, width=0.125).to(memory_format=torch.channels_last))
    models[1].load_state_dict(models[0].state_dict())
    fused = build_optimizer(models[0], cfg)
    trained = [p for p in models[1].parameters() if p.requires_grad]
    plain = torch.optim.SGD(trained, lr=0.1, momentum=cfg.momentum,
                            weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)  # fmt: skip
    assert fused.defaults["fused"]
    for model, opt in zip(models, (fused, plain)):
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        opt.step()
    state = fused.state_dict()
    for entry in state["state"].values():
        entry["momentum_buffer"] = entry["momentum_buffer"].contiguous()
    fused.load_state_dict(state)
    x = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)
    for model, opt in zip(models, (fused, plain)):
        model(x).sum().backward()
        opt.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
