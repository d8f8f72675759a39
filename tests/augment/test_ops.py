"""One suite over every augmentation: identity at p = 0, replay, shapes, documented ranges,
exact crop and flip, vignetting and lens distortion geometry, whole-image coverage."""

import dataclasses

import numpy as np
import pytest
import torch

from deepimage.augment.ops import (
    apply_params,
    grid_coefficients,
    sampling_grid,
    vignette_factor,
    warp,
)
from deepimage.augment.params import AugmentParams, fit_zoom, sample_params
from deepimage.augment.pipeline import PRESETS, build_train_augment
from deepimage.data.transforms import center_crop, to_model_input
from tests.augment.conftest import RAW, STATS

ONLY = {  # each augmentation alone, always applied
    "crop": {"crop": {"random": True}},
    "flip": {"flip": {"p": 1.0}},
    "rotation": {"rotation": {"p": 1.0}},
    "lens": {"lens": {"p": 1.0}},
    "vignette": {"vignette": {"p": 1.0}},
    "cast": {"cast": {"p": 1.0}},
    "lighting": {"lighting": {"p": 1.0}},
}
OFF = {  # the same augmentation at probability 0
    "crop": {"crop": {"random": False}},
    "flip": {"flip": {"p": 0.0}},
    "rotation": {"rotation": {"p": 0.0}},
    "lens": {"lens": {"p": 0.0}},
    "vignette": {"vignette": {"p": 0.0}},
    "cast": {"cast": {"p": 0.0}},
    "lighting": {"lighting": {"p": 0.0}},
}
C = 32


def make(cfg, seed=0, backend="auto", **norm):
    norm = norm or RAW
    return build_train_augment(
        cfg, size=40, crop=C, seed=seed, stats=STATS, backend=backend, **norm
    )


def raw(x: torch.Tensor) -> torch.Tensor:
    """Model input made with RAW normalisation back to (B, C, C, 3) pixel values."""
    return x.permute(0, 2, 3, 1)


def centre(images: torch.Tensor) -> torch.Tensor:
    return center_crop(images, C).float()


# every operation on for every image, lighting included
FULL = PRESETS["deepimage"].replace(
    lighting={"p": 1.0}, **{n: {"p": 1.0} for n in ("flip", "rotation", "lens", "vignette", "cast")}
)


