"""Fine-tuning a trained model on a new data set (paper 5.3): new classifier, chosen layers.

``deepimage finetune --from RUN --data DIR --trainable all|last:K|head`` is an ordinary
training run whose model starts from RUN's weights. What is copied, replaced and frozen is
:mod:`deepimage.models.transfer`'s job; this module only builds the configuration.

The configuration keys are ``init_from`` and ``trainable`` (:class:`TrainConfig`); the
Trainer applies :func:`~deepimage.models.transfer.prepare_model` right after building the
model, before the optimizer, and again on resume before the checkpoint's weights are loaded
over it, so a resumed fine-tuning run is as exact as any other; :func:`~deepimage.train.loop.train`
writes what changed into ``RUN/finetune.json``. The paper's learning rates are the defaults:
0.001, divided by 10 after two thirds of the epochs (a step schedule with one milestone).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deepimage.config import ConfigError, TrainConfig, resolve_config, update_config
from deepimage.runs import FINETUNE_REPORT, Run, read_meta

FINETUNE_LR = 0.001  # paper 5.3: 0.001, then 0.0001


def finetune_config(
    flags: dict[str, Any], config_file: str | None = None, resume: bool = False
) -> TrainConfig:
    """The configuration of a fine-tuning run.

    Defaults < the source run's model, width, dropout, size, crop and resize mode < the
    paper's fine-tuning schedule (lr 0.001, step to 0.0001 after 2/3 of the epochs) <
    ``config_file`` < ``flags``. A resumed run reads its own ``config.yaml`` back instead
    (:func:`~deepimage.config.resolve_config`).
    """
    out = flags.get("out")
    if resume and out and (Path(out) / "config.yaml").exists():
        return resolve_config(config_file, flags, resumed=out)
    source = flags.get("init_from")
    if source is None:
        raise ConfigError("config key 'init_from': no model to start from (--from RUN)")
    meta = read_meta(source)
    pre = meta.preprocess
    base = {
        "model": meta.model, "width": meta.width, "dropout": meta.dropout, "size": pre.size,
        "crop": pre.crop, "resize_mode": pre.resize_mode, "lr": FINETUNE_LR,
        "schedule": "step", "gamma": 0.1,
    }  # fmt: skip
    cfg = resolve_config(config_file, flags, base=base, base_source=str(source))
    if "milestones" not in flags and cfg.schedule == "step" and cfg.epochs > 1:
        cfg = update_config(cfg, {"milestones": [max(1, 2 * cfg.epochs // 3)]})
    return cfg.validate()


def read_report(run: str | Path) -> dict[str, Any] | None:
    """The fine-tuning report of a run, if it has one."""
    return Run(run).read_json(FINETUNE_REPORT)
