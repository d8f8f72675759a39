"""``deepimage augment --table`` / ``--grid`` and the training default."""

import numpy as np
from PIL import Image

from deepimage.cli import build_parser, main
from deepimage.config import TrainConfig


def test_table_command_prints_table_1(capsys):
    assert main(["augment", "--table"]) == 0
    out = capsys.readouterr().out
    for number in ("68,920", "1,960", "260", "82,944", "116,525,145,784,320,000"):
        assert number in out


def test_grid_command_draws_every_augmentation(tmp_path, capsys):
    rng = np.random.default_rng(0)
    src = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(src)
    out = tmp_path / "grid.png"
    args = ["augment", str(src), "--grid", str(out), "--size", "40", "--crop", "32"]
    assert main([*args, "--samples", "3"]) == 0
    with Image.open(out) as im:
        assert im.size[1] == 9 * (32 + 4) + 4  # 8 augmentations alone + the full pipeline


def test_augment_needs_something_to_do(capsys):
    assert main(["augment"]) == 2


def test_paper_augmentation_is_the_training_default():
    assert TrainConfig().augment == "deepimage"
    args = build_parser().parse_args(["train", "--augment", "alexnet"])
    assert args.augment == "alexnet"
    bench = build_parser().parse_args(["bench", "augment", "--data", "x", "--size", "512"])
    assert bench.size == 512
