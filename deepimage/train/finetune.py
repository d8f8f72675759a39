"""Fine-tuning a trained model on a new data set (paper 5.3): new classifier, chosen layers.

``deepimage finetune --from RUN --data DIR --trainable all|last:K|head`` is an ordinary
training run whose model starts from RUN's weights:

* every tensor whose name and shape match is copied from RUN; the softmax layer (the last
  ``Linear``) is replaced by a freshly initialised one when the classes differ, and so is
  any layer whose shape changed (a first FC layer after a crop change, say);
* ``trainable`` chooses what learns: ``all`` layers, the ``last:K`` weight layers (``Conv2d``
  and ``Linear``, in the order of the network; the paper's "last three fully-connected
  layers" is ``last:3`` on VGG), or the ``head`` alone (the softmax layer on frozen
  features, the paper's "feature extractor out of the shelf"). Frozen parameters get
  ``requires_grad = False``, so the optimizer never sees them, and frozen batch-norm layers
  keep their running statistics (they always normalise in eval mode).

The configuration keys are ``init_from`` and ``trainable`` (:class:`TrainConfig`); the
Trainer applies :func:`prepare_model` right after building the model, before the optimizer,
and again on resume before the checkpoint's weights are loaded over it, so a resumed
fine-tuning run is as exact as any other. The paper's learning rates are the defaults:
0.001, divided by 10 after two thirds of the epochs (a step schedule with one milestone).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from deepimage.config import ConfigError, TrainConfig, load_yaml, update_config
from deepimage.runs import CHECKPOINT, WEIGHTS, CheckpointError, atomic_write_json, read_weights

logger = logging.getLogger(__name__)

REPORT = "finetune.json"
FINETUNE_LR = 0.001  # paper 5.3: 0.001, then 0.0001
NORM_LAYERS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.LayerNorm)


@dataclass
class FinetuneReport:
    """What :func:`prepare_model` changed: replaced layers, trainable and frozen parameters."""

    source: str | None
    trainable: str
    replaced: list[str] = field(default_factory=list)
    trainable_layers: list[str] = field(default_factory=list)
    trainable_params: int = 0
    frozen_params: int = 0

    def lines(self) -> list[str]:
        """Readable lines for the log and the command line."""
        out = []
        if self.source is not None:
            out.append(f"initialised from {self.source}")
        out += [f"replaced {r}" for r in self.replaced] or ["no layer replaced"]
        out.append(f"trainable ({self.trainable}): {', '.join(self.trainable_layers)}")
        total = self.trainable_params + self.frozen_params
        out.append(
            f"parameters: {self.trainable_params:,} trainable, {self.frozen_params:,} frozen "
            f"(of {total:,})"
        )
        return out

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def parse_trainable(text: str) -> tuple[str, int]:
    """``all``, ``head`` or ``last:K`` as (kind, K); a bad value is a :class:`ConfigError`."""
    if text in ("all", "head"):
        return text, 0
    kind, _, k = text.partition(":")
    if kind == "last" and k.isdigit() and int(k) > 0:
        return "last", int(k)
    raise ConfigError(f"config key 'trainable': expected all, head or last:K, got {text!r}")


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The ``Conv2d`` and ``Linear`` layers in network order (registration order)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]


def head_layer(model: nn.Module) -> tuple[str, nn.Linear]:
    """The softmax layer: the last ``Linear`` of the network."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no Linear layer to replace")
    return linears[-1]


