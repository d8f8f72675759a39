"""The ``deepimage augment`` command: Table 1 counts and the augmentation figure."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``augment`` on the top-level sub-command parser."""
    p = sub.add_parser(
        "augment",
        help="Table 1 counts (--table) and a figure of every augmentation (IMAGE --grid PNG)",
    )
    p.add_argument("image", nargs="?", help="image to draw the augmentations of")
    p.add_argument("--table", action="store_true", help="print the paper's Table 1 counts")
    p.add_argument("--grid", metavar="PNG", help="write the figure to this file")
    p.add_argument("--size", type=int, default=None, help="S (default 512 table, 256 grid)")
    p.add_argument("--crop", type=int, default=224, help="crop C (default 224)")
    p.add_argument("--samples", type=int, default=6, help="samples per row of the figure")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    if not args.table and not args.grid:
        raise ValueError("deepimage augment: give --table, or IMAGE --grid OUT.png")
    if args.table:
        from deepimage.augment.params import AugmentConfig
        from deepimage.augment.table import format_table, table

        size = args.size or 512
        print(format_table(table(AugmentConfig(), size, args.crop), size, args.crop))
    if args.grid:
        if not args.image:
            raise ValueError("deepimage augment --grid needs an IMAGE")
        from deepimage.augment.figure import augmentation_rows, draw_grid
        from deepimage.data.decode import decode_image

        size = args.size or 256
        image = decode_image(args.image, size)
        rows = augmentation_rows(image, args.crop, samples=args.samples, seed=args.seed)
        print(f"figure: {draw_grid(rows, args.grid)}")
    return 0
