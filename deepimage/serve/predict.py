"""Top-k predictions with class ids, readable names and probabilities for image files.

A :class:`Predictor` holds one or more members (an ensemble) and applies exactly the
preprocessing of ``evaluate``: :func:`~deepimage.data.decode.decode_image` at each member's
``size`` with its ``resize_mode``, then the centre crop and normalisation of
:func:`~deepimage.inference.logits_for`. Each member may want a different source size, so an
image is decoded once per distinct (size, resize mode) "view"; the ensemble's posteriors are
the mean of its members' softmax posteriors.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from deepimage.data.decode import DEFAULT_MAX_PIXELS, DecodeError, ImageSource, decode_image
from deepimage.inference import inference_execution, logits_for, model_input, resolve_device
from deepimage.runmeta import CheckpointError, Preprocess, RunMeta

View = tuple[int, str]  # (source size, resize mode)


class Member(Protocol):
    """One model of a predictor: its metadata and a forward pass to logits."""

    meta: RunMeta

    def logits(self, images: np.ndarray) -> np.ndarray:
        """float32 logits for ``(B, S, S, 3)`` uint8 images at ``meta.preprocess.size``."""


@dataclass
class TorchMember:
    """A PyTorch model run through :func:`~deepimage.inference.logits_for`."""

    model: torch.nn.Module
    meta: RunMeta
    device: torch.device
    preprocess: Preprocess  # the run's, in the precision and layout chosen for this machine

    def logits(self, images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(images))
        return logits_for(self.model, x, self.preprocess, self.device).cpu().numpy()


@dataclass
class OnnxMember:
    """An exported ONNX model (see :mod:`deepimage.serve.export`) run by onnxruntime.

    The graph takes the normalised centre crop; the crop and normalisation are done here by
    the same functions the PyTorch path uses, so both backends see identical inputs.
    """

    session: Any
    meta: RunMeta
    input_name: str = field(default="input")

    @classmethod
    def load(cls, path: str | Path, threads: int | None = None) -> OnnxMember:
        try:
            import onnxruntime as ort
        except ImportError as err:  # pragma: no cover - an install problem
            raise CheckpointError(f"{path}: onnxruntime is not installed ({err})") from None
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own exception types
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise CheckpointError(f"{path}: cannot load ONNX model ({reason})") from None
        props = session.get_modelmeta().custom_metadata_map
        if "deepimage" not in props:
            raise CheckpointError(f"{path}: no deepimage metadata (not exported by deepimage)")
        try:
            data = json.loads(props["deepimage"])
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{path}: deepimage metadata is not JSON ({err})") from None
        return cls(session, RunMeta.from_dict(data, path), session.get_inputs()[0].name)

    def logits(self, images: np.ndarray) -> np.ndarray:
        pre = self.meta.preprocess.running("fp32", channels_last=False)  # the graph's input
        x = model_input(torch.from_numpy(np.ascontiguousarray(images)), pre)
        return self.session.run(None, {self.input_name: x.numpy()})[0]


def _softmax(logits: np.ndarray) -> np.ndarray:
    return torch.softmax(torch.from_numpy(np.asarray(logits, np.float32)), dim=1).numpy()


@dataclass
class Predictor:
    """Loaded member models with their preprocessing; turns images into class posteriors."""

    members: list[Member]
    backend: str = "torch"
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    views: list[View] = field(init=False)

    def __post_init__(self) -> None:
        if not self.members:
            raise ValueError("a predictor needs at least one model")
        views: list[View] = []
        for member in self.members:
            view = member.meta.preprocess.view
            if view not in views:
                views.append(view)
        self.views = views

    @classmethod
    def load(
        cls,
        source: str | Path | Sequence[str | Path],
        device: str = "auto",
        *,
        backend: str = "auto",
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        threads: int | None = None,
        precision: str | None = None,
    ) -> Predictor:
        """Load a run folder, a weights file, an ensemble manifest (or folder holding one),
        several of these, or (``backend`` ``onnx`` or a ``.onnx`` path) an exported model.

        PyTorch members run in ``precision`` (None: the fastest correct one for the device,
        see :func:`~deepimage.inference.inference_execution`)."""
        sources = [source] if isinstance(source, str | Path) else list(source)
        onnx = backend == "onnx" or (
            backend == "auto" and all(str(s).endswith(".onnx") for s in sources)
        )
        if onnx:
            for s in sources:
                if not Path(s).is_file():
                    raise CheckpointError(f"{s}: no such ONNX file")
            members: list[Member] = [OnnxMember.load(s, threads) for s in sources]
            _check_classes(members, sources)
            return cls(members, "onnx", max_pixels)
        if backend not in ("auto", "torch"):
            raise ValueError(f"unknown backend {backend!r}; known: auto, torch, onnx")
        from deepimage.ensemble import load_members

        for s in sources:
            if not Path(s).exists():
                raise CheckpointError(f"{s}: no such run folder, weights file or manifest")
        dev = resolve_device(device)
        loaded = load_members(sources, dev)
        members = []
        for model, meta in loaded:
            members.append(
                TorchMember(model, meta, dev, inference_execution(model, meta, dev, precision))
            )
        return cls(members, "torch", max_pixels)

    @property
    def meta(self) -> RunMeta:
        """The first member's metadata (classes and names are shared by all members)."""
        return self.members[0].meta

    @property
    def classes(self) -> list[str]:
        return list(self.meta.classes)

    @property
    def name(self) -> str:
        """The model's name, ``a + b`` for an ensemble."""
        return " + ".join(m.meta.model for m in self.members)

    def load_image(self, source: ImageSource) -> tuple[np.ndarray, ...]:
        """Decode and resize exactly as the store does for evaluation: one array per view.

        Raises :class:`~deepimage.data.decode.DecodeError` with a one-line reason.
        """
        if not isinstance(source, bytes | bytearray | memoryview):
            source = str(source)
        return tuple(
            decode_image(source, size, mode=mode, max_pixels=self.max_pixels)  # type: ignore[arg-type]
            for size, mode in self.views
        )

    def stack(self, images: Sequence[tuple[np.ndarray, ...]]) -> list[np.ndarray]:
        """Per-image view tuples (from :meth:`load_image`) to one batch array per view."""
        return [np.stack([image[v] for image in images]) for v in range(len(self.views))]

    def probabilities(self, batch: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """Mean softmax posteriors over the members, ``(B, classes)``.

        ``batch`` holds one ``(B, S, S, 3)`` uint8 array per view (a single array is fine
        when there is one view).
        """
        if isinstance(batch, np.ndarray):
            batch = [batch]
        if len(batch) != len(self.views):
            raise ValueError(f"expected {len(self.views)} views, got {len(batch)}")
        total = None
        for member in self.members:
            view = member.meta.preprocess.view
            probs = _softmax(member.logits(batch[self.views.index(view)]))
            total = probs if total is None else total + probs
        return total / len(self.members)

    def top(self, probs: np.ndarray, k: int) -> list[dict[str, Any]]:
        """The ``k`` most probable classes, most probable first."""
        order = np.argsort(-probs, kind="stable")[: max(0, min(k, len(probs)))]
        classes = self.meta.classes
        return [
            {
                "class_index": int(i),
                "class_id": classes[i],
                "name": self.meta.name_of(classes[i]),
                "probability": float(probs[i]),
            }
            for i in order
        ]

    def predict_files(self, paths: list[str | Path], topk: int = 5) -> list[dict[str, Any]]:
        """One result per path, in order; an undecodable file gets an ``error`` entry."""
        results: list[dict[str, Any]] = []
        for path in paths:
            try:
                image = self.load_image(path)
            except (DecodeError, OSError) as err:
                results.append({"path": str(path), "error": str(err)})
                continue
            probs = self.probabilities(self.stack([image]))[0]
            results.append({"path": str(path), "top": self.top(probs, topk)})
        return results


def _check_classes(members: Sequence[Member], sources: Sequence[str | Path]) -> None:
    first = members[0].meta.classes
    for member, source in zip(members[1:], sources[1:]):
        if member.meta.classes != first:
            raise CheckpointError(f"{source}: classes differ from those of {sources[0]}")


def format_prediction(result: dict[str, Any]) -> str:
    """Lines like ``n02123045 tabby, tabby cat  0.83`` under the file name."""
    lines = [str(result["path"])]
    if "error" in result:
        lines.append(f"  error: {result['error']}")
        return "\n".join(lines)
    width = max(len(f"{p['class_id']} {p['name']}".strip()) for p in result["top"])
    for p in result["top"]:
        label = f"{p['class_id']} {p['name']}".strip()
        lines.append(f"  {label:<{width}}  {p['probability']:.4f}")
    return "\n".join(lines)
