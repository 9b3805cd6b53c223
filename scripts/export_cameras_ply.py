"""Export a dataset's training cameras as a PLY (normalised DRB units) for a 3D viewer: a point per camera
centre, or with --frusta the outline of each camera's frustum.

    python scripts/export_cameras_ply.py --dataset_path data/scene --output cams.ply --frusta
"""
from __future__ import annotations

import argparse

from mega_nerf.data.dataset import load_dataset
from mega_nerf.errors import run_cli
from mega_nerf.preview import write_cameras_ply


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_path", required=True, help="dataset in Mega-NeRF's layout")
    parser.add_argument("--output", required=True, help="PLY file to write")
    parser.add_argument("--frusta", action="store_true", help="write frustum outlines instead of bare centres")
    parser.add_argument("--frustum_depth", type=float, default=0.05, help="frustum depth, normalised units")
    args = parser.parse_args()
    count = write_cameras_ply(load_dataset(args.dataset_path), args.output, args.frusta, args.frustum_depth)
    print(f"wrote {count} training cameras to {args.output}")


if __name__ == "__main__":
    run_cli(main)
