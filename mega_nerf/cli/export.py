"""`mega-nerf-export` (and `scripts/export_ply.py`): export the merged model as a coloured point cloud (PLY).

    mega-nerf-export --container_path merged.pt --output scene.ply [--min_views 8 --dataset_path D]
    mega-nerf-export --config_file CFG --container_path merged.pt --output scene.ply --source_frame

An --output that is one of the command's inputs, an existing file that is not a PLY, or a file in a dataset's folder
or its train/ or val/ images, is refused before anything is written.
"""
from __future__ import annotations

from pathlib import Path

import configargparse

from mega_nerf.cli.options import base_parser, require
from mega_nerf.data.dataset import check_file_not_in_dataset
from mega_nerf.export import DEFAULT_CHUNK, DEFAULT_LAYERS, export_ply, is_ply
from mega_nerf.export import __doc__ as EXPORT_DOC
from mega_nerf.io import check_output
from mega_nerf.lock import locked


def export_parser() -> configargparse.ArgParser:
    p = base_parser(EXPORT_DOC)
    p.add_argument("--container_path", help="merged container (scripts/merge_submodules.py)")
    p.add_argument("--output", help="PLY file to write")
    p.add_argument("--resolution", type=int, default=512, help="grid cells along the scene box's longest side")
    p.add_argument("--max_points", type=int, default=2_000_000, help="keep at most this many (uniform, seeded)")
    p.add_argument("--density_threshold", type=float, default=None,
                   help="density a cell needs (default: 50%% opaque over one cell, ln 2 / spacing)")
    p.add_argument("--layers", type=int, default=DEFAULT_LAYERS,
                   help="dense cells kept per vertical column, from the top")
    p.add_argument("--appearance", type=int, default=0, help="appearance (image) index for the colours")
    p.add_argument("--real_units", action="store_true",
                   help="write real-world DRB metres instead of normalised units (needs --dataset_path)")
    p.add_argument("--source_frame", action="store_true",
                   help="write the COLMAP / transforms.json world the dataset was converted from (needs "
                        "--dataset_path with its dataparser_transforms.json)")
    p.add_argument("--min_views", type=int, default=0,
                   help="keep points inside at least this many images' views (needs --dataset_path; 0: all)")
    p.add_argument("--train_scale_factor", type=int, default=1,
                   help="the scale the submodules were trained at (to check the dataset of --min_views, "
                        "--real_units and --source_frame against the container's)")
    p.add_argument("--chunk", type=int, default=DEFAULT_CHUNK, help="points per field call (bounds memory)")
    p.add_argument("--no_progress", action="store_true", help="no progress bar (logs, benchmarks)")
    return p


def main(argv: list[str] | None = None) -> Path:
    """Export the container named by the options; returns the PLY path."""
    args = export_parser().parse_args(argv)
    require(args.container_path, "container_path")
    require(args.output, "output")
    inputs = {"--config_file": [args.config_file], "--container_path": [args.container_path],
              "--dataset_path": [args.dataset_path]}
    check_output(args.output, "--output", inputs, "a PLY file", is_ply)
    check_file_not_in_dataset(args.output, "--output")  # before the lock, whose file lies beside it
    with locked({"--output": [args.output]}, folders=False):
        return export_ply(args)
