"""A deliberately messy ImageFolder for robustness tests (importable helper, not a test).

``make_messy_folder(root)`` writes small images in every awkward form met in real folders
(Pillow modes, EXIF rotation, odd formats and extensions, corrupt, empty, truncated and
oversized files, stray and hidden files, empty class folders) and returns what it wrote and
what a reader is expected to do with each file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, features

from tests.helpers import jpeg_bytes, png_bomb

EXIF_ORIENTATION = 0x0112
CLASS_NAMES = {"birds": "Aves, birds", "cats": "Felis catus", "dogs": "Canis familiaris"}


def marked_rgb(width: int, height: int, base=(40, 90, 200), mark=(250, 20, 20)) -> Image.Image:
    """A flat image with a distinct block in its top-left quarter (to check orientation)."""
    arr = np.empty((height, width, 3), np.uint8)
    arr[:] = base
    arr[: height // 2, : width // 2] = mark
    return Image.fromarray(arr)


def noisy_rgb(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def exif_jpeg(img: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    return jpeg_bytes(img, exif=exif.tobytes())


def make_messy_folder(root: str | Path) -> dict[str, Any]:
    """Write the messy folder under ``root`` and describe it.

    Returns a dict with:
      ``root`` (Path); ``classes`` (class ids an index must find, sorted);
      ``empty_classes`` (folders without images: warned about and left out);
      ``class_names`` (id -> name, also written to ``root/class_names.txt``);
      ``indexed`` ({relative path: class id} for every file an index must list);
      ``ok`` (indexed files that must decode), ``skipped`` ({relative path: why} for indexed
      files that must fail to decode with the default pixel cap);
      ``ignored`` (files an index must not list: stray, hidden, non-image);
      ``sizes`` ({relative path: (width, height)} of each ok file after EXIF rotation);
      ``colors`` ({relative path: RGB} for flat-colour files, after conversion to RGB).
    Relative paths use ``/``.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    indexed: dict[str, str] = {}
    ok: list[str] = []
    skipped: dict[str, str] = {}
    ignored: list[str] = []
    sizes: dict[str, tuple[int, int]] = {}
    colors: dict[str, tuple[int, int, int]] = {}

    def write(rel: str, data: bytes) -> Path:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    def save(rel: str, img: Image.Image, **kwargs: Any) -> Path:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, **kwargs)
        return path

    def good(rel: str, size: tuple[int, int], color: tuple[int, int, int] | None = None) -> None:
        indexed[rel] = rel.split("/")[0]
        ok.append(rel)
        sizes[rel] = size
        if color is not None:
            colors[rel] = color

    def bad(rel: str, why: str) -> None:
        indexed[rel] = rel.split("/")[0]
        skipped[rel] = why

    # Stray files at the root and the class names file.
    write("README.txt", b"A messy image folder.\n")
    write(".DS_Store", b"\0\0\0\1Bud1")
    ignored += ["README.txt", ".DS_Store"]
    names = "".join(f"{k} {v}\n" for k, v in CLASS_NAMES.items())
    write("class_names.txt", ("# id name\n\n" + names).encode())

    # cats: JPEG variants.
    save("cats/rgb.jpg", marked_rgb(48, 32), quality=95)
    good("cats/rgb.jpg", (48, 32))
    save("cats/upper_ext.JPG", marked_rgb(30, 20), quality=95)
    good("cats/upper_ext.JPG", (30, 20))
    save("cats/cmyk.jpg", Image.new("CMYK", (32, 24), (0, 255, 255, 0)), quality=95)
    good("cats/cmyk.jpg", (32, 24), (255, 0, 0))
    write("cats/exif_rotate6.jpg", exif_jpeg(marked_rgb(40, 24), 6))
    good("cats/exif_rotate6.jpg", (24, 40))
    full = jpeg_bytes(noisy_rgb(96, 64, seed=1))
    write("cats/truncated.jpg", full[: len(full) // 2])
    bad("cats/truncated.jpg", "truncated")
    write("cats/corrupt.jpg", np.random.default_rng(2).bytes(700))
    bad("cats/corrupt.jpg", "corrupt")
    save("cats/nested/deeper/nested.png", Image.new("RGB", (20, 20), (10, 200, 30)))
    good("cats/nested/deeper/nested.png", (20, 20), (10, 200, 30))
    write("cats/Thumbs.db", b"\xd0\xcf\x11\xe0thumbs")
    save("cats/.hidden.jpg", Image.new("RGB", (8, 8)))
    save("cats/.cache/hidden_dir.png", Image.new("RGB", (8, 8)))
    write("cats/notes.txt", b"not an image\n")
    ignored += [
        "cats/Thumbs.db",
        "cats/.hidden.jpg",
        "cats/.cache/hidden_dir.png",
        "cats/notes.txt",
    ]

    # dogs: PNG modes, tiny images, bad files.
    save("dogs/grey_L.png", Image.new("L", (20, 16), 128))
    good("dogs/grey_L.png", (20, 16), (128, 128, 128))
    pal = Image.new("P", (16, 16), 1)
    pal.putpalette([0, 0, 0, 200, 30, 30, 30, 30, 200] + [0] * (256 * 3 - 9))
    save("dogs/palette_P.png", pal)
    good("dogs/palette_P.png", (16, 16), (200, 30, 30))
    pal_t = pal.copy()
    pal_t.paste(0, (0, 0, 8, 16))  # left half uses index 0, declared transparent
    save("dogs/palette_transparent.png", pal_t, transparency=0)
    good("dogs/palette_transparent.png", (16, 16))
    ramp = np.tile(np.linspace(0, 65535, 32).round().astype(np.uint16), (8, 1))
    save("dogs/png16.png", Image.fromarray(ramp))
    good("dogs/png16.png", (32, 8))
    rgba = np.zeros((12, 12, 4), np.uint8)
    rgba[..., :3] = (0, 0, 255)
    rgba[:, 6:, 3] = 255  # left half fully transparent
    save("dogs/rgba.png", Image.fromarray(rgba, "RGBA"))
    good("dogs/rgba.png", (12, 12))
    save("dogs/tiny_1x1.png", Image.new("RGB", (1, 1), (7, 77, 177)))
    good("dogs/tiny_1x1.png", (1, 1), (7, 77, 177))
    save("dogs/tiny_3x5.png", Image.new("RGB", (3, 5), (200, 100, 50)))
    good("dogs/tiny_3x5.png", (3, 5), (200, 100, 50))
    save("dogs/upper_ext.PNG", Image.new("RGB", (10, 10), (90, 90, 10)))
    good("dogs/upper_ext.PNG", (10, 10), (90, 90, 10))
    write("dogs/empty.jpg", b"")
    bad("dogs/empty.jpg", "empty")
    write("dogs/text.jpg", b"this is a text file, not a JPEG\n" * 4)
    bad("dogs/text.jpg", "text")
    write("dogs/.DS_Store", b"\0\0\0\1Bud1")
    ignored.append("dogs/.DS_Store")

    # birds: other formats and modes, and a decompression bomb.
    write("birds/exif_rotate8.jpg", exif_jpeg(marked_rgb(40, 24), 8))
    good("birds/exif_rotate8.jpg", (24, 40))
    write("birds/bomb.png", png_bomb(30_000, 30_000, bit_depth=1, color_type=0))
    bad("birds/bomb.png", "too many pixels")
    save("birds/frame.gif", Image.new("RGB", (14, 10), (0, 255, 0)).convert("P"))
    good("birds/frame.gif", (14, 10), (0, 255, 0))
    save("birds/image.bmp", Image.new("RGB", (9, 7), (1, 2, 250)))
    good("birds/image.bmp", (9, 7), (1, 2, 250))
    if features.check("webp"):
        save("birds/image.webp", Image.new("RGB", (16, 16), (255, 255, 0)), lossless=True)
        good("birds/image.webp", (16, 16), (255, 255, 0))
    save("birds/grey16.tif", Image.fromarray(np.full((6, 8), 65535, np.uint16)))
    good("birds/grey16.tif", (8, 6), (255, 255, 255))
    save("birds/binary_1.png", Image.new("1", (8, 8), 1))
    good("birds/binary_1.png", (8, 8), (255, 255, 255))
    la = Image.new("LA", (8, 8), (0, 255))
    save("birds/la.png", la)
    good("birds/la.png", (8, 8), (0, 0, 0))

    # Folders that are not classes.
    (root / "empty_class").mkdir()
    write("junk_only/README.txt", b"nothing here\n")
    write("junk_only/.DS_Store", b"\0")
    save(".hidden_class/x.jpg", Image.new("RGB", (8, 8)))
    ignored += ["junk_only/README.txt", "junk_only/.DS_Store", ".hidden_class/x.jpg"]

    return {
        "root": root,
        "classes": sorted(CLASS_NAMES),
        "empty_classes": ["empty_class", "junk_only"],
        "class_names": dict(CLASS_NAMES),
        "indexed": indexed,
        "ok": sorted(ok),
        "skipped": skipped,
        "ignored": sorted(ignored),
        "sizes": sizes,
        "colors": colors,
    }
