import numpy as np
import pytest
import torch

# unnormalised output: the model input equals the 0..255 pixel values
RAW = {"mean": (0.0, 0.0, 0.0), "std": (1 / 255, 1 / 255, 1 / 255)}
STATS = {
    "eigval": [0.2175, 0.0188, 0.0045],
    "eigvec": [[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]],
}


@pytest.fixture
def images() -> torch.Tensor:
    """Eight 40x40 textured images with values in 30..220 (no clipping by a cast)."""
    rng = np.random.default_rng(0)
    return torch.from_numpy(rng.integers(30, 221, (8, 40, 40, 3), dtype=np.uint8))
