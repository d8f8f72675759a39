"""One place where a parallel strategy is chosen: the registries, the CLI and build_sync."""

from __future__ import annotations

import argparse
import dataclasses
from typing import get_args

import pytest
import torch

from deepimage import config
from deepimage.augment.pipeline import PRESETS
from deepimage.cli import build_parser
from deepimage.config import TrainConfig
from deepimage.models import get_model
from deepimage.parallel.build import PARALLELS, build_sync, strategy_class
from deepimage.parallel.head import HybridHead
from deepimage.parallel.optim import OPTIMIZERS
from deepimage.parallel.registry import SYNCS, build_strategy


@pytest.mark.parametrize(
    ("registry", "literal"),
    [
        (SYNCS, config.SyncName),
        (PARALLELS, config.ParallelName),
        (OPTIMIZERS, config.OptimizerName),
        (PRESETS, config.AugmentPreset),
    ],
)
def test_config_types_name_exactly_the_registered_entries(registry, literal) -> None:
    assert list(registry) == list(get_args(literal))


def _choices(parser: argparse.ArgumentParser, *path: str) -> dict[str, list[str]]:
    for name in path:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return {a.dest: list(a.choices) for a in parser._actions if a.choices is not None}


@pytest.mark.parametrize("command", ["train", "finetune"])
def test_cli_choices_come_from_the_registries(command: str) -> None:
    choices = _choices(build_parser(), command)
    assert choices["sync"] == list(SYNCS)
    assert choices["parallel"] == list(PARALLELS)
    assert choices["optimizer"] == list(OPTIMIZERS)
    assert choices["augment"] == list(PRESETS)
    scaling = _choices(build_parser(), "bench", "scaling")
    assert scaling["sync"] == list(SYNCS)


def test_build_strategy_names_each_registered_strategy() -> None:
    for name in SYNCS:
        model = torch.nn.Linear(3, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        strategy = build_strategy(name, model, opt)
        assert strategy.name == name
        strategy.close()
    with pytest.raises(ValueError, match="unknown sync strategy 'nope'; known: ddp"):
        build_strategy("nope", model, opt)


def _tiny(parallel: str, sync: str) -> tuple[torch.nn.Module, TrainConfig]:
    cfg = TrainConfig(model="alexnet", parallel=parallel, sync=sync, width=1 / 16, lr=0.05)
    model = get_model("alexnet", num_classes=3, image_size=64, width=1 / 16)
    return model, cfg.validate()


@pytest.mark.parametrize("sync", list(SYNCS))
def test_build_sync_data_parallel(sync: str) -> None:
    model, cfg = _tiny("data", sync)
    strategy = build_sync(cfg, model)
    assert strategy.name == sync and not strategy.collective_forward
    assert not isinstance(model.classifier, HybridHead)
    held = {id(p) for p in strategy.optimizer.param_groups[0]["params"]}
    assert held == {id(p) for p in model.parameters()}
    assert strategy.optimizer.param_groups[0]["lr"] == cfg.effective_lr()
    assert strategy.wrap() is model  # one process: nothing to wrap


@pytest.mark.parametrize("sync", list(SYNCS))
def test_build_sync_hybrid_shards_the_head_before_the_optimizer(sync: str) -> None:
    model, cfg = _tiny("hybrid", sync)
    strategy = build_sync(cfg, model)
    assert strategy.name == "hybrid" and strategy.collective_forward
    assert isinstance(model.classifier, HybridHead)
    assert strategy.inner.name == sync
    held = {id(p) for p in strategy.optimizer.param_groups[0]["params"]}
    assert held == {id(p) for p in model.parameters()}  # the shards, not the dropped layers
    strategy.close()


def _one_step(sync: str, scaler: torch.amp.GradScaler | None):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    strategy = build_strategy(sync, model, opt)
    x, y = torch.randn(4, 8), torch.tensor([0, 1, 2, 0])
    for _ in range(2):  # the second step uses the momentum of the first
        loss = torch.nn.functional.cross_entropy(strategy.wrap()(x), y)
        if scaler is None:
            loss.backward()
            strategy.step()
        else:  # what the training loop does in fp16
            scaler.scale(loss).backward()
            scaler.step(strategy.optimizer)
            scaler.update()
        strategy.zero_grad()
    strategy.flush()
    weights, state = model.state_dict(), strategy.state_dict()
    strategy.close()
    return weights, state


def _same_state(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    if isinstance(a, dict):
        return (
            isinstance(b, dict) and a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
        )
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same_state(u, v) for u, v in zip(a, b))
    return a == b


@pytest.mark.parametrize("sync", list(SYNCS))
def test_fp16_scaler_support_means_a_scaler_step_is_the_strategy_step(sync: str) -> None:
    """A strategy claims ``supports_fp16_scaler`` exactly when stepping the optimizer through
    a GradScaler (as fp16 training does) leaves the weights and the optimizer state that
    its own step would: strategies that apply SGD themselves keep state the scaler never
    sees."""
    plain = _one_step(sync, None)
    try:
        scaled = _one_step(sync, torch.amp.GradScaler("cpu", init_scale=2.0**10))
    except AssertionError:  # the scaler found no gradients to unscale in the optimizer
        same = False
    else:
        same = _same_state(plain[0], scaled[0]) and _same_state(plain[1], scaled[1])
    assert SYNCS[sync].supports_fp16_scaler == same


@pytest.mark.parametrize("parallel", list(PARALLELS))
@pytest.mark.parametrize("sync", list(SYNCS))
def test_strategy_class_is_what_build_sync_builds(parallel: str, sync: str) -> None:
    """The class answers for the strategy before the model exists (the training loop asks it
    whether fp16 can be chosen); the config accepts fp16 exactly where it says yes."""
    model, cfg = _tiny(parallel, sync)
    strategy = build_sync(cfg, model)
    assert type(strategy) is strategy_class(cfg)
    strategy.close()
    fp16 = dataclasses.replace(cfg, precision="fp16")
    if strategy_class(cfg).supports_fp16_scaler:
        fp16.validate()
    else:
        with pytest.raises(config.ConfigError, match="precision"):
            fp16.validate()


@pytest.mark.parametrize("parallel", list(PARALLELS))
def test_a_strategy_says_whether_it_shards_the_fc_layers_before_it_is_built(parallel: str):
    """The loop builds the FC layers deferred, never whole, exactly when the strategy that
    build_sync will make holds only this rank's rows of them."""
    from deepimage.parallel.head import HybridHead

    model, cfg = _tiny(parallel, "ddp")
    strategy = build_sync(cfg, model)
    assert strategy_class(cfg).shards_fc_layers == isinstance(model.classifier, HybridHead)
    strategy.close()
