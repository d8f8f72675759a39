"""One place where a parallel strategy is chosen: the registries, the CLI and build_sync."""

from __future__ import annotations

import argparse
from typing import get_args

import pytest
import torch

from deepimage import config
from deepimage.augment.pipeline import PRESETS
from deepimage.cli import build_parser
from deepimage.config import TrainConfig
from deepimage.models import get_model
from deepimage.parallel.build import PARALLELS, build_sync
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
