"""python -m data.synthetic: write the synthetic set (or a contact sheet of it) in the real dataset's layout."""
from __future__ import annotations

import argparse
from pathlib import Path

from data.stitchingnet import FABRICS, fabric_letters
from data.synthetic.generate import SyntheticSet, generate
from data.synthetic.render import MAX_ZOOM, MIN_IMG_SIZE, write_preview
from utils.cli import float_between, int_at_least, positive_int, random_seed, run_cli
from utils.errors import UserError


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data.synthetic",
        description="Write a procedural StitchingNet look-alike (11 fabrics x 11 classes) in the real "
                    "dataset's layout: OUT/<fabric folder>/<class folder>/<F>_<CC>_<NNNN>.jpg.",
        epilog="Same seed and arguments give byte-identical files, whatever --workers. Example: "
               "python -m data.synthetic --out data/synthetic --like-stitchingnet --seed 0")
    parser.add_argument("--out", type=Path, help="output folder (created; a .complete.json marker is written last)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--per-class", type=positive_int, metavar="N", help="images per (fabric, class) pair: 121*N images")
    size.add_argument("--like-stitchingnet", action="store_true",
                      help="the real dataset's size: 14,565 images, 221 Normal per fabric, the rest spread over the defects")
    parser.add_argument("--seed", type=random_seed, default=0, help="base seed (default 0)")
    parser.add_argument("--img-size", type=int_at_least(MIN_IMG_SIZE), default=224,
                        help="square image side in px (default 224; rendered at 224 and resized)")
    parser.add_argument("--zoom", type=float_between(1, MAX_ZOOM), default=1.0,
                        help=f"closer camera: frame a (224 / ZOOM) px window around the defect, in [1, {MAX_ZOOM:g}] (default 1)")
    parser.add_argument("--fabrics", metavar="LETTERS", type=lambda text: "".join(fabric_letters(text)),
                        help="only these fabrics, e.g. A,B,J (default: all of A-K)")
    parser.add_argument("--workers", type=positive_int, default=None, help="processes (default: all CPUs)")
    parser.add_argument("--preview", type=Path, metavar="FILE.png",
                        help="also (or only) write a contact sheet: rows = fabrics A-K, columns = classes 00-10")
    return parser


def main(args: argparse.Namespace) -> None:
    if args.fabrics is not None and not set(args.fabrics) <= set(FABRICS):
        raise UserError(f"--fabrics must be letters among {','.join(FABRICS)}, got {args.fabrics}")
    sized = args.per_class is not None or args.like_stitchingnet
    if args.out is None and (sized or args.preview is None):
        raise UserError("give --out DIR with --per-class N or --like-stitchingnet (or only --preview FILE.png)")
    if args.out is not None and not sized:
        raise UserError("give --per-class N or --like-stitchingnet to say how many images to write")
    if args.preview is not None:
        write_preview(args.preview, args.seed, args.img_size, zoom=args.zoom)
    if args.out is not None:
        spec = SyntheticSet(args.per_class, args.seed, args.img_size, args.like_stitchingnet, args.zoom, args.fabrics)
        count = generate(args.out, spec, args.workers)
        print(f"wrote {count} images to {args.out}")


if __name__ == "__main__":
    run_cli(main, get_args_parser())
