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

A state may hold tensors cut over processes (hybrid parallelism's FC layers): any value with
``shape``, ``dtype`` and ``chunks()`` is streamed into the file chunk by chunk, so the writer
never holds it whole; reading, :func:`load_state` can leave chosen tensors in the file
(:class:`StoredTensor`) for each process to read only its rows.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

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


class ChunkedTensor(Protocol):
    """A tensor written chunk by chunk along its first dimension (collective where sharded)."""

    shape: torch.Size
    dtype: torch.dtype

    def chunks(self) -> Any: ...


# --- nested state <-> (tensors, JSON) -------------------------------------------------------


def state_key(*path: Any) -> str:
    """The file key of the tensor at ``state[path[0]][path[1]]...`` (see :func:`save_state`)."""
    return ".".join(["s", *map(str, path)])


def flatten_state(obj: Any, prefix: str, tensors: dict[str, Any]) -> Any:
    """Move every tensor (or :class:`ChunkedTensor`) of a nested dict/list into ``tensors``;
    return a JSON-able skeleton."""
    if isinstance(obj, torch.Tensor) or hasattr(obj, "chunks"):
        key = prefix
        tensors[key] = obj.detach() if isinstance(obj, torch.Tensor) else obj
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


_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
           torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16",
           torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}  # fmt: skip


def _order(tensors: dict[str, Any]) -> list[str]:
    """Widest dtype first, then by name (safetensors' own order: every tensor stays aligned);
    the same on every process, which streams its chunked tensors in this order."""
    return sorted(tensors, key=lambda k: (-tensors[k].dtype.itemsize, k))


def _write_streamed(path: str | Path, tensors: dict[str, Any], metadata: dict[str, str]) -> None:
    """A safetensors file written tensor by tensor and chunk by chunk."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    keys = _order(tensors)
    for key in keys:
        t = tensors[key]
        nbytes = t.shape.numel() * t.dtype.itemsize
        header[key] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape),
                       "data_offsets": [offset, offset + nbytes]}  # fmt: skip
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for key in keys:
            t = tensors[key]
            for chunk in t.chunks() if hasattr(t, "chunks") else [t]:
                data = chunk.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
                f.write(memoryview(data.numpy()))


def _stream_only(tensors: dict[str, Any]) -> None:
    """A process that does not write: take part in the chunked tensors' collectives."""
    for key in _order(tensors):
        if hasattr(tensors[key], "chunks"):
            for _ in tensors[key].chunks():
                pass


def _save(path: str | Path, tensors: dict[str, Any], metadata: dict[str, str],
          keep_previous: bool, write: bool) -> None:  # fmt: skip
    if not write:
        _stream_only(tensors)
    elif any(hasattr(t, "chunks") for t in tensors.values()):
        atomic_write(path, lambda tmp: _write_streamed(tmp, tensors, metadata), keep_previous)
    else:
        plain = {k: v.cpu().contiguous() for k, v in tensors.items()}
        atomic_write(path, lambda tmp: save_file(plain, tmp, metadata=metadata), keep_previous)


def save_state(
    path: str | Path, state: dict[str, Any], keep_previous: bool = True, *, write: bool = True
) -> None:
    """Save a nested training state (tensors and plain values) atomically as safetensors.

    Sharded tensors (:class:`ChunkedTensor`) are streamed: every process calls this, the one
    with ``write`` writes the file, the others only send their parts.
    """
    tensors: dict[str, Any] = {}
    skeleton = flatten_state(state, "s", tensors)
    _save(path, tensors, {"state": json.dumps(skeleton)}, keep_previous, write)


