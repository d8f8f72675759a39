"""Export a trained model to ONNX or TorchScript, then check parity with PyTorch.

The exported graph takes the normalised centre crop ``(N, 3, crop, crop)`` float32 with a
dynamic batch axis and returns logits. Everything needed to get from a photo to that input
(source size, resize mode, crop, mean, std) and the classes with their names is stored in
the file: ONNX ``metadata_props["deepimage"]``, TorchScript extra file ``deepimage.json``,
both the JSON of the run's weights metadata plus a ``preprocessing`` note.

Parity: sample images are decoded and preprocessed exactly as ``predict`` does, and the
exported model's logits (onnxruntime, or the loaded TorchScript module) are compared with
the PyTorch model's in fp32. The file is written atomically only when the maximum
absolute difference is below the tolerance.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepimage.data.decode import DecodeError, decode_image
from deepimage.files import atomic_write
from deepimage.inference import model_input
from deepimage.runmeta import CheckpointError, Preprocess, RunMeta
from deepimage.runs import load_model

logger = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript")
TOLERANCE = 1e-4
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
PREPROCESSING = (
    "decode to RGB; resize to size x size (resize_mode 'stretch' ignores the aspect ratio, "
    "'shorter' scales the shorter side and centre-crops); centre crop crop x crop; "
    "x = (pixel / 255 - mean) / std per channel; NCHW float32; output: logits"
)


class ParityError(ValueError):
    """The exported model's logits differ from PyTorch's by more than the tolerance."""


def exported(meta: RunMeta) -> RunMeta:
    """The run's metadata as the exported graph runs: fp32, NCHW."""
    pre = meta.preprocess.running("fp32", channels_last=False)
    return dataclasses.replace(meta, preprocess=pre)


def export_meta(meta: RunMeta, fmt: str) -> dict[str, Any]:
    """The exported file's metadata JSON: the run's keys (:meth:`RunMeta.to_dict`, what
    :meth:`RunMeta.from_dict` reads back) plus what a consumer of the file needs to know."""
    return {
        **exported(meta).to_dict(),
        "format": fmt,
        "input": "input",
        "output": "logits",
        "preprocessing": PREPROCESSING,
    }


def sample_images(
    pre: Preprocess, samples: Sequence[str | Path] | None, count: int = 8, seed: int = 0
) -> tuple[np.ndarray, str]:
    """``(N, S, S, 3)`` uint8 images at the model's size and a note of where they came from.

    ``samples`` are image files or folders (the first ``count`` decodable images, sorted);
    without any, seeded random images stand in.
    """
    size, mode = pre.view
    files: list[Path] = []
    for s in samples or []:
        path = Path(s)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            raise ValueError(f"{s}: no such sample image or folder")
    images = []
    for path in files:
        try:
            images.append(decode_image(str(path), size, mode=mode))
        except DecodeError as err:
            logger.warning("sample %s skipped: %s", path, err)
        if len(images) == count:
            break
    if images:
        where = str(samples[0]) if len(samples) == 1 else f"{len(samples)} given paths"
        return np.stack(images), f"{len(images)} sample images ({where})"
    if samples:
        raise ValueError(f"{', '.join(map(str, samples))}: no decodable sample images")
    gen = np.random.default_rng(seed)
    return gen.integers(0, 256, (count, size, size, 3), dtype=np.uint8), "random images"


def _export_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path, meta: dict) -> None:
    import onnx

    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=["input"],
            output_names=["logits"],
            dynamic_shapes=({0: batch},),
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = "deepimage", json.dumps(meta)
    proto.doc_string = f"deepimage {meta['model']}: {PREPROCESSING}"
    onnx.save(proto, str(path))


def _run_onnx(path: Path, x: torch.Tensor) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def _export_torchscript(
    model: torch.nn.Module, example: torch.Tensor, path: Path, meta: dict
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, example, check_trace=False)
        torch.jit.save(traced, str(path), _extra_files={"deepimage.json": json.dumps(meta)})


def _run_torchscript(path: Path, x: torch.Tensor) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.jit.load(str(path), map_location="cpu")
    with torch.inference_mode():
        return module(x).float().numpy()


def read_torchscript_meta(path: str | Path) -> RunMeta:
    """The metadata stored in a TorchScript file written by :func:`export`."""
    extra = {"deepimage.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    if not extra["deepimage.json"]:
        raise CheckpointError(f"{path}: no deepimage metadata")
    try:
        data = json.loads(extra["deepimage.json"])
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: deepimage metadata is not JSON ({err})") from None
    return RunMeta.from_dict(data, path)


def export(
    source: str | Path,
    fmt: str,
    out: str | Path,
    *,
    samples: Sequence[str | Path] | None = None,
    tolerance: float = TOLERANCE,
) -> dict[str, Any]:
    """Export the model at ``source`` (run folder or weights) to ``out``; check parity.

    Returns ``max_abs_diff``, the sample note, the batch sizes checked and the path. Raises
    :class:`ParityError` (leaving no file) when the difference reaches ``tolerance``.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; known: {', '.join(FORMATS)}")
    out = Path(out)
    from deepimage.ensemble import expand_sources

    if expand_sources([source]) != [Path(source)]:
        raise ValueError(f"{source}: an ensemble; export its member runs one at a time")
    model, run_meta = load_model(source, "cpu")
    model = model.float().eval()
    meta = export_meta(run_meta, fmt)
    pre = exported(run_meta).preprocess
    images, note = sample_images(pre, samples)
    x = model_input(torch.from_numpy(images), pre)
    with torch.inference_mode():
        reference = model(x).float().numpy()
    example = x[:2] if len(x) >= 2 else x.repeat(2, 1, 1, 1)
    diff = float("nan")

    def write_checked(tmp: Path) -> None:  # the file is published only if it passes
        nonlocal diff
        if fmt == "onnx":
            _export_onnx(model, example, tmp, meta)
            got = _run_onnx(tmp, x)
            single = _run_onnx(tmp, x[:1])
        else:
            _export_torchscript(model, example, tmp, meta)
            got = _run_torchscript(tmp, x)
            single = _run_torchscript(tmp, x[:1])
        diff = float(max(np.abs(got - reference).max(), np.abs(single - reference[:1]).max()))
        if not diff < tolerance:
            raise ParityError(
                f"{out}: parity check failed: max |logit difference| {diff:.3g} >= {tolerance:g}"
            )

    atomic_write(out, write_checked)
    logger.debug("exported %s to %s (max abs logit diff %.3g)", run_meta.model, out, diff)
    return {
        "path": str(out),
        "format": fmt,
        "max_abs_diff": diff,
        "samples": note,
        "batch_sizes": [len(x), 1],
        "tolerance": tolerance,
    }