def _without(name: str, p: AugmentParams) -> AugmentParams:
    """``p`` with one operation's parameters at "not applied" (the geometry's zoom refitted)."""
    n = len(p)
    zero = torch.zeros(n, dtype=torch.float64)
    change = {
        "crop": {"top": torch.full((n,), (40 - C) // 2), "left": torch.full((n,), (40 - C) // 2)},
        "flip": {"flip": torch.zeros(n, dtype=torch.bool)},
        "rotation": {"angle": zero},
        "lens": {"lens_k": zero, "stretch": zero},
        "vignette": {"vignette_radius": zero, "vignette_strength": zero},
        "cast": {"cast": torch.zeros(n, 3, dtype=torch.float64)},
        "lighting": {"light": torch.zeros(n, 3, dtype=torch.float64)},
    }[name]
    q = dataclasses.replace(p, **change)
    zoom = fit_zoom(q.angle.numpy(), q.lens_k.numpy(), q.stretch.numpy(), C)
    return dataclasses.replace(q, zoom=torch.from_numpy(zoom))


@pytest.mark.parametrize("name", list(ONLY))
def test_probability_zero_turns_one_operation_off_inside_the_full_pipeline(images, name):
    """With every other operation applied to every image, p = 0 for one operation gives
    exactly the full pipeline's images with that operation's parameters at "not applied":
    no draw of it leaks through and no other operation's draws move."""
    on = make(FULL)
    off = make(FULL.replace(**OFF[name]))
    rows = np.arange(20, 28)
    expected = _without(name, on.params(rows, 1))
    got = off.params(rows, 1)
    for key, value in expected.as_dict().items():
        assert torch.equal(getattr(got, key), value), f"{name} off: {key} differs"
    x = off(images, rows, 1)
    assert torch.equal(x, on.apply(images, expected))
    changed = (x - on(images, rows, 1)).abs().flatten(1).amax(1) > 1e-3
    assert changed.sum() >= 6  # the operation does act in this pipeline


def test_every_operation_off_is_the_centre_crop(images):
    every_off = FULL.replace(**{k: v for o in OFF.values() for k, v in o.items()})
    assert torch.equal(raw(make(every_off)(images, np.arange(8), 3)), centre(images))
    identity = AugmentParams.identity(8, 40, C)
    assert torch.equal(raw(apply_params(images, identity, C, **RAW)), centre(images))


@pytest.mark.parametrize("name", [*ONLY, "all"])
def test_replay_shapes_and_dtypes(images, name):
    cfg = PRESETS["deepimage"] if name == "all" else PRESETS["none"].replace(**ONLY[name])
    aug = make(cfg, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    rows = np.arange(10, 18)
    x = aug(images, rows, 2)
    assert x.shape == (8, 3, C, C) and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)
    params = aug.params(rows, 2)
    assert torch.equal(aug.apply(images, params), x)
    assert torch.equal(aug.apply(images, params), aug.apply(images, params))
    if name not in ("flip",):  # flips of 8 images could all agree across epochs
        assert not torch.equal(aug(images, rows, 3), x) or name == "lighting"


def test_a_cast_changes_each_altered_channel_by_exactly_its_integer(images):
    aug = make(PRESETS["none"].replace(cast={"p": 0.5}))
    p = aug.params(np.arange(8), 0)
    cast = p.cast.numpy()
    assert (cast == np.round(cast)).all() and np.abs(cast).max() <= 20 and (cast != 0).any()
    diff = raw(aug.apply(images, p)) - centre(images)  # images are 30..220: no clipping
    assert torch.equal(diff, torch.from_numpy(cast).float()[:, None, None, :].expand_as(diff))


def test_casts_clip_to_the_pixel_range():
    white = torch.full((1, 40, 40, 3), 250, dtype=torch.uint8)
    p = AugmentParams.identity(1, 40, C)
    p.cast[:] = torch.tensor([20.0, -20.0, 0.0])
    y = raw(apply_params(white, p, C, **RAW))
    assert torch.equal(y[0, 0, 0], torch.tensor([255.0, 230.0, 250.0]))


def test_pca_lighting_adds_eigvec_alpha_eigval(images):
    aug = make(PRESETS["alexnet"].replace(crop={"random": False}, flip={"p": 0}))
    p = aug.params(np.arange(8), 0)
    light = p.light.numpy()
    assert np.abs(light).max() > 0.5 and np.abs(light).max() < 40
    diff = raw(aug.apply(images, p)) - centre(images)
    expect = torch.from_numpy(light).float()[:, None, None, :].expand_as(diff)
    assert torch.allclose(diff, expect, atol=1e-4)
    with pytest.raises(ValueError, match="stats"):
        build_train_augment("alexnet", size=40, crop=C, seed=0, mean=(0,) * 3, std=(1,) * 3)


def test_crop_and_flip_are_exact(images):
    aug = make(PRESETS["crop_flip"])
    p = aug.params(np.arange(8), 0)
    y = raw(aug.apply(images, p))
    for i in range(8):
        t, lf = int(p.top[i]), int(p.left[i])
        expect = images[i, t : t + C, lf : lf + C].float()
        assert torch.equal(y[i], expect.flip(1) if p.flip[i] else expect)
    assert p.flip.any() and not p.flip.all() and len(set(p.top.tolist())) > 1


def test_vignetting_darkens_monotonically_with_radius():
    grey = torch.full((1, 40, 40, 3), 200, dtype=torch.uint8)
    p = AugmentParams.identity(1, 40, C)
    p.vignette_radius[:] = 0.3
    p.vignette_strength[:] = 0.5
    y = raw(apply_params(grey, p, C, **RAW))[0, :, :, 0]
    diag = torch.stack([y[i, i] for i in range(C // 2)]).flip(0)  # centre -> corner
    assert (diag[1:] <= diag[:-1] + 1e-4).all()
    assert y[C // 2, C // 2] == 200 and abs(float(y[0, 0]) - 100) < 1e-3  # corner: 1 - 0.5
    v = vignette_factor(torch.tensor([0.3]), torch.tensor([0.5]), C)
    assert v.min() >= 0.5 - 1e-6 and v.max() == 1


def test_zero_degree_lens_distortion_is_the_identity_warp(images):
    p = AugmentParams.identity(8, 40, C)
    coef = grid_coefficients(p, C)
    windows = center_crop(images, C)
    y = warp(windows, coef, C)
    assert torch.allclose(y, windows.float(), atol=1e-3)
    zero_k = coef.copy()
    zero_k[:, 6] = 0.0
    assert torch.equal(sampling_grid(zero_k, C), sampling_grid(coef, C))


def _dot_image(x: int, y: int) -> torch.Tensor:
    img = torch.zeros(1, 40, 40, 3, dtype=torch.uint8)
    img[0, y - 1 : y + 2, x - 1 : x + 2] = 255
    return img


def _centroid(y: torch.Tensor) -> tuple[float, float]:
    w = y[0, :, :, 0].double()
    ys, xs = torch.meshgrid(torch.arange(C), torch.arange(C), indexing="ij")
    return float((w * xs).sum() / w.sum()), float((w * ys).sum() / w.sum())


@pytest.mark.parametrize("k", [0.2, -0.2])
def test_barrel_moves_points_toward_the_centre_pincushion_away(k):
    img = _dot_image(31, 9)  # up-right of the centre (19.5, 19.5) of the 40x40 image
    p = AugmentParams.identity(1, 40, C)
    x0, y0 = _centroid(raw(apply_params(img, p, C, **RAW)))
    p.lens_k[:] = k  # zoom stays 1: only the radial map acts
    x1, y1 = _centroid(raw(apply_params(img, p, C, **RAW)))
    c = (C - 1) / 2
    r0, r1 = np.hypot(x0 - c, y0 - c), np.hypot(x1 - c, y1 - c)
    assert (r1 < r0 - 0.5) if k > 0 else (r1 > r0 + 0.5)
    assert abs(np.arctan2(y1 - c, x1 - c) - np.arctan2(y0 - c, x0 - c)) < 0.05  # radial


def test_positive_angles_turn_the_content_counter_clockwise():
    img = _dot_image(31, 20)  # right of the centre
    p = AugmentParams.identity(1, 40, C)
    p.angle[:] = 10.0
    x1, y1 = _centroid(raw(apply_params(img, p, C, **RAW)))
    assert y1 < (C - 1) / 2 - 1  # moved up: counter-clockwise on screen (y points down)


def test_sampled_warps_never_leave_the_crop_window():
    cfg = PRESETS["deepimage"].replace(rotation={"p": 1.0}, lens={"p": 1.0})
    p = sample_params(cfg, 0, 0, np.arange(400), 40, C)
    grid = sampling_grid(grid_coefficients(p, C), C)
    assert grid.abs().max() <= 1 + 1e-5


def test_stretch_widens_horizontally():
    img = torch.zeros(1, 40, 40, 3, dtype=torch.uint8)
    img[0, :, 16:24] = 255  # a vertical bar 8 pixels wide
    p = AugmentParams.identity(1, 40, C)
    p.stretch[:] = 0.18
    y = raw(apply_params(img, p, C, **RAW))[0, C // 2, :, 0]
    assert float((y > 127).sum()) >= 9  # 8 * 1.18


def test_batch_splits_and_orders_give_identical_images(images):
    aug = make(PRESETS["deepimage"], mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    rows = np.array([5, 9, 2, 7, 11, 3, 8, 1])
    whole = aug(images, rows, 4)
    parts = torch.cat([aug(images[:3], rows[:3], 4), aug(images[3:], rows[3:], 4)])
    assert torch.equal(whole, parts)
    order = np.array([6, 0, 3, 7, 1, 5, 2, 4])
    assert torch.equal(aug(images[order], rows[order], 4), whole[order])
    single = torch.cat([aug(images[i : i + 1], rows[i : i + 1], 4) for i in range(8)])
    assert torch.equal(single, whole)
    again = make(PRESETS["deepimage"], mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    assert torch.equal(again(images, rows, 4), whole)  # a resumed run rebuilds the same


def test_output_buffer_is_reused_only_when_free(images):
    aug = make(PRESETS["deepimage"])
    x = aug(images, np.arange(8), 0)
    first = x.clone()
    y = aug(images, np.arange(8), 1)
    assert torch.equal(x, first)  # x still alive: y got a new buffer
    assert not torch.equal(x, y)
    del x, y
    z = aug(images, np.arange(8), 0)
    assert torch.equal(z, first)


def test_an_augment_pickles_without_its_buffer(images):
    import pickle

    aug = make(PRESETS["deepimage"])
    x = aug(images, np.arange(8), 0)
    copy = pickle.loads(pickle.dumps(aug))
    assert copy._buffer is None and torch.equal(copy(images, np.arange(8), 0), x)


def test_normalisation_matches_the_shared_transform(images):
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    aug = build_train_augment("none", size=40, crop=C, seed=0, mean=mean, std=std)
    x = aug(images, np.arange(8), 0)
    assert torch.allclose(x, to_model_input(center_crop(images, C), mean, std), atol=1e-5)


def test_one_source_folds_the_resize_into_the_warp(images):
    """A 2x nearest-upsampled source, augmented with its resize folded in, equals the
    original through the store path wherever the geometry needs no interpolation."""
    aug = make(PRESETS["crop_flip"].replace(cast={"p": 0.5}, vignette={"p": 0.5}))
    big = images.repeat_interleave(2, 1).repeat_interleave(2, 2)
    store = aug(images, np.arange(8), 1)
    rows = np.arange(8)
    assert torch.allclose(aug.sources(list(big), rows, 1), store, atol=2e-3)
    assert torch.allclose(aug.sources(list(images), rows, 1), store, atol=2e-3)
    mixed = [big[0], images[1], big[2, :, :70]]
    x = aug.sources(mixed, rows[:3], 1, mode="shorter")
    assert x.shape == (3, 3, C, C) and x.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(x[:2], store[:2], atol=2e-3)


def test_params_can_be_inspected_and_edited(images):
    aug = make(PRESETS["deepimage"])
    p = aug.params(np.arange(8), 0)
    q = dataclasses.replace(p, cast=torch.zeros_like(p.cast))
    assert not torch.equal(aug.apply(images, q), aug.apply(images, p)) or not p.cast.any()
    assert len(p.select(np.array([1, 3]))) == 2


def test_the_batched_path_of_accelerators_matches_per_image(images):
    """The whole-batch code path (used on CUDA) run on CPU: same images as per image."""
    cfg = PRESETS["deepimage"].replace(lighting={"p": 0.5})
    aug = make(cfg, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    p = aug.params(np.arange(8), 1)
    assert p.warps().any() and not p.warps().all() and (p.vignette_strength > 0).any()
    torch_path = dict(backend="torch")
    per = apply_params(images, p, C, aug.mean, aug.std, per_image=True, **torch_path)
    batched = apply_params(images, p, C, aug.mean, aug.std, per_image=False, **torch_path)
    assert batched.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(batched, per, atol=1e-4)
    half = apply_params(
        images[:3], p.select(slice(0, 3)), C, aug.mean, aug.std, per_image=False, **torch_path
    )
    assert torch.allclose(half, batched[:3], atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu(images):
    aug = make(PRESETS["deepimage"], mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    rows = np.arange(8)
    cpu = make(PRESETS["deepimage"], backend="torch", mean=aug.mean, std=aug.std)(images, rows, 0)
    gpu = aug(images.cuda(), rows, 0)
    assert gpu.is_cuda and gpu.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(gpu.cpu(), cpu, atol=1e-3)
    parts = torch.cat([aug(images[:3].cuda(), rows[:3], 0), aug(images[3:].cuda(), rows[3:], 0)])
    assert torch.equal(parts, gpu)
