"""Convert a COLMAP sparse model (text or binary) and its images to Mega-NeRF's dataset layout.

    python scripts/colmap_to_mega_nerf.py --model_path sparse/0 --images_path images --output data/scene
"""
from __future__ import annotations

import argparse

from mega_nerf.data.colmap import convert_colmap
from mega_nerf.data.convert import add_conversion_options, conversion_options
from mega_nerf.errors import run_cli


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", required=True, help="COLMAP sparse model folder (cameras, images, "
                        "points3D as .bin or .txt)")
    parser.add_argument("--images_path", required=True, help="folder the model's image names are relative to")
    add_conversion_options(parser)
    args = parser.parse_args()
    convert_colmap(args.model_path, args.images_path, args.output, **conversion_options(args))


if __name__ == "__main__":
    run_cli(main)