class StoredTensor:
    """A tensor left in its safetensors file: ``shape`` and ``dtype`` known, and ``t[lo:hi]``
    reads only those rows from the file (the open file, so a later rename does not matter)."""

    def __init__(self, file: Any, key: str, entry: dict[str, Any], data_start: int) -> None:
        self._file, self.key = file, key
        self.shape = torch.Size(entry["shape"])
        self.dtype = {v: k for k, v in _DTYPES.items()}[entry["dtype"]]
        self._offset = data_start + entry["data_offsets"][0]

    def dim(self) -> int:
        return len(self.shape)

    def __getitem__(self, index: slice) -> torch.Tensor:
        if not isinstance(index, slice) or index.step not in (None, 1) or not self.shape:
            raise TypeError(f"{self.key}: a stored tensor reads row ranges t[lo:hi] only")
        lo, hi, _ = index.indices(self.shape[0])
        hi = max(lo, hi)
        rest = self.shape[1:]
        row = rest.numel() * self.dtype.itemsize
        if hi == lo or row == 0:
            return torch.empty((hi - lo, *rest), dtype=self.dtype)
        data = bytearray(os.pread(self._file.fileno(), (hi - lo) * row, self._offset + lo * row))
        if len(data) != (hi - lo) * row:
            raise CheckpointError(f"{self._file.name}: {self.key} is cut short")
        return torch.frombuffer(data, dtype=self.dtype).reshape(hi - lo, *rest)


def _read_safetensors(
    path: Path, lazy: Callable[[str], bool] | None = None
) -> tuple[dict[str, Any], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if lazy is not None:  # validated by safe_open; the rows are read from our handle
                file = open(path, "rb")  # noqa: SIM115 - kept open by the stored tensors
                (size,) = struct.unpack("<Q", file.read(8))
                header = json.loads(file.read(size))
                names = [k for k in header if k != "__metadata__"]
                tensors = {k: StoredTensor(file, k, header[k], 8 + size) if lazy(k)
                           else f.get_tensor(k) for k in names}  # fmt: skip
                return tensors, metadata
        return load_file(str(path)), metadata
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"{path}: corrupted or not a safetensors file ({reason})") from None


def load_state(path: str | Path, lazy: Callable[[str], bool] | None = None) -> dict[str, Any]:
    """Load a training state written by :func:`save_state`; no unpickling.

    Tensors whose key (:func:`state_key`) ``lazy`` accepts stay in the file as
    :class:`StoredTensor`: a process reads only the rows it holds.
    """
    path = Path(path)
    tensors, metadata = _read_safetensors(path, lazy)
    if "state" not in metadata:
        raise CheckpointError(f"{path}: not a deepimage checkpoint (no 'state' metadata)")
    try:
        return unflatten_state(json.loads(metadata["state"]), tensors)
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: corrupted checkpoint metadata ({err})") from None


def load_latest_state(
    run: str | Path, lazy: Callable[[str], bool] | None = None
) -> dict[str, Any] | None:
    """The newest readable checkpoint of a run, falling back to the previous one (``lazy``:
    see :func:`load_state`)."""
    run = Path(run)
    current, previous = run / CHECKPOINT, run / (CHECKPOINT + ".prev")
    if not current.exists() and not previous.exists():
        return None
    try:
        return load_state(current, lazy)
    except CheckpointError as err:
        if not previous.exists():
            raise
        logger.warning("%s; resuming from the previous checkpoint %s", err, previous)
        return load_state(previous, lazy)


# --- final weights ------------------------------------------------------------------------


def save_weights(
    path: str | Path,
    model: torch.nn.Module | dict[str, Any],
    meta: RunMeta,
    *,
    write: bool = True,
) -> None:
    """Write weights (a model or its state dict) to safetensors with ``meta`` (model name,
    classes, preprocessing); next to a run folder's ``model.safetensors`` also ``model.json``.
    Sharded tensors are streamed as in :func:`save_state`."""
    path = Path(path)
    state = model if isinstance(model, dict) else model.state_dict()
    tensors = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
    data = meta.to_dict()
    _save(path, tensors, {META_KEY: json.dumps(data)}, False, write)
    if write and path.name == WEIGHTS:
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
        self, weights: torch.nn.Module | dict[str, Any], meta: RunMeta, *, write: bool = True
    ) -> None:
        """The final weights; ``write=False`` on ranks that only stream their rows."""
        save_weights(self.weights, weights, meta, write=write)

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
