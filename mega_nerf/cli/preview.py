"""`mega-nerf-preview` (and `scripts/preview_dataset.py`): draw a dataset before training: cameras (train and
val), sparse points, the altitude slab and, optionally, the cells of a partition. Prints what looks wrong.

    mega-nerf-preview data/scene [--partition masks] [--output preview.png]

`mega-nerf-export-cameras` (and `scripts/export_cameras_ply.py`): the training cameras as a PLY.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import configargparse

from mega_nerf.cli.options import HelpFormatter, base_parser, require
from mega_nerf.data.dataset import check_file_not_in_dataset, load_dataset
from mega_nerf.data.frames import to_source_map
from mega_nerf.errors import UserError
from mega_nerf.export import is_ply
from mega_nerf.io import check_output, is_png
from mega_nerf.preview import MAX_PREVIEW_SIZE, MIN_PREVIEW_SIZE, write_cameras_ply, write_preview

CAMERAS_DOC = """Export a dataset's training cameras as a PLY (normalised DRB units, or with --source_frame
the world it was converted from) for a 3D viewer: a point per camera
centre, or with --frusta the outline of each camera's frustum.

    python scripts/export_cameras_ply.py --dataset_path data/scene --output cams.ply --frusta
"""


def preview_parser() -> configargparse.ArgParser:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("dataset", nargs="?", default=None, help="dataset folder (or --dataset_path)")
    parser.add_argument("--partition", default=None, help="masks folder (or its params.pt) to draw the cells of")
    parser.add_argument("--output", default=None, help="PNG to write (default: <dataset>/preview.png)")
    parser.add_argument("--size", type=int, default=800,
                        help=f"height of the image ({MIN_PREVIEW_SIZE} to {MAX_PREVIEW_SIZE}); its width is twice that")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = preview_parser()
    args = parser.parse_args(argv)
    # named as validate_values names an option: by its config file's line when from there
    size_name = parser.config_file_sources().get("size", "--size")
    if args.size < MIN_PREVIEW_SIZE:  # the side view would have no rows under its title
        raise UserError(f"{size_name} must be at least {MIN_PREVIEW_SIZE}, got {args.size}")
    if args.size > MAX_PREVIEW_SIZE:  # before numpy asks for the image (and raises MemoryError)
        raise UserError(f"{size_name} must be at most {MAX_PREVIEW_SIZE}, got {args.size}: its {2 * args.size}x"
                        f"{args.size} image would be wider than many viewers draw, with no more detail (its dots, "
                        "lines and text have fixed pixel sizes)")
    dataset = args.dataset or args.dataset_path
    require(dataset, "dataset_path")
    default = Path(dataset) / "preview.png"
    output = Path(args.output or default)
    check_output(output, "--output", {"dataset": [dataset], "--partition": [args.partition]}, "a PNG image", is_png)
    if output.resolve() != default.resolve():  # the default's place, the dataset's own folder, no loader lists
        check_file_not_in_dataset(output, "--output")
    lines = write_preview(dataset, output, args.partition, args.ray_altitude_range, args.size)
    print("\n".join(lines))
    print(f"wrote {output}")


def cameras_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=CAMERAS_DOC, formatter_class=HelpFormatter)
    parser.add_argument("--dataset_path", required=True, help="dataset in Mega-NeRF's layout")
    parser.add_argument("--output", required=True, help="PLY file to write")
    parser.add_argument("--frusta", action="store_true", help="write frustum outlines instead of bare centres")
    parser.add_argument("--frustum_depth", type=float, default=0.05, help="frustum depth, normalised units")
    parser.add_argument("--source_frame", action="store_true",
                        help="write the COLMAP / transforms.json world the dataset was converted from (its "
                             "dataparser_transforms.json) instead of normalised DRB")
    args = parser.parse_args(argv)
    if not (math.isfinite(args.frustum_depth) and args.frustum_depth > 0):
        raise UserError(f"--frustum_depth must be a positive finite number, got {args.frustum_depth:g}")
    check_output(args.output, "--output", {"--dataset_path": [args.dataset_path]}, "a PLY file", is_ply)
    check_file_not_in_dataset(args.output, "--output")
    to_frame = to_source_map(args.dataset_path, "--source_frame") if args.source_frame else None
    count = write_cameras_ply(load_dataset(args.dataset_path), args.output, args.frusta, args.frustum_depth,
                              to_frame)
    frame = "the source frame" if to_frame else "normalised DRB"
    print(f"wrote {count} training cameras to {args.output} ({frame})")
