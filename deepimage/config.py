"""Training configuration: a dataclass with YAML defaults and command-line overrides.

Precedence is built-in default < YAML file < flag. Every key is checked: an unknown key or a
value of the wrong type or range is refused with :class:`ConfigError`, one line naming the key.
The resolved configuration is written into the run folder (``config.yaml``) and is what a
resumed run reads back.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from deepimage.files import atomic_write_text

Precision = Literal["auto", "bf16", "fp16", "fp32"]
Schedule = Literal["plateau", "step", "exp", "constant", "linear"]
LrScaling = Literal["none", "linear"]
OptimizerName = Literal["sgd", "adamw"]
ResizeMode = Literal["stretch", "shorter"]
SyncName = Literal["ddp", "butterfly", "lazy"]
ParallelName = Literal["data", "hybrid"]
AugmentPreset = Literal["deepimage", "alexnet", "crop_flip", "airbench", "none"]
TtaMode = Literal["center", "flip", "dense", "shift"]


logger = logging.getLogger(__name__)

HYBRID_MODELS = ("vgg16_deepimage", "vgg19_deepimage", "alexnet")
"""Models with a fully-connected classifier that ``parallel: hybrid`` can split."""


class ConfigError(ValueError):
    """A bad configuration key or value; the message is one line naming the key."""


@dataclass
class TrainConfig:
    """Everything a training run depends on. Units are stated where they matter."""

    # data
    data: str | None = None  # ImageFolder directory, CSV manifest or prepared store
    val: str | None = None  # separate validation data; otherwise a split of `data`
    val_split: float = 0.1  # fraction of `data` held out for validation when `val` is unset
    class_names: str | None = None  # file of "<id> <readable name>" lines
    size: int = 256  # source resolution S: images are resized to S x S (paper 4.2)
    crop: int = 224  # training crop C, and the network's input size
    resize_mode: ResizeMode = (
        "stretch"  # "stretch" to S x S (paper) or "shorter" side + centre crop
    )
    augment: AugmentPreset = "deepimage"  # paper 4.1 (deepimage.augment.pipeline.PRESETS)
    workers: int = 2  # data-loading worker processes (0: in the main process)
    max_pixels: int = 178_956_970  # decompression-bomb cap, in pixels
    cache_dir: str | None = None  # where folders are prepared into stores
    # model
    model: str = "resnet18"
    width: float = 1.0  # channel multiplier for the deepimage VGG and AlexNet nets
    dropout: float | None = None  # None: the model's own default (0.5 in VGG and AlexNet)
    data_init_images: int = 5000  # training images that set a whitening layer (airbench94)
    init_from: str | None = None  # fine-tuning: start from this run's weights (paper 5.3)
    trainable: str = "all"  # fine-tuning: all, head, or last:K weight layers
    # optimisation
    optimizer: OptimizerName = "sgd"  # the paper's SGD; butterfly and lazy sync need it
    epochs: int = 30
    max_steps: int | None = None  # stop after this many optimizer steps in all
    batch_size: int = 64  # images per optimizer step
    accum_steps: int = 1  # micro-batches per optimizer step (batch_size must divide evenly)
    lr: float = 0.01  # at batch 256 when lr_scaling is "linear", else as given
    lr_scaling: LrScaling = "none"
    momentum: float = 0.9
    nesterov: bool = False  # Nesterov momentum (SGD)
    weight_decay: float = 5e-4
    norm_bias_lr_scale: float = 1.0  # normalisation layers' parameters: lr x this, wd / this
    whiten_bias_epochs: int = 0  # epochs a whitening conv's bias trains, then frozen (0: never)
    lookahead_every: int = 0  # steps between Lookahead (EMA of weights) updates; 0: off
    lookahead_decay: float = 0.7737809375  # EMA decay 0.95^5 at the end, scaled by (t/T)^3
    schedule: Schedule = "plateau"
    gamma: float = 0.1  # factor of each decay (plateau, step) or per epoch (exp)
    milestones: list[int] = field(default_factory=list)  # epochs of the step schedule
    patience: int = 2  # epochs without improvement before a plateau decay
    min_lr: float = 1e-6
    warmup_epochs: float = 0.0  # linear warm-up from 0, in epochs (fractions allowed)
    warmup_start: float = 0.0  # warm-up starts at this fraction of lr (linear schedule: airbench)
    label_smoothing: float = 0.0
    # evaluation: test-time augmentation recorded with the model, used by `deepimage evaluate`
    tta: list[TtaMode] = field(default_factory=lambda: ["center"])
    # execution
    precision: Precision = "auto"  # auto: by the hardware (deepimage.precision); bf16, fp16, fp32
    channels_last: bool | Literal["auto"] = "auto"  # NHWC memory layout; auto follows precision
    device: str = "auto"  # auto, cpu, cuda, cuda:1, ...
    seed: int = 0
    # distributed (torchrun): the global batch_size is split evenly across processes
    sync: SyncName = "ddp"  # gradient sync: ddp, butterfly (paper 3.1) or lazy (paper 3.1)
    parallel: ParallelName = "data"  # hybrid: FC layers split across processes (paper 3.2)
    sync_bn: bool = False  # batch-norm statistics over the global batch
    device_cache_mb: float = 0.0  # hold training images in device memory if they fit; 0: off
    bucket_mb: float = 25.0  # gradient bucket size of ddp and butterfly, in MiB
    dist_timeout: float = 600.0  # seconds before a hung collective is an error
    checkpoint_every: int = (
        100  # optimizer steps between mid-epoch checkpoints (0: epoch ends only)
    )
    progress: bool = True
    tensorboard: bool = True
    out: str | None = None  # the run folder

    def effective_lr(self) -> float:
        """Learning rate after the linear scaling rule (lr is per 256 images when scaling)."""
        if self.lr_scaling == "linear":
            return self.lr * self.batch_size / 256
        return self.lr

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // self.accum_steps

    def validate(self) -> TrainConfig:
        """Check ranges and relations between keys; return self for chaining."""
        _positive(self, "size", "crop", "epochs", "batch_size", "accum_steps", "max_pixels")
        _non_negative(self, "workers", "checkpoint_every", "warmup_epochs", "weight_decay")
        _non_negative(self, "momentum", "min_lr", "patience", "label_smoothing")
        _non_negative(self, "whiten_bias_epochs", "lookahead_every")
        _positive(self, "data_init_images")
        if self.norm_bias_lr_scale <= 0:
            raise ConfigError(
                f"config key 'norm_bias_lr_scale': must be > 0, got {self.norm_bias_lr_scale}"
            )
        for key in ("warmup_start", "lookahead_decay"):
            if not 0 <= getattr(self, key) <= 1:
                raise ConfigError(
                    f"config key '{key}': must be in [0, 1], got {getattr(self, key)}"
                )
        if not self.tta:
            raise ConfigError("config key 'tta': needs at least one view (e.g. [center])")
        plain_sgd = self.sync != "ddp" or self.parallel != "data"
        for key, default in (("nesterov", False), ("norm_bias_lr_scale", 1.0),
                             ("whiten_bias_epochs", 0), ("lookahead_every", 0)):  # fmt: skip
            if plain_sgd and getattr(self, key) != default:
                raise ConfigError(
                    f"config key '{key}': sync {self.sync} with parallel {self.parallel} applies "
                    "plain SGD to one parameter group itself; use sync ddp with parallel data"
                )
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
            raise ConfigError("config key 'nesterov': needs optimizer sgd with momentum > 0")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise ConfigError(f"config key 'dropout': must be in [0, 1), got {self.dropout}")
        if self.lr <= 0:
            raise ConfigError(f"config key 'lr': must be > 0, got {self.lr}")
        if self.crop > self.size:
            raise ConfigError(f"config key 'crop': {self.crop} exceeds size {self.size}")
        if not 0 <= self.val_split < 1:
            raise ConfigError(f"config key 'val_split': must be in [0, 1), got {self.val_split}")
        if self.batch_size % self.accum_steps:
            raise ConfigError(
                f"config key 'accum_steps': {self.accum_steps} does not divide "
                f"batch_size {self.batch_size}"
            )
        _non_negative(self, "device_cache_mb")
        if self.bucket_mb <= 0 or self.dist_timeout <= 0:
            key = "bucket_mb" if self.bucket_mb <= 0 else "dist_timeout"
            raise ConfigError(f"config key '{key}': must be > 0, got {getattr(self, key)}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ConfigError(f"config key 'max_steps': must be > 0, got {self.max_steps}")
        if not 0 < self.gamma <= 1:
            raise ConfigError(f"config key 'gamma': must be in (0, 1], got {self.gamma}")
        if self.parallel == "hybrid" and self.model not in HYBRID_MODELS:
            raise ConfigError(
                f"config key 'parallel': hybrid splits fully-connected classifiers; "
                f"model {self.model} has none (use {', '.join(HYBRID_MODELS)})"
            )
        if self.optimizer != "sgd" and self.sync in ("butterfly", "lazy"):
            raise ConfigError(
                f"config key 'optimizer': {self.sync} sync applies SGD itself; "
                "use optimizer sgd or sync ddp"
            )
        if self.precision == "fp16" and (self.sync != "ddp" or self.parallel != "data"):
            raise ConfigError(
                "config key 'precision': fp16 needs a gradient scaler, which only sync ddp "
                "with parallel data applies; use bf16 or fp32"
            )
        if self.trainable not in ("all", "head") and not (
            self.trainable.startswith("last:") and self.trainable[5:].isdigit()
            and int(self.trainable[5:]) > 0
        ):  # fmt: skip
            raise ConfigError(
                f"config key 'trainable': expected all, head or last:K, got {self.trainable!r}"
            )
        if sorted(self.milestones) != list(self.milestones):
            raise ConfigError("config key 'milestones': must be increasing")
        return self


def _positive(cfg: Any, *keys: str) -> None:
    for key in keys:
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"config key '{key}': must be > 0, got {getattr(cfg, key)}")


def _non_negative(cfg: Any, *keys: str) -> None:
    for key in keys:
        if getattr(cfg, key) < 0:
            raise ConfigError(f"config key '{key}': must be >= 0, got {getattr(cfg, key)}")


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check ``value`` against a field annotation, converting the harmless cases (int -> float)."""
    origin = get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(key, value, option)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"config key '{key}': bad value {value!r}")
    if origin is Literal:
        choices = get_args(annotation)
        if value not in choices:
            raise ConfigError(
                f"config key '{key}': expected one of {', '.join(map(str, choices))}, got {value!r}"
            )
        return value
    if origin is list:
        (item_type,) = get_args(annotation)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        return [_coerce(key, v, item_type) for v in value]
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
        return value
    raise ConfigError(f"config key '{key}': unsupported type {annotation!r}")


