"""`mega-nerf-merge` (and `scripts/merge_submodules.py`): merge a partition's submodules into one container."""
from __future__ import annotations

from pathlib import Path

import configargparse

from mega_nerf.cli.options import base_parser, require
from mega_nerf.errors import run_cli
from mega_nerf.lock import locked
from mega_nerf.merging.merge import merge_submodules


def merge_parser() -> configargparse.ArgParser:
    p = base_parser("Merge the trained submodules of a partition into one container file.")
    p.add_argument("--ckpt_prefix", type=str, help="submodule k's experiment directory is <prefix><k> (e.g. exp-)")
    p.add_argument("--centroid_path", type=str, help="the partition's params.pt (or its mask directory)")
    p.add_argument("--output", type=str, help="container file to write (e.g. merged.pt)")
    p.add_argument("--allow_empty_cells", action="store_true",
                   help="merge even when some submodules have no checkpoint (those cells contribute nothing)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = merge_parser().parse_args(argv)
    for option in ("ckpt_prefix", "centroid_path", "output"):
        require(getattr(args, option), option)
    with locked({"--output": [args.output]}, folders=False):
        merge_submodules(args.ckpt_prefix, Path(args.centroid_path), Path(args.output), args.allow_empty_cells,
                         args.boundary_margin)


def console() -> None:
    run_cli(main)
