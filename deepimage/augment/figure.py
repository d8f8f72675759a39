"""Figure of the augmentations (like the paper's Figure 4): one row per augmentation applied
alone, and one row for the full pipeline, several samples each."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from deepimage.augment.ops import apply_params
from deepimage.augment.params import Crop, sample_params
from deepimage.augment.pipeline import PRESETS

# ImageNet's RGB PCA (0..1 units), as published with AlexNet-style lighting code
IMAGENET_PCA = {
    "eigval": [0.2175, 0.0188, 0.0045],
    "eigvec": [[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]],
}

# each row: (label, the settings changed from "none", probabilities forced to 1)
ROWS: list[tuple[str, dict]] = [
    ("original (centre crop)", {}),
    ("cropping", {"crop": Crop(random=True)}),
    ("flipping", {"flip": {"p": 1.0}}),
    ("rotation", {"rotation": {"p": 1.0}}),
    ("lens distortion", {"lens": {"p": 1.0}}),
    ("colour casting", {"cast": {"p": 0.75}}),
    ("vignetting", {"vignette": {"p": 1.0}}),
    ("PCA lighting (x5)", {"lighting": {"p": 1.0, "std": 0.5}}),
    ("all (deepimage preset)", None),
]


def augmentation_rows(
    image: np.ndarray, crop: int, samples: int = 6, seed: int = 0, stats: dict | None = None
) -> list[tuple[str, np.ndarray]]:
    """``(label, (samples, C, C, 3) uint8)`` per row for one ``(S, S, 3)`` uint8 image."""
    size = image.shape[0]
    batch = torch.from_numpy(np.ascontiguousarray(image))[None].expand(samples, -1, -1, -1)
    stats = stats or IMAGENET_PCA
    out = []
    for label, change in ROWS:
        cfg = PRESETS["deepimage"] if change is None else PRESETS["none"].replace(**change)
        params = sample_params(cfg, seed, 0, np.arange(samples), size, crop, stats)
        x = apply_params(batch, params, crop, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
        pixels = (x.permute(0, 2, 3, 1) * 255).round().clamp(0, 255).to(torch.uint8)
        out.append((label, pixels.numpy()))
    return out


def draw_grid(rows: list[tuple[str, np.ndarray]], path: str | Path, gap: int = 4) -> Path:
    """Write the rows as one PNG, labels on the left."""
    n, crop = rows[0][1].shape[0], rows[0][1].shape[1]
    label_w = 170
    w = label_w + n * (crop + gap)
    h = len(rows) * (crop + gap) + gap
    canvas = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    try:
        font = ImageFont.load_default(size=15)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    for r, (label, images) in enumerate(rows):
        y = gap + r * (crop + gap)
        draw.text((6, y + crop // 2 - 8), label, fill=(0, 0, 0), font=font)
        for i, img in enumerate(images):
            canvas.paste(Image.fromarray(img), (label_w + i * (crop + gap), y))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
