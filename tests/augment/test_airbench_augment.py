"""Alternating flips and padded-crop translations (the airbench preset), keyed like the rest."""

import numpy as np
import pytest
import torch

from deepimage.augment.ops import pad_images
from deepimage.augment.params import AugmentConfig, Crop, Flip, crop_origins, sample_params
from deepimage.augment.pipeline import PRESETS, build_train_augment
from deepimage.augment.table import count
from tests.augment.conftest import RAW

ROWS = np.arange(400)


def test_alternating_flip_inverts_each_images_coin_every_other_epoch():
    cfg = AugmentConfig(flip=Flip(alternate=True))
    flips = [sample_params(cfg, 3, e, ROWS, 32, 32).flip.numpy() for e in range(5)]
    assert 0.4 < flips[0].mean() < 0.6  # the coin itself is fair
    for e in range(1, 5):
        assert np.array_equal(flips[e], flips[0] if e % 2 == 0 else ~flips[0]), e
    # keyed by (seed, row): a subset of rows, another batch split, draws the same
    some = sample_params(cfg, 3, 3, ROWS[[5, 99, 7]], 32, 32).flip.numpy()
    assert np.array_equal(some, flips[3][[5, 99, 7]])
    other_seed = sample_params(cfg, 4, 0, ROWS, 32, 32).flip.numpy()
    assert not np.array_equal(other_seed, flips[0])


def test_plain_flip_is_not_alternating():
    cfg = AugmentConfig(flip=Flip())
    a, b = (sample_params(cfg, 3, e, ROWS, 32, 32).flip.numpy() for e in (0, 1))
    assert not np.array_equal(b, ~a) and not np.array_equal(b, a)


def test_padded_crop_translates_by_up_to_pad_both_ways():
    cfg = AugmentConfig(crop=Crop(pad=2))
    assert list(crop_origins(32, 32, pad=2)) == [0, 1, 2, 3, 4]
    p = sample_params(cfg, 0, 0, np.arange(5000), 32, 32)
    assert set(p.top.tolist()) == set(p.left.tolist()) == {0, 1, 2, 3, 4}
    assert count(cfg, "crop", size=32, crop=32) == 25
    centre = sample_params(AugmentConfig(crop=Crop(random=False, pad=2)), 0, 0, ROWS, 32, 32)
    assert set(centre.top.tolist()) == {2}


def test_reflect_padding_matches_numpy():
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 6, 7, 3), np.uint8))
    want = np.pad(x.numpy(), ((0, 0), (2, 2), (2, 2), (0, 0)), mode="reflect")
    assert np.array_equal(pad_images(x, 2, "reflect").numpy(), want)
    zeros = np.pad(x.numpy(), ((0, 0), (2, 2), (2, 2), (0, 0)))
    assert np.array_equal(pad_images(x, 2, "constant").numpy(), zeros)


@pytest.mark.parametrize("backend", ["torch", "cv2"])
def test_airbench_preset_output_is_a_shifted_mirrored_reflect_pad(backend):
    rng = np.random.default_rng(1)
    images = torch.from_numpy(rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8))
    aug = build_train_augment("airbench", size=32, crop=32, seed=5, backend=backend, **RAW)
    rows = np.arange(100, 116)
    for epoch in (0, 1):
        p = aug.params(rows, epoch)
        out = aug(images, rows, epoch).permute(0, 2, 3, 1).numpy()
        padded = np.pad(images.numpy(), ((0, 0), (2, 2), (2, 2), (0, 0)), mode="reflect")
        for i in range(16):
            t, lf = int(p.top[i]), int(p.left[i])
            want = padded[i, t : t + 32, lf : lf + 32]
            want = want[:, ::-1] if bool(p.flip[i]) else want
            assert np.array_equal(out[i], want.astype(np.float32)), (epoch, i)
    assert not bool((p.top == 2).all())  # some images moved


def test_airbench_preset_from_store_equals_apply():
    rng = np.random.default_rng(2)
    store = rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    aug = build_train_augment("airbench", size=32, crop=32, seed=1, **RAW)
    rows = np.array([3, 17, 8])
    a = aug.from_store(store, rows, 1).clone()
    b = aug(torch.from_numpy(store[rows]), rows, 1)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="pad"):
        aug.apply_windows(torch.from_numpy(store[rows]), aug.params(rows, 0))


def test_bad_pad_settings_are_refused():
    with pytest.raises(ValueError, match="pad_mode"):
        AugmentConfig(crop=Crop(pad=2, pad_mode="wrap"))
    assert PRESETS["airbench"].crop.pad == 2 and PRESETS["airbench"].flip.alternate