def _fields() -> dict[str, Any]:
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(TrainConfig)}


def update_config(cfg: TrainConfig, values: dict[str, Any], source: str = "") -> TrainConfig:
    """Return a copy of ``cfg`` with ``values`` applied, each checked against its field type."""
    fields = _fields()
    where = f" in {source}" if source else ""
    changes = {}
    for key, value in values.items():
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key '{key}'{where}{hint}")
        try:
            changes[key] = _coerce(key, value, fields[key])
        except ConfigError as err:
            raise ConfigError(f"{err}{where}") from None
    return dataclasses.replace(cfg, **changes)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing file or bad syntax is a one-line :class:`ConfigError`."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {path}{at}: invalid YAML") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of keys to values")
    return data


def resolve_config(
    file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    *,
    resumed: str | Path | None = None,
    base: dict[str, Any] | None = None,
    base_source: str = "",
) -> TrainConfig:
    """The one precedence of configuration keys; validated.

    Built-in defaults < ``base`` (keys a command derives, such as a fine-tuning run's from
    its source; ``base_source`` names where they came from) < the YAML ``file`` <
    ``overrides`` (flags). When ``resumed`` names a run folder with a saved ``config.yaml``,
    that saved configuration takes the place of the defaults and ``base``, and a warning
    names the keys the file or flags change.
    """
    saved = Path(resumed) / "config.yaml" if resumed is not None else None
    resuming = saved is not None and saved.exists()
    if resuming:
        cfg = update_config(TrainConfig(), load_yaml(saved), source=str(saved))
    else:
        cfg = update_config(TrainConfig(), base or {}, source=base_source)
    if file is not None:
        cfg = update_config(cfg, load_yaml(file), source=str(file))
    if resuming and overrides:
        changed = {k: v for k, v in overrides.items() if getattr(cfg, k, v) != v}
        if changed:
            logger.warning("resuming with changed keys: %s", ", ".join(sorted(changed)))
    if overrides:
        cfg = update_config(cfg, overrides)
    return cfg.validate()


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: TrainConfig, path: str | Path, comment: str | None = None) -> None:
    """Write the resolved configuration as YAML, after an optional ``# comment`` line."""
    head = "".join(f"# {line}\n" for line in comment.splitlines()) if comment else ""
    atomic_write_text(path, head + yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
