"""`mega-nerf-partition` (and `scripts/create_cluster_masks.py`): split a dataset into a grid of cells.

One process:   mega-nerf-partition --config_file CFG --dataset_path D --output M --grid_dim 2 2
Several GPUs:  python -m torch.distributed.run --standalone --nproc_per_node 8 scripts/create_cluster_masks.py ...
"""
from __future__ import annotations

from pathlib import Path

import configargparse

from mega_nerf.cli.options import base_parser, require, scene_bounds
from mega_nerf.data.dataset import load_dataset
from mega_nerf.errors import UserError, run_cli
from mega_nerf.lock import locked
from mega_nerf.partition.cells import make_params, parse_grid_dim
from mega_nerf.partition.job import MaskJob, create_cluster_masks


def partition_parser() -> configargparse.ArgParser:
    parser = base_parser("Split a dataset into a grid of cells: one boolean mask per image per cell, and "
                         "masks/params.pt.")
    parser.add_argument("--output", type=str, help="mask directory to create (M/params.pt, M/<cell>/<image>)")
    parser.add_argument("--grid_dim", nargs="+", default=None,
                        help="cells along y (right) and along z (back), e.g. --grid_dim 2 4")
    parser.add_argument("--ray_samples", type=int, default=1000,
                        help="points per ray, evenly spaced from near to far, compared with the centroids")
    parser.add_argument("--resume", action="store_true", help="finish an interrupted run in --output")
    parser.add_argument("--ray_chunk", type=int, default=1 << 16, help="rays generated at once per image")
    parser.add_argument("--dist_chunk", type=int, default=None,
                        help="point-centroid distances computed at once, bounding memory at about 16 bytes "
                             "each (default 2^18 on CPU, 2^24 on GPU)")
    parser.add_argument("--timeout_minutes", type=float, default=10,
                        help="how long a rank waits for the others before the job fails")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar (logs, benchmarks)")
    return parser


def mask_job(args: configargparse.Namespace) -> MaskJob:
    """Check the options and the dataset, and compute the partition (one-line UserErrors)."""
    grid_dim = parse_grid_dim(args.grid_dim)
    require(args.dataset_path, "dataset_path")
    require(args.output, "output")
    if args.ray_altitude_range is None:
        raise UserError("missing option --ray_altitude_range [top ground] (real-world down-coordinates): "
                        "partitioning clips every ray to the altitude slab")
    for option in ("boundary_margin", "ray_samples", "ray_chunk", "dist_chunk"):
        if getattr(args, option) is not None and getattr(args, option) < 1:
            raise UserError(f"--{option} must be at least 1, got {getattr(args, option)}")
    if args.timeout_minutes <= 0:
        raise UserError(f"--timeout_minutes must be positive, got {args.timeout_minutes}")
    dataset = load_dataset(args.dataset_path)
    bounds = scene_bounds(args, dataset.coordinates)
    params = make_params(dataset, grid_dim, bounds.near, bounds.far, bounds.altitude, args.boundary_margin,
                         args.cluster_2d, args.ray_samples, args.foreground_scale)
    return MaskJob(dataset, params, Path(args.output), args.resume, args.ray_chunk, args.dist_chunk,
                   args.timeout_minutes, not args.no_progress)


def main(argv: list[str] | None = None) -> dict | None:
    args = partition_parser().parse_args(argv)
    with locked({"--output": [args.output]} if args.output else {}):
        return create_cluster_masks(mask_job(args))


def console() -> None:
    run_cli(main)
