"""`mega-nerf-merge` (and `scripts/merge_submodules.py`): merge a partition's submodules into one container.
An --output that is one of the command's inputs, an existing file that is not a container, or a file in a dataset's
folder or its train/ or val/ images, is refused before anything is written."""
from __future__ import annotations

from pathlib import Path

import configargparse

from mega_nerf.cli.options import base_parser, require
from mega_nerf.data.dataset import check_file_not_in_dataset
from mega_nerf.errors import UserError
from mega_nerf.io import check_output
from mega_nerf.lock import locked
from mega_nerf.merging.merge import is_container, merge_submodules, submodule_folders
from mega_nerf.partition.cells import load_params, params_file


def merge_parser() -> configargparse.ArgParser:
    p = base_parser("Merge the trained submodules of a partition into one container file.")
    p.add_argument("--ckpt_prefix", type=str, help="submodule k's experiment directory is <prefix><k> (e.g. exp-)")
    p.add_argument("--centroid_path", type=str, help="the partition's params.pt (or its mask directory)")
    p.add_argument("--output", type=str, help="container file to write (e.g. merged.pt)")
    p.add_argument("--allow_empty_cells", action="store_true",
                   help="merge even when some submodules have no checkpoint (those cells contribute nothing)")
    return p


def check_merge_output(output: str, option: str, ckpt_prefix: str, centroid_path: str, config_file: str | None,
                       dataset_path: str | None) -> None:
    """One UserError line, before anything is written, for a container path whose write would destroy an input
    (io.check_output: the config, params.pt, a cell's folder or a file in it, the dataset), that is a cell's
    folder `<ckpt_prefix><k>` or lies in its checkpoints/ (made or not yet: train_cells.py checks before its cells
    train, and a run's checkpoints are named by step), in a dataset, or under a file."""
    params = params_file(centroid_path)
    inputs = {"--config_file": [config_file], "--centroid_path": [params],
              "--ckpt_prefix": submodule_folders(ckpt_prefix), "--dataset_path": [dataset_path]}
    check_output(output, option, inputs, "a merged container", is_container)
    check_file_not_in_dataset(output, option)
    target = Path(output).resolve()
    for k in range(load_params(params).num_cells):
        cell = Path(f"{ckpt_prefix}{k}").resolve()
        if target == cell or target.is_relative_to(cell / "checkpoints"):
            raise UserError(f"{option} {output}: cell {k}'s {'folder' if target == cell else 'checkpoints'}; "
                            "choose another path")
    above = next(folder for folder in target.parents if folder.exists())
    if not above.is_dir():
        raise UserError(f"{option} {output}: {above} above it is a file; choose another path")


def main(argv: list[str] | None = None) -> None:
    args = merge_parser().parse_args(argv)
    for option in ("ckpt_prefix", "centroid_path", "output"):
        require(getattr(args, option), option)
    check_merge_output(args.output, "--output", args.ckpt_prefix, args.centroid_path, args.config_file,
                       args.dataset_path)  # before the lock, whose file lies beside it
    with locked({"--output": [args.output]}, folders=False):
        merge_submodules(args.ckpt_prefix, Path(args.centroid_path), Path(args.output), args.allow_empty_cells,
                         args.boundary_margin)
