"""`mega-nerf-partition` (and `scripts/create_cluster_masks.py`): split a dataset into a grid of cells.

One process:   mega-nerf-partition --config_file CFG --dataset_path D --output M --grid_dim 2 2
Several GPUs:  python -m torch.distributed.run --standalone --nproc_per_node 8 scripts/create_cluster_masks.py ...
"""
from __future__ import annotations

import sys
from pathlib import Path

import configargparse

from mega_nerf.cli.options import base_parser, require, scene_bounds
from mega_nerf.clock import PartsClock, process_start
from mega_nerf.data.dataset import Dataset, check_not_in_dataset, load_dataset
from mega_nerf.errors import UserError
from mega_nerf.lock import locked
from mega_nerf.partition.cells import EXACT, make_params, parse_grid_dim
from mega_nerf.partition.job import MaskJob, create_cluster_masks

DISTANCE_WARNING = 1e11  # point-centroid distances: the tiny city at 2 x 2 takes 6e8, a 100 x 100 grid 1.5e12


def partition_parser() -> configargparse.ArgParser:
    parser = base_parser("Split a dataset into a grid of cells: one boolean mask per image per cell, and "
                         "masks/params.pt.")
    parser.add_argument("--output", type=str, help="mask directory to create (M/params.pt, M/<cell>/<image>)")
    parser.add_argument("--grid_dim", nargs="+", default=None,
                        help="cells along y (right) and along z (back), e.g. --grid_dim 2 4")
    parser.add_argument("--ray_samples", type=int, default=None,
                        help="Mega-NeRF's sampled rule: this many points per ray (Mega-NeRF: 1000), evenly spaced "
                             "from near to far, compared with the centroids; default: the exact rule, no samples")
    parser.add_argument("--resume", action="store_true", help="finish an interrupted run in --output")
    parser.add_argument("--ray_chunk", type=int, default=None,
                        help="rays generated at once per image (default 2^16 on CPU, 2^20 on GPU)")
    parser.add_argument("--dist_chunk", type=int, default=None,
                        help="point-centroid distances computed at once, bounding memory at 24-56 bytes each "
                             "(default 2^18 on CPU; on GPU 2^28 or what 1/64 of its free memory holds)")
    parser.add_argument("--timeout_minutes", type=float, default=10,
                        help="how long a rank waits for the others before the job fails")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar (logs, benchmarks)")
    return parser


def work_warning(dataset: Dataset, grid_dim: tuple[int, int], ray_samples: int | None) -> str | None:
    """A warning when the grid implies far more work than the scene needs: more cells than images (most cells
    then see a sliver of a few images, and each trains a model of its own), or more than DISTANCE_WARNING
    point-centroid distances to partition (points per ray: 1.25 * ray_samples for the sampled rule, 2K + 2 for
    the exact one; DESIGN.md, Partitioning)."""
    cells = grid_dim[0] * grid_dim[1]
    points = 1.25 * ray_samples if ray_samples else 2 * cells + 2
    distances = sum(m.W * m.H for m in dataset.images) * points * cells
    if cells <= len(dataset.images) and distances <= DISTANCE_WARNING:
        return None
    return (f"warning: --grid_dim {grid_dim[0]} {grid_dim[1]}: {cells:,} cells for {len(dataset.images)} images, "
            f"{distances:.1e} point-centroid distances to partition and {cells:,} models to train; "
            "a smaller grid is usually what such a scene needs")


def slab_warning(dataset: Dataset, altitude: tuple[float, float]) -> str | None:
    """A warning when cameras lie below the slab's ground (a larger down-coordinate): their rays start under the
    slab, and the partition puts them in every cell they cross on their way up (a wrong --ray_altitude_range or up
    axis; scripts/preview_dataset.py warns the same)."""
    below = sum(float(m.c2w[0, 3]) > altitude[1] for m in dataset.images)
    if not below:
        return None
    return (f"warning: {below} of {len(dataset.images)} cameras lie below the ground of --ray_altitude_range: the "
            "range or the up axis is probably wrong (scripts/preview_dataset.py draws them)")


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
    warning = work_warning(dataset, grid_dim, args.ray_samples)
    if warning:
        print(warning, file=sys.stderr)
    bounds = scene_bounds(args, dataset.coordinates)
    warning = slab_warning(dataset, bounds.altitude)
    if warning:
        print(warning, file=sys.stderr)
    params = make_params(dataset, grid_dim, bounds.near, bounds.far, bounds.altitude, args.boundary_margin,
                         args.cluster_2d, args.ray_samples or EXACT, args.foreground_scale)
    return MaskJob(dataset, params, Path(args.output), args.resume, args.ray_chunk, args.dist_chunk,
                   args.timeout_minutes, not args.no_progress)


def main(argv: list[str] | None = None) -> dict | None:
    """Partition as the options say; prints where the time went since the process started (from the call when
    /proc is missing)."""
    clock = PartsClock(process_start())
    clock.mark("start-up")  # the interpreter and the imports
    args = partition_parser().parse_args(argv)
    if args.output:  # masks in a dataset's folder or splits break every later command's listing of it
        check_not_in_dataset(args.output)
    with locked({"--output": [args.output]} if args.output else {}):
        job = mask_job(args)
        clock.mark("dataset and cells")
        return create_cluster_masks(job, clock=clock)
