"""The run folder: weights with their metadata, and the full training state.

:class:`Run` is the one home of a run folder's file names and of reading and writing them;
the weights' metadata is a typed :class:`~deepimage.runmeta.RunMeta`. Layout of ``RUN/``::

    config.yaml          the resolved configuration
    model.safetensors    final weights; metadata["deepimage"] holds the RunMeta JSON
    model.json           the same metadata, readable
    checkpoint.safetensors (+ .prev)   full training state for --resume
    metrics.jsonl        one line per epoch
    finetune.json        fine-tuning runs: the layers replaced, trainable and frozen
    summary.json         classes, image counts, skipped files, final accuracy
    curves.png, tb/      plots and TensorBoard logs

Every write is atomic (:mod:`deepimage.files`: temporary file, fsync, rename) and the
previous checkpoint is kept, so a process killed at any instant leaves a loadable state
behind. Nothing is ever unpickled: tensors go to safetensors and everything else to JSON.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from deepimage.files import atomic_write, atomic_write_json
from deepimage.runmeta import CheckpointError, RunMeta

logger = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
WEIGHTS_JSON = "model.json"
CHECKPOINT = "checkpoint.safetensors"
CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
FINETUNE_REPORT = "finetune.json"
META_KEY = "deepimage"

__all__ = ["CheckpointError", "Run", "RunMeta", "load_model", "read_weights", "save_weights"]


# --- nested state <-> (tensors, JSON) -------------------------------------------------------


def flatten_state(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Move every tensor of a nested dict/list into ``tensors``; return a JSON-able skeleton."""
    if isinstance(obj, torch.Tensor):
        key = prefix
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            tag = f"{type(k).__name__}:{k}"
            out[tag] = flatten_state(v, f"{prefix}.{k}", tensors)
        return {"__dict__": out}
    if isinstance(obj, list | tuple):
        items = [flatten_state(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {prefix} in a checkpoint")


def unflatten_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_state`."""
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        if "__tuple__" in skeleton:
            return tuple(unflatten_state(v, tensors) for v in skeleton["__tuple__"])
        out = {}
        for tag, v in skeleton["__dict__"].items():
            kind, _, name = tag.partition(":")
            key: Any = int(name) if kind == "int" else name
            out[key] = unflatten_state(v, tensors)
        return out
    if isinstance(skeleton, list):
        return [unflatten_state(v, tensors) for v in skeleton]
    return skeleton


def save_state(path: str | Path, state: dict[str, Any], keep_previous: bool = True) -> None:
    """Save a nested training state (tensors and plain values) atomically as safetensors."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = flatten_state(state, "s", tensors)
    metadata = {"state": json.dumps(skeleton)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata), keep_previous)


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        return load_file(str(path)), metadata
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"{path}: corrupted or not a safetensors file ({reason})") from None


def load_state(path: str | Path) -> dict[str, Any]:
    """Load a training state written by :func:`save_state`; no unpickling."""
    path = Path(path)
    tensors, metadata = _read_safetensors(path)
    if "state" not in metadata:
        raise CheckpointError(f"{path}: not a deepimage checkpoint (no 'state' metadata)")
    try:
        return unflatten_state(json.loads(metadata["state"]), tensors)
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: corrupted checkpoint metadata ({err})") from None


def load_latest_state(run: str | Path) -> dict[str, Any] | None:
    """The newest readable checkpoint of a run, falling back to the previous one."""
    run = Path(run)
    current, previous = run / CHECKPOINT, run / (CHECKPOINT + ".prev")
    if not current.exists() and not previous.exists():
        return None
    try:
        return load_state(current)
    except CheckpointError as err:
        if not previous.exists():
            raise
        logger.warning("%s; resuming from the previous checkpoint %s", err, previous)
        return load_state(previous)


# --- final weights ------------------------------------------------------------------------


def save_weights(
    path: str | Path, model: torch.nn.Module | dict[str, torch.Tensor], meta: RunMeta
) -> None:
    """Write weights (a model or its state dict) to safetensors with ``meta`` (model name,
    classes, preprocessing); next to a run folder's ``model.safetensors`` also ``model.json``."""
    path = Path(path)
    state = model if isinstance(model, dict) else model.state_dict()
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    data = meta.to_dict()
    metadata = {META_KEY: json.dumps(data)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    if path.name == WEIGHTS:
        atomic_write_json(path.with_name(WEIGHTS_JSON), data)


def _weights_path(source: str | Path) -> Path:
    path = Path(source)
    if path.is_dir():
        path = path / WEIGHTS
        if not path.exists():
            raise CheckpointError(f"{source}: no {WEIGHTS} in this run folder (not finished?)")
    return path


def read_weights(source: str | Path) -> tuple[dict[str, torch.Tensor], RunMeta]:
    """Weights and metadata from a run folder or a ``.safetensors`` file."""
    path = _weights_path(source)
    tensors, metadata = _read_safetensors(path)
    if META_KEY not in metadata:
        raise CheckpointError(f"{path}: no deepimage metadata (model name, classes)")
    try:
        data = json.loads(metadata[META_KEY])
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: metadata is not JSON ({err})") from None
    return tensors, RunMeta.from_dict(data, path)


def read_meta(source: str | Path) -> RunMeta:
    """A run's metadata without its tensors: ``model.json`` when readable, else the weights'."""
    path = Path(source)
    readable = path / WEIGHTS_JSON if path.is_dir() else None
    if readable is not None and readable.exists():
        try:
            data = json.loads(readable.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            pass  # a damaged copy: the weights' own metadata decides
        else:
            return RunMeta.from_dict(data, readable)
    return read_weights(source)[1]


def load_model(
    source: str | Path, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, RunMeta]:
    """Rebuild the model saved at ``source`` (run folder or weights file), in eval mode."""
    from deepimage.models import get_model

    tensors, meta = read_weights(source)
    model = get_model(
        meta.model,
        num_classes=meta.num_classes,
        image_size=meta.preprocess.crop,
        **meta.model_kwargs,
    )
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: weights do not fit {meta.model} "
            f"(missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})"
        )
    return model.to(device).eval(), meta


# --- the folder -----------------------------------------------------------------------------


class Run:
    """A run folder: where each of its files lives, and how each is read and written."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    @property
    def weights(self) -> Path:
        return self.path / WEIGHTS

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def summary(self) -> Path:
        return self.path / SUMMARY

    @property
    def finetune_report(self) -> Path:
        return self.path / FINETUNE_REPORT

    def started(self) -> bool:
        """Whether the folder already holds a run (a checkpoint or final weights)."""
        return self.checkpoint.exists() or self.weights.exists()

    def meta(self) -> RunMeta:
        """The finished run's metadata (:func:`read_meta`)."""
        return read_meta(self.path)

    def load_model(self, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, RunMeta]:
        return load_model(self.path, device)

    def save_weights(
        self, weights: torch.nn.Module | dict[str, torch.Tensor], meta: RunMeta
    ) -> None:
        save_weights(self.weights, weights, meta)

    def save_state(self, state: dict[str, Any]) -> None:
        """The full training state, the previous one kept as ``.prev``."""
        save_state(self.checkpoint, state)

    def latest_state(self) -> dict[str, Any] | None:
        return load_latest_state(self.path)

    def write_json(self, name: str, obj: Any) -> None:
        """``obj`` as ``RUN/name``, atomically."""
        atomic_write_json(self.path / name, obj)

    def read_json(self, name: str) -> Any | None:
        """``RUN/name`` as JSON, None when absent; a damaged file is a one-line error."""
        path = self.path / name
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{path}: not readable JSON ({err})") from None
