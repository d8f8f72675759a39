"""Sampling: keyed draws, the discrete grids and Table 1 counted from the sampler itself."""

import numpy as np
import pytest

from deepimage.augment.params import (
    AugmentConfig,
    Rotation,
    augment_config_from_dict,
    cast_values,
    lens_ks,
    rotation_angles,
    sample_params,
    stretch_levels,
    vignette_radii,
    vignette_strengths,
)
from deepimage.augment.table import PAPER, count, format_table, table
from deepimage.rng import keyed_uniform


def test_keyed_uniform_depends_only_on_the_key():
    all_rows = keyed_uniform(3, 1, np.arange(100), 4)
    some = keyed_uniform(3, 1, np.array([42, 7]), 4)
    assert np.array_equal(some, all_rows[[42, 7]])
    assert not np.array_equal(keyed_uniform(3, 2, [42], 4), all_rows[[42]])
    assert not np.array_equal(keyed_uniform(4, 1, [42], 4), all_rows[[42]])
    assert all_rows.min() >= 0 and all_rows.max() < 1
    assert abs(keyed_uniform(0, 0, np.arange(20000), 1).mean() - 0.5) < 0.01


def test_params_are_a_function_of_seed_epoch_row_only():
    cfg = AugmentConfig()
    a = sample_params(cfg, 5, 2, np.arange(50), 64, 48)
    b = sample_params(cfg, 5, 2, np.array([31, 4, 17]), 64, 48)
    for key, value in b.as_dict().items():
        assert np.array_equal(value.numpy(), a.as_dict()[key].numpy()[[31, 4, 17]]), key
    c = sample_params(cfg, 5, 3, np.arange(50), 64, 48)
    assert not np.array_equal(a.angle.numpy(), c.angle.numpy())


def test_table_1_from_the_sampler_equals_the_paper():
    counts = table(AugmentConfig(), size=512, crop=224)
    assert {k: counts[k] for k in PAPER} == PAPER
    assert counts["product"] == 68920 * 1960 * 260 * 20 * 2 * 82944
    text = format_table(counts)
    assert "68,920" in text and "82,944" in text


def test_counts_follow_the_settings():
    assert count(AugmentConfig(rotation=Rotation(steps=5)), "rotation") == 10
    assert count(AugmentConfig(), "crop", size=256, crop=224) == 32 * 32
    assert count(AugmentConfig().replace(cast={"max_shift": 1}), "cast") == 26
    assert count(AugmentConfig().replace(rotation={"p": 0.0}), "rotation") == 0


def test_heavy_sampling_reaches_exactly_the_grids():
    """The keyed sampler's draws cover every grid point, and nothing else."""
    cfg = AugmentConfig()
    p = sample_params(cfg, 1, 0, np.arange(120_000), 40, 32)
    angles = p.angle.numpy()
    assert set(angles[angles != 0]) == set(rotation_angles(cfg.rotation))
    on = p.lens_k.numpy() != 0
    pairs = set(zip(p.lens_k.numpy()[on], p.stretch.numpy()[on]))
    assert len(pairs) == 260
    assert pairs == {(k, s) for k in lens_ks(cfg.lens) for s in stretch_levels(cfg.lens)}
    on = p.vignette_strength.numpy() != 0
    pairs = set(zip(p.vignette_radius.numpy()[on], p.vignette_strength.numpy()[on]))
    assert len(pairs) == 1960
    assert pairs == {
        (r, s) for r in vignette_radii(cfg.vignette) for s in vignette_strengths(cfg.vignette)
    }
    cast = p.cast.numpy()
    for ch in range(3):
        assert set(cast[:, ch]) == set(cast_values(cfg.cast))
        assert 0.48 < (cast[:, ch] != 0).mean() * 41 / 40 < 0.52  # altered with p = 0.5
    assert set(p.flip.numpy()) == {False, True}
    for name in ("angle", "lens_k", "vignette_strength"):  # each applied with p = 0.5
        assert 0.48 < (getattr(p, name).numpy() != 0).mean() < 0.52


def test_crop_origins_cover_288_positions_of_512():
    cfg = AugmentConfig().replace(
        flip={"p": 0}, rotation={"p": 0}, lens={"p": 0}, vignette={"p": 0}, cast={"p": 0}
    )
    p = sample_params(cfg, 0, 0, np.arange(20_000), 512, 224)
    assert set(p.top.tolist()) == set(range(288)) and set(p.left.tolist()) == set(range(288))


def test_zoom_keeps_the_warp_inside_the_crop():
    p = sample_params(AugmentConfig(), 0, 0, np.arange(2000), 64, 48)
    z = p.zoom.numpy()
    assert (z[~p.warps().numpy()] == 1).all()
    assert z.min() > 0.5 and z.max() < 1.3


def test_config_from_dict_checks_names():
    cfg = augment_config_from_dict({"rotation": {"p": 0.25, "steps": 3}})
    assert cfg.rotation == Rotation(p=0.25, steps=3)
    with pytest.raises(ValueError, match="unknown augmentation"):
        augment_config_from_dict({"rotate": {"p": 1}})
    with pytest.raises(ValueError, match="unknown keys"):
        augment_config_from_dict({"rotation": {"angle": 1}})
    with pytest.raises(ValueError, match="p must be"):
        augment_config_from_dict({"flip": {"p": 1.5}})
    with pytest.raises(ValueError, match="lens"):
        augment_config_from_dict({"lens": {"k_step": 0.1}})
