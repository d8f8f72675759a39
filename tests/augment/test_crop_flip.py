import numpy as np
import torch

from deepimage.augment.crop_flip import CropFlipParams, apply_crop_flip, sample_crop_flip
from deepimage.augment.rng import keyed_uniform


def test_keyed_uniform_depends_only_on_the_key():
    all_rows = keyed_uniform(3, 1, np.arange(100), 4)
    some = keyed_uniform(3, 1, np.array([42, 7]), 4)
    assert np.array_equal(some, all_rows[[42, 7]])
    assert not np.array_equal(keyed_uniform(3, 2, [42], 4), all_rows[[42]])
    assert not np.array_equal(keyed_uniform(4, 1, [42], 4), all_rows[[42]])
    assert all_rows.min() >= 0 and all_rows.max() < 1
    assert abs(keyed_uniform(0, 0, np.arange(20000), 1).mean() - 0.5) < 0.01


def test_crop_origins_cover_every_position():
    p = sample_crop_flip(0, 0, np.arange(20000), size=12, crop=8)
    assert set(p.top.tolist()) == set(range(5)) and set(p.left.tolist()) == set(range(5))
    assert 0.45 < p.flip.float().mean() < 0.55


def test_crop_and_flip_are_exact():
    images = torch.randint(0, 255, (3, 10, 10, 3), dtype=torch.uint8)
    p = CropFlipParams(
        torch.tensor([0, 2, 1]), torch.tensor([3, 0, 2]), torch.tensor([0, 1, 0]).bool()
    )
    out = apply_crop_flip(images, p, 6)
    assert out.shape == (3, 6, 6, 3) and out.dtype == torch.uint8
    assert torch.equal(out[0], images[0, 0:6, 3:9])
    assert torch.equal(out[1], images[1, 2:8, 0:6].flip(1))
    assert torch.equal(out[2], images[2, 1:7, 2:8])