def _describe(name: str, module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return f"{name} (Linear {module.in_features} -> {module.out_features})"
    return f"{name} ({type(module).__name__})"


def load_matching(model: nn.Module, source: str | Path, new_classes: list[str]) -> list[str]:
    """Copy ``source``'s tensors into ``model`` where names and shapes match; return the
    layers left freshly initialised (the head when the classes differ, changed shapes)."""
    tensors, meta = read_weights(source)
    head_name, head = head_layer(model)
    keep_head = list(meta["classes"]) == list(new_classes)
    own = model.state_dict()
    skipped_layers: dict[str, str] = {}
    load = {}
    for key, value in own.items():
        layer = key.rpartition(".")[0]
        if not keep_head and layer == head_name:
            skipped_layers[layer] = "new classes"
            continue
        if key not in tensors:
            raise CheckpointError(f"{source}: no tensor {key} for model {meta['model']}")
        if tensors[key].shape != value.shape:
            skipped_layers[layer] = f"shape {tuple(tensors[key].shape)} -> {tuple(value.shape)}"
            continue
        load[key] = tensors[key]
    model.load_state_dict(load, strict=False)
    modules = dict(model.named_modules())
    replaced = []
    for layer, why in skipped_layers.items():
        module = modules[layer]
        if layer == head_name and not keep_head:
            old = len(meta["classes"])
            replaced.append(
                f"{layer} (Linear {head.in_features} -> {old} classes) by Linear "
                f"{head.in_features} -> {head.out_features} ({why})"
            )
        else:
            replaced.append(f"{_describe(layer, module)}: re-initialised ({why})")
    return replaced


def _freeze_norm(module: nn.Module) -> None:
    """A frozen normalisation layer always uses (and keeps) its running statistics."""

    def eval_mode(mod: nn.Module, args: Any) -> None:
        mod.training = False

    module.register_forward_pre_hook(eval_mode)


def set_trainable(model: nn.Module, trainable: str) -> list[str]:
    """Freeze all but the chosen layers; return the names of the trainable ones."""
    kind, k = parse_trainable(trainable)
    if kind == "all":
        for p in model.parameters():
            p.requires_grad_(True)
        return ["all layers"]
    layers = [head_layer(model)] if kind == "head" else weight_layers(model)[-k:]
    if kind == "last" and k > len(weight_layers(model)):
        raise ConfigError(
            f"config key 'trainable': last:{k} but the model has "
            f"{len(weight_layers(model))} weight layers"
        )
    names = [n for n, _ in layers]
    first = names[0]
    order = [n for n, _ in model.named_modules()]
    start = order.index(first)
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in model.named_modules():
        chosen = name in names
        # normalisation layers after the first trainable weight layer learn with it
        follows = isinstance(module, NORM_LAYERS) and order.index(name) > start and kind == "last"
        if chosen or follows:
            for p in module.parameters(recurse=False):
                p.requires_grad_(True)
        elif isinstance(module, NORM_LAYERS):
            _freeze_norm(module)
    return names


def prepare_model(model: nn.Module, cfg: TrainConfig, classes: list[str]) -> FinetuneReport:
    """Apply ``init_from`` and ``trainable`` to a freshly built model (before the optimizer)."""
    report = FinetuneReport(source=cfg.init_from, trainable=cfg.trainable)
    if cfg.init_from is not None:
        report.replaced = load_matching(model, cfg.init_from, classes)
    report.trainable_layers = set_trainable(model, cfg.trainable)
    report.trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    report.frozen_params = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    for line in report.lines():
        logger.info("fine-tuning: %s", line)
    return report


def finetune_config(
    flags: dict[str, Any], config_file: str | None = None, resume: bool = False
) -> TrainConfig:
    """The configuration of a fine-tuning run.

    Defaults < the source run's model, width, dropout, size, crop and resize mode < the
    paper's fine-tuning schedule (lr 0.001, step to 0.0001 after 2/3 of the epochs) <
    ``config_file`` < ``flags``. A resumed run reads its own ``config.yaml`` back instead.
    """
    out = flags.get("out")
    saved = Path(out) / "config.yaml" if out else None
    if resume and saved is not None and saved.exists():
        cfg = update_config(TrainConfig(), load_yaml(saved), source=str(saved))
        if config_file:
            cfg = update_config(cfg, load_yaml(config_file), source=config_file)
        return update_config(cfg, flags).validate()
    source = flags.get("init_from")
    if source is None:
        raise ConfigError("config key 'init_from': no model to start from (--from RUN)")
    _, meta = read_weights(source)
    kwargs = meta.get("model_kwargs", {})
    base = {
        "model": meta["model"], "width": kwargs.get("width", 1.0),
        "dropout": kwargs.get("dropout"), "size": meta["size"], "crop": meta["crop"],
        "resize_mode": meta.get("resize_mode", "stretch"), "lr": FINETUNE_LR,
        "schedule": "step", "gamma": 0.1,
    }  # fmt: skip
    cfg = update_config(TrainConfig(), base, source=str(source))
    if config_file:
        cfg = update_config(cfg, load_yaml(config_file), source=config_file)
    cfg = update_config(cfg, flags)
    if "milestones" not in flags and cfg.schedule == "step" and cfg.epochs > 1:
        cfg = update_config(cfg, {"milestones": [max(1, 2 * cfg.epochs // 3)]})
    return cfg.validate()


def finetune(cfg: TrainConfig, resume: bool = False) -> dict[str, Any]:
    """Train as configured (``init_from``, ``trainable``); the summary has the report."""
    from deepimage.parallel import dist as pdist
    from deepimage.train.loop import Trainer

    trainer = Trainer(cfg)
    try:
        report = trainer.finetune_report
        taken = any((Path(cfg.out) / f).exists() for f in (CHECKPOINT, WEIGHTS))
        if report is not None and trainer.rank == 0 and (resume or not taken):
            Path(cfg.out).mkdir(parents=True, exist_ok=True)
            atomic_write_json(Path(cfg.out) / REPORT, report.as_dict())
        summary = trainer.fit(resume=resume or pdist.restart_count() > 0)
        if report is not None:
            summary = {**summary, "finetune": report.as_dict()}
        return summary
    finally:
        trainer.close()
        pdist.destroy()


def read_report(run: str | Path) -> dict[str, Any] | None:
    """The fine-tuning report of a run, if it has one."""
    path = Path(run) / REPORT
    return json.loads(path.read_text()) if path.exists() else None
