"""What a run says about its model, typed: :class:`RunMeta` and its :class:`Preprocess`.

The weights of a run carry, as JSON (``model.safetensors`` metadata, ``model.json``, an
exported model's metadata), the flat keys written since the first version::

    model, model_kwargs {width, dropout}, classes, class_names,
    size, crop, resize_mode, mean, std, precision, channels_last

:meth:`RunMeta.from_dict` is the one reader of these keys: it fills what older files lack
(``resize_mode`` stretch, ``precision`` fp32, no class names) and refuses a missing or bad
key with one line naming the file and the key. Everything downstream (evaluate, predict,
serve, export, fine-tuning, ensembles) reads typed fields instead of string keys.

:class:`Preprocess` is how an image file becomes the model's input, and how that input is
run: decode to ``size`` x ``size`` by ``resize_mode``, centre crop ``crop``, normalise by
``mean`` and ``std``, compute in ``precision`` with ``channels_last`` memory or not. Training
validates with it and inference runs with it, so the two cannot disagree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

RESIZE_MODES = ("stretch", "shorter")
PRECISIONS = ("fp32", "bf16", "fp16")


class CheckpointError(RuntimeError):
    """A checkpoint, weights file or its metadata that cannot be read; the message names the
    file (and the key)."""


@dataclass(frozen=True)
class Preprocess:
    """From an image file to the model's input, and how that input is computed."""

    size: int  # decoded to size x size (paper: the stored scale)
    crop: int  # centre crop fed to the model
    mean: tuple[float, float, float]  # per RGB channel, on pixel / 255
    std: tuple[float, float, float]
    resize_mode: str = "stretch"  # "stretch" (paper) or "shorter" side + centre crop
    precision: str = "fp32"  # fp32, bf16 or fp16 (autocast)
    channels_last: bool = False  # NHWC memory layout

    def running(self, precision: str, channels_last: bool) -> Preprocess:
        """The same preprocessing, computed in ``precision`` and layout (an execution choice
        made for this machine, which may differ from training's)."""
        return dataclasses.replace(self, precision=precision, channels_last=channels_last)

    @property
    def view(self) -> tuple[int, str]:
        """(size, resize mode): what decoding depends on; members sharing it share a decode."""
        return self.size, self.resize_mode


@dataclass(frozen=True)
class RunMeta:
    """What predict, evaluate, serve, export and fine-tuning need to rebuild a run's model."""

    model: str
    classes: tuple[str, ...]
    preprocess: Preprocess
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)  # width, dropout
    class_names: Mapping[str, str] = field(default_factory=dict)  # class id -> readable name
    tta: tuple[str, ...] = ("center",)  # the test-time views `deepimage evaluate` applies

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def width(self) -> float:
        return float(self.model_kwargs.get("width", 1.0))

    @property
    def dropout(self) -> float | None:
        return self.model_kwargs.get("dropout")

    def name_of(self, class_id: str) -> str:
        """The readable name of a class, ``""`` when none is known."""
        return self.class_names.get(class_id, "")

    def labels(self) -> list[str]:
        """Readable label per class: ``"<id> <name>"`` when a name is known, else the id."""
        return [f"{c} {self.name_of(c)}" if self.name_of(c) else c for c in self.classes]

    def to_dict(self) -> dict[str, Any]:
        """The flat JSON keys of the weights' metadata (module docstring)."""
        pre = self.preprocess
        return {
            "model": self.model,
            "model_kwargs": dict(self.model_kwargs),
            "classes": list(self.classes),
            "class_names": dict(self.class_names),
            "size": pre.size,
            "crop": pre.crop,
            "resize_mode": pre.resize_mode,
            "mean": list(pre.mean),
            "std": list(pre.std),
            "precision": pre.precision,
            "channels_last": pre.channels_last,
            "tta": list(self.tta),
        }

    @classmethod
    def from_dict(cls, data: Any, source: object) -> RunMeta:
        """Read the metadata JSON of ``source`` (a file name, for errors); older files lack
        keys that get their defaults. Raises :class:`CheckpointError` naming file and key."""
        if not isinstance(data, dict):
            raise CheckpointError(f"{source}: metadata is not a JSON object")
        read = _Reader(data, source)
        size = read.positive_int("size")
        crop = read.positive_int("crop")
        if crop > size:
            raise CheckpointError(f"{source}: key 'crop': {crop} exceeds size {size}")
        preprocess = Preprocess(
            size=size,
            crop=crop,
            mean=read.triple("mean", positive=False),
            std=read.triple("std", positive=True),
            resize_mode=read.choice("resize_mode", RESIZE_MODES, "stretch"),
            precision=_trained_precision(read.choice("precision", (*PRECISIONS, "auto"), "fp32")),
            channels_last=read.boolean("channels_last", False),
        )
        classes = read.strings("classes")
        names = read.mapping("class_names")
        return cls(
            model=read.string("model"),
            classes=tuple(classes),
            preprocess=preprocess,
            model_kwargs=read.mapping("model_kwargs"),
            class_names={str(k): str(v) for k, v in names.items() if v is not None},
            tta=tuple(read.optional_strings("tta", ("center",))),
        )


def _trained_precision(value: str) -> str:
    # runs from before precision was resolved at the start of training recorded "auto";
    # inference chooses its own precision anyway (deepimage.inference.inference_execution)
    return "fp32" if value == "auto" else value


class _Reader:
    """Typed access to one metadata dict; every error is one line naming file and key."""

    def __init__(self, data: dict[str, Any], source: object) -> None:
        self.data, self.source = data, source

    def _error(self, key: str, what: str) -> CheckpointError:
        return CheckpointError(f"{self.source}: key {key!r}: {what}")

    def _get(self, key: str) -> Any:
        if key not in self.data:
            raise CheckpointError(f"{self.source}: key {key!r} missing from the run's metadata")
        return self.data[key]

    def string(self, key: str) -> str:
        value = self._get(key)
        if not isinstance(value, str) or not value:
            raise self._error(key, f"expected a name, got {value!r}")
        return value

    def positive_int(self, key: str) -> int:
        value = self._get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise self._error(key, f"expected a positive whole number, got {value!r}")
        return value

    def triple(self, key: str, positive: bool) -> tuple[float, float, float]:
        value = self._get(key)
        ok = isinstance(value, list | tuple) and len(value) == 3
        ok = ok and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
        if not ok or (positive and min(value) <= 0):
            kind = "positive numbers" if positive else "numbers"
            raise self._error(key, f"expected 3 {kind} (R, G, B), got {value!r}")
        return (float(value[0]), float(value[1]), float(value[2]))

    def strings(self, key: str) -> list[str]:
        value = self._get(key)
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise self._error(key, f"expected a non-empty list of class ids, got {value!r:.60}")
        return value

    def optional_strings(self, key: str, default: tuple[str, ...]) -> list[str]:
        value = self.data.get(key)
        if value is None:
            return list(default)
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise self._error(key, f"expected a non-empty list of names, got {value!r:.60}")
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        value = self.data.get(key, default)
        if value not in choices:
            raise self._error(key, f"expected one of {', '.join(choices)}, got {value!r}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.data.get(key, default)
        if not isinstance(value, bool):
            raise self._error(key, f"expected true or false, got {value!r}")
        return value

    def mapping(self, key: str) -> dict[str, Any]:
        value = self.data.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self._error(key, f"expected a JSON object, got {value!r:.60}")
        return dict(value)
