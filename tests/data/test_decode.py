import io
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from deepimage.data import DecodeError, decode_image, open_image, resize_array, resize_image
from deepimage.data.decode import DEFAULT_MAX_PIXELS, resize_pil
from tests.helpers import png_bomb
from tests.helpers.messy import exif_jpeg, marked_rgb, noisy_rgb

DATASETS = Path(__file__).resolve().parents[2].parent / "shared" / "datasets"
RED = np.array([250, 20, 20])
BASE = np.array([40, 90, 200])


def _close(pixel, color, tol=12):
    return np.abs(np.asarray(pixel, int) - np.asarray(color, int)).max() <= tol


# ---------------------------------------------------------------- the messy folder


def test_every_good_file_of_the_messy_folder_decodes(messy_ro):
    root = messy_ro["root"]
    for rel in messy_ro["ok"]:
        full = decode_image(root / rel)
        w, h = messy_ro["sizes"][rel]
        assert full.shape == (h, w, 3) and full.dtype == np.uint8, rel
        assert full.flags.c_contiguous and full.flags.writeable
        if rel in messy_ro["colors"]:
            assert _close(full[h // 2, w // 2], messy_ro["colors"][rel], tol=3), rel
        small = decode_image(root / rel, 7)
        assert small.shape == (7, 7, 3), rel


def test_every_bad_file_of_the_messy_folder_raises_decode_error(messy_ro):
    for rel, why in messy_ro["skipped"].items():
        with pytest.raises(DecodeError) as e:
            decode_image(messy_ro["root"] / rel, 16)
        reason = str(e.value)
        assert reason and "\n" not in reason, rel
        expected = {
            "truncated": "truncated",
            "empty": "empty",
            "too many pixels": "too many pixels",
            "corrupt": "not an image",
            "text": "not an image",
        }[why]
        assert expected in reason, (rel, reason)


def test_missing_file_is_a_decode_error(tmp_path):
    with pytest.raises(DecodeError, match="not found"):
        decode_image(tmp_path / "missing.jpg")


def test_truncated_files_are_not_loaded_and_global_flag_untouched():
    full = io.BytesIO()
    noisy_rgb(64, 48).save(full, "PNG")
    data = full.getvalue()
    with pytest.raises(DecodeError, match="truncated"):
        decode_image(data[: len(data) // 2])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# ---------------------------------------------------------------- modes


def _png(img: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **kwargs)
    return buf.getvalue()


def test_sixteen_bit_is_scaled_not_clipped():
    values = np.array([[0, 255, 257, 1000, 32768, 65535]], np.uint16)
    out = decode_image(_png(Image.fromarray(values)))
    assert out[0, :, 0].tolist() == [0, 1, 1, 4, 128, 255]
    assert np.array_equal(out[..., 0], out[..., 2])


def test_mode_i_and_f_are_scaled():
    i_img = Image.fromarray(np.array([[0, 32768, 65535]], np.int32), "I")
    buf = io.BytesIO()
    i_img.save(buf, "TIFF")
    assert decode_image(buf.getvalue())[0, :, 1].tolist() == [0, 128, 255]
    f_img = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), "F")
    buf = io.BytesIO()
    f_img.save(buf, "TIFF")
    assert decode_image(buf.getvalue())[0, :, 0].tolist() == [0, 128, 255]


def test_transparency_is_composited_on_white():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 2] = 255
    rgba[:, 2:, 3] = 255
    rgba[0, 0, 3] = 128
    out = decode_image(_png(Image.fromarray(rgba, "RGBA")))
    assert out[1, 0].tolist() == [255, 255, 255]
    assert out[1, 3].tolist() == [0, 0, 255]
    assert _close(out[0, 0], (127, 127, 255), tol=2)
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    pal.putpixel((0, 0), 0)
    out = decode_image(_png(pal, transparency=0))
    assert out[0, 0].tolist() == [255, 255, 255] and out[3, 3].tolist() == [0, 200, 0]
    la = decode_image(_png(Image.new("LA", (2, 2), (0, 0))))
    assert la[0, 0].tolist() == [255, 255, 255]
    keyed = Image.new("RGB", (2, 2), (10, 20, 30))
    keyed.putpixel((0, 0), (1, 2, 3))
    out = decode_image(_png(keyed, transparency=(1, 2, 3)))  # PNG colour-key transparency
    assert out[0, 0].tolist() == [255, 255, 255] and out[1, 1].tolist() == [10, 20, 30]


def test_cmyk_grey_palette_and_binary_become_rgb():
    buf = io.BytesIO()
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(buf, "JPEG", quality=95)
    assert _close(decode_image(buf.getvalue())[8, 8], (255, 0, 0), tol=3)
    assert decode_image(_png(Image.new("L", (3, 3), 77)))[1, 1].tolist() == [77, 77, 77]
    assert decode_image(_png(Image.new("1", (3, 3), 1)))[1, 1].tolist() == [255, 255, 255]
    pal = Image.new("RGB", (3, 3), (10, 20, 30)).quantize(4)
    assert pal.mode == "P"
    assert decode_image(_png(pal))[1, 1].tolist() == [10, 20, 30]


@pytest.mark.parametrize(
    ("orientation", "marker_corner"),
    [(6, (0, -1)), (8, (-1, 0)), (3, (-1, -1)), (1, (0, 0))],
)
def test_exif_orientation_is_applied(orientation, marker_corner):
    data = exif_jpeg(marked_rgb(40, 24), orientation)
    out = decode_image(data)
    rotated = orientation in (6, 8)
    assert out.shape == ((40, 24, 3) if rotated else (24, 40, 3))
    r, c = marker_corner
    assert _close(out[r, c], RED, tol=20)
    opposite = (-1 if r == 0 else 0, -1 if c == 0 else 0)
    assert _close(out[opposite], BASE, tol=20)


def test_tiny_images_resize_to_the_requested_size():
    one = decode_image(_png(Image.new("RGB", (1, 1), (9, 8, 7))), 32)
    assert one.shape == (32, 32, 3) and (one == [9, 8, 7]).all()
    odd = decode_image(_png(Image.new("RGB", (3, 5), (1, 2, 3))), 16, mode="shorter")
    assert odd.shape == (16, 16, 3) and (odd == [1, 2, 3]).all()


# ---------------------------------------------------------------- decompression bombs


def test_pixel_cap_refuses_before_decoding_pixels(monkeypatch):
    data = _png(noisy_rgb(100, 100))
    calls = []
    original = ImageFile.ImageFile.load

    def spy(self):
        calls.append(self.size)
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    with pytest.raises(DecodeError, match=r"too many pixels: 100x100 = 10000 > max_pixels 9999"):
        decode_image(data, max_pixels=9_999)
    assert calls == []
    assert decode_image(data, max_pixels=10_000).shape == (100, 100, 3)
    assert calls and set(calls) == {(100, 100)}


def test_pillow_bomb_warning_and_error_become_decode_errors():
    # 100M pixels: above Pillow's warning level, below our default cap. Pixel data is bogus,
    # so it must fail while decoding, not as a DecompressionBombWarning.
    mid = png_bomb(10_000, 10_000, bit_depth=1, color_type=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(DecodeError) as e:
            decode_image(mid)
    assert "too many pixels" not in str(e.value)
    with pytest.raises(DecodeError, match="too many pixels"):
        decode_image(mid, max_pixels=50_000_000)
    # 900M pixels: Pillow's own error threshold, reported as DecodeError.
    with pytest.raises(DecodeError, match="too many pixels"):
        decode_image(png_bomb(30_000, 30_000, bit_depth=1, color_type=0))
    assert DEFAULT_MAX_PIXELS == 2 * 89_478_485


def test_cap_above_pillows_limit_is_honoured_and_limit_restored():
    before = Image.MAX_IMAGE_PIXELS
    huge = png_bomb(14_000, 14_000, bit_depth=1, color_type=0)  # 196M > Pillow's error threshold
    with pytest.raises(DecodeError) as e:
        decode_image(huge, max_pixels=200_000_000)
    assert "too many pixels" not in str(e.value)  # opened; fails only on the bogus data
    assert before == Image.MAX_IMAGE_PIXELS


# ---------------------------------------------------------------- draft and resize


def _big_jpeg(tmp_path: Path, w: int = 1024, h: int = 768) -> Path:
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 255 // (w + h)], -1)
    path = tmp_path / "big.jpg"
    Image.fromarray(arr.astype(np.uint8)).save(path, quality=92)
    return path


def test_large_jpeg_uses_draft_when_decoded_small(tmp_path):
    path = _big_jpeg(tmp_path)
    assert open_image(path).size == (1024, 768)
    drafted = open_image(path, draft_size=64)
    assert drafted.size == (128, 96)  # DCT scale 1/8, both sides still >= 64
    assert open_image(path, draft_size=150).size == (256, 192)  # scale 1/4
    assert open_image(path, draft_size=200).size == (512, 384)  # 768 < 4 * 200: scale 1/2
    assert open_image(path, draft_size=400).size == (1024, 768)  # 768 < 2 * 400: no draft
    out = decode_image(path, 64)
    assert out.shape == (64, 64, 3)
    exact = resize_image(open_image(path), 64)
    assert np.abs(out.astype(int) - exact.astype(int)).mean() < 2.0


def test_the_store_and_prediction_decode_large_jpegs_at_reduced_size(tmp_path):
    """README: large JPEGs are decoded at reduced size (DCT scaling) when the target is at
    most half their size. decode_image (prediction, serving) and a store at 64 px give
    exactly the image resized from the 1/8-scale decode, which differs from one resized
    from the full decode."""
    from deepimage.data import prepare_store, scan_folder

    (tmp_path / "data" / "a").mkdir(parents=True)
    path = _big_jpeg(tmp_path / "data" / "a")
    reduced = resize_image(open_image(path, draft_size=64), 64)
    assert not np.array_equal(reduced, resize_image(open_image(path), 64))  # it shows
    assert np.array_equal(decode_image(path, 64), reduced)
    assert np.array_equal(decode_image(path.read_bytes(), 64), reduced)
    store = prepare_store(scan_folder(tmp_path / "data"), tmp_path / "store", [64, 32],
                          workers=0, progress=False)  # fmt: skip
    assert np.array_equal(store.images(64)[0], reduced)  # drafted for the largest size


def test_draft_only_for_jpeg(tmp_path):
    path = tmp_path / "big.png"
    noisy_rgb(512, 512).save(path)
    assert open_image(path, draft_size=64).size == (512, 512)


def test_stretch_and_shorter_modes():
    arr = np.zeros((30, 90, 3), np.uint8)
    arr[:, :30] = (255, 0, 0)
    arr[:, 30:60] = (0, 255, 0)
    arr[:, 60:] = (0, 0, 255)
    img = Image.fromarray(arr)
    stretched = resize_image(img, 30, "stretch")
    assert stretched.shape == (30, 30, 3)
    assert stretched[15, 2].tolist() == [255, 0, 0] and stretched[15, 27].tolist() == [0, 0, 255]
    cropped = resize_image(img, 30, "shorter")
    assert cropped.shape == (30, 30, 3)
    assert (cropped == [0, 255, 0]).all()  # centre square is the green third
    assert resize_image(img, 15, "shorter")[7, 7].tolist() == [0, 255, 0]
    tall = Image.fromarray(np.ascontiguousarray(arr.transpose(1, 0, 2)))
    assert (resize_image(tall, 30, "shorter") == [0, 255, 0]).all()
    assert resize_image(tall, 10, "shorter")[5, 5].tolist() == [0, 255, 0]
    with pytest.raises(ValueError, match="resize mode"):
        resize_image(img, 30, "crop")


def test_resize_array_matches_resize_image_and_decode_image(tmp_path):
    img = noisy_rgb(80, 50, seed=3)
    path = tmp_path / "n.png"
    img.save(path)
    from_pil = resize_image(img, 24, "shorter")
    from_arr = resize_array(np.asarray(img), 24, "shorter")
    assert np.array_equal(from_pil, from_arr)
    assert np.array_equal(decode_image(path, 24, mode="shorter"), from_pil)
    assert resize_pil(img, 24).size == (24, 24)
    assert from_arr.dtype == np.uint8 and from_arr.flags.c_contiguous


def test_decode_accepts_bytes_and_str_paths(tmp_path):
    path = tmp_path / "x.jpg"
    marked_rgb(20, 10).save(path, quality=95)
    a = decode_image(str(path), 8)
    b = decode_image(path.read_bytes(), 8)
    assert np.array_equal(a, b)
    with pytest.raises(DecodeError, match="empty"):
        decode_image(b"")


@pytest.mark.skipif(not (DATASETS / "imagenet-sample").is_dir(), reason="no real data")
def test_real_photos_decode_to_rgb_at_fixed_size():
    files = sorted((DATASETS / "imagenet-sample").iterdir())
    grey = []
    for f in files:
        with Image.open(f) as im:
            if im.mode == "L":
                grey.append(f)
    assert grey
    for f in files[:6] + grey[:2]:
        out = decode_image(f, 64, mode="shorter")
        assert out.shape == (64, 64, 3) and out.dtype == np.uint8
