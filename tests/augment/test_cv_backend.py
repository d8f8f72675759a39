"""The OpenCV backend: the same augmentation as the torch path up to interpolation rounding,
chosen automatically on CPU, and reading only crop windows from a store."""

import numpy as np
import pytest
import torch

from deepimage.augment.ops import _Normalise, apply_params, apply_to_sources, resolve_backend
from deepimage.augment.pipeline import PRESETS, build_train_augment
from deepimage.data.loader import read_windows
from tests.augment.conftest import RAW, STATS

S, C = 64, 48
WARPED = PRESETS["deepimage"].replace(rotation={"p": 1.0}, lens={"p": 1.0}, lighting={"p": 0.5})


def photos(n: int = 12, size: int = S, seed: int = 1) -> torch.Tensor:
    """Smooth shading with hard-edged blocks: the interpolation differences show at edges."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = []
    for _ in range(n):
        f, ph = rng.uniform(0.05, 0.3, 3), rng.uniform(0, 6, 3)
        img = np.stack(
            [127 + 100 * np.sin(f[c] * xx + ph[c]) * np.cos(f[c - 1] * yy) for c in range(3)], -1
        )
        y0, x0 = rng.integers(0, size - 8, 2)
        img[y0:, x0:] = rng.integers(0, 256, 3)
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return torch.from_numpy(np.stack(out))


def make(cfg, backend, size=S):
    return build_train_augment(cfg, size=size, crop=C, seed=3, stats=STATS, backend=backend, **RAW)


def test_auto_is_cv2_on_cpu_and_torch_on_other_devices():
    assert resolve_backend(None, torch.device("cpu")) == "cv2"
    assert resolve_backend("auto", torch.device("cuda")) == "torch"
    assert resolve_backend("torch", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("numba", torch.device("cpu"))
    with pytest.raises(ValueError, match="CPU"):
        resolve_backend("cv2", torch.device("cuda"))
    with pytest.raises(ValueError, match="backend"):
        make(PRESETS["deepimage"], "nope")
    images, rows = photos(), np.arange(12)
    aug = make(WARPED, "auto")
    params = aug.params(rows, 0)
    cv2_path = apply_params(images, params, C, **RAW, backend="cv2")
    assert torch.equal(aug(images, rows, 0), cv2_path)


@pytest.mark.parametrize("epoch", [0, 1, 2])
def test_cv2_differs_from_grid_sample_by_rounding_only(epoch):
    images, rows = photos(), np.arange(12)
    fast = make(WARPED, "cv2")(images, rows, epoch)
    exact = make(WARPED, "torch")(images, rows, epoch)
    assert make(WARPED, "cv2").params(rows, epoch).warps().all()
    diff = (fast - exact).abs()  # grey levels: RAW normalisation
    assert float(diff.mean()) < 0.5 and float(diff.max()) < 1.0


def test_cv2_folds_the_resize_like_grid_sample():
    images, rows = photos(6, size=150), np.arange(6)
    sources = [images[0], images[1, :, :100], images[2, :90], images[3], images[4], images[5]]
    aug, norm = make(WARPED, "cv2"), _Normalise(RAW["mean"], RAW["std"])
    p = aug.params(rows, 1)
    for mode in ("stretch", "shorter"):
        fast = apply_to_sources(sources, p, S, C, norm, mode, backend="cv2")
        exact = apply_to_sources(sources, p, S, C, norm, mode, backend="torch")
        diff = (fast - exact).abs()
        assert float(diff.mean()) < 0.5 and float(diff.max()) < 1.0


def test_unwarped_images_are_exact_on_cv2():
    cfg = PRESETS["crop_flip"].replace(cast={"p": 0.5}, vignette={"p": 0.5}, lighting={"p": 0.5})
    images, rows = photos(), np.arange(12)
    fast = make(cfg, "cv2")(images, rows, 0)
    exact = make(cfg, "torch")(images, rows, 0)
    p = make(cfg, "cv2").params(rows, 0)
    assert (p.vignette_strength > 0).any() and p.cast.any() and p.flip.any()
    assert torch.allclose(fast, exact, atol=1e-3)


def test_clipping_of_casts_and_lighting_on_cv2():
    images = photos(4)
    images[:, :, :, 0] = 250
    images[:, :, :, 1] = 5
    aug = make(PRESETS["none"], "cv2")
    p = aug.params(np.arange(4), 0)
    p.cast[:] = torch.tensor([20.0, -20.0, 0.0])
    p.light[:2] = torch.tensor([0.25, 0.5, -0.75])  # non-integer shifts take the float path
    p.vignette_strength[3] = 0.5
    p.vignette_radius[3] = 0.2
    fast = apply_params(images, p, C, **RAW, backend="cv2")
    exact = apply_params(images, p, C, **RAW, backend="torch")
    assert torch.allclose(fast, exact, atol=1e-3)
    assert fast[:, 0].max() == 255 and fast[:, 1].min() == 0


def test_crop_windows_give_the_whole_image_result():
    images, rows = photos(), np.arange(20, 32)
    store = images.numpy()  # row r of the "store" is image r - 20
    for backend in ("cv2", "torch"):
        aug = make(WARPED, backend)
        whole = aug(images, rows, 4).clone()
        p = aug.params(rows, 4)
        windows = read_windows(store, rows - 20, p.top.numpy(), p.left.numpy(), C)
        assert windows.shape == (12, C, C, 3)
        assert np.array_equal(
            windows[5], store[5, p.top[5] : p.top[5] + C, p.left[5] : p.left[5] + C]
        )
        got = aug.apply_windows(torch.from_numpy(windows), p)
        assert torch.allclose(got, whole, atol=1e-4)
        shifted = np.concatenate([np.zeros((20, S, S, 3), np.uint8), store])
        assert torch.allclose(aug.from_store(shifted, rows, 4), whole, atol=1e-4)
        if backend == "cv2":
            assert torch.equal(got, whole)
            assert torch.equal(aug.from_store(shifted, rows, 4), whole)
    with pytest.raises(ValueError, match="windows"):
        aug.apply_windows(images, p)
