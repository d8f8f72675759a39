"""Top-k predictions with class ids, readable names and probabilities for image files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepimage.data.decode import DecodeError, decode_image
from deepimage.inference import logits_for, resolve_device
from deepimage.runs import load_model


@dataclass
class Predictor:
    """A loaded model with its preprocessing; turns images into top-k class posteriors."""

    model: torch.nn.Module
    meta: dict[str, Any]
    device: torch.device

    @classmethod
    def load(cls, source: str | Path, device: str = "auto") -> Predictor:
        dev = resolve_device(device)
        model, meta = load_model(source, dev)
        return cls(model, meta, dev)

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """Softmax posteriors for ``(B, S, S, 3)`` uint8 images already resized to S."""
        meta = self.meta
        logits = logits_for(
            self.model,
            torch.from_numpy(images),
            meta["crop"],
            meta["mean"],
            meta["std"],
            self.device,
            meta.get("precision", "fp32"),
        )
        return torch.softmax(logits, dim=1).cpu().numpy()

    def load_image(self, source: str | Path | bytes) -> np.ndarray:
        """Decode and resize exactly as the store does for training and evaluation."""
        return decode_image(source, self.meta["size"], mode=self.meta["resize_mode"])

    def top(self, probs: np.ndarray, k: int) -> list[dict[str, Any]]:
        names = self.meta.get("class_names") or {}
        order = np.argsort(-probs, kind="stable")[: min(k, len(probs))]
        classes = self.meta["classes"]
        return [
            {
                "class_index": int(i),
                "class_id": classes[i],
                "name": names.get(classes[i], ""),
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
            probs = self.probabilities(image[None])[0]
            results.append({"path": str(path), "top": self.top(probs, topk)})
        return results


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
