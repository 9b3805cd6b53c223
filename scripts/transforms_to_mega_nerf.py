"""Convert a nerfstudio / instant-ngp transforms.json and its images to Mega-NeRF's dataset layout.

    python scripts/transforms_to_mega_nerf.py --transforms scene/transforms.json --output data/scene
"""
from __future__ import annotations

import argparse

from mega_nerf.data.convert import add_conversion_options, conversion_options
from mega_nerf.data.transforms_json import convert_transforms
from mega_nerf.errors import run_cli


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transforms", required=True, help="transforms.json (image paths relative to it)")
    parser.add_argument("--points", default=None,
                        help="PLY of sparse points in the json's world (default: its ply_file_path, if any)")
    add_conversion_options(parser)
    args = parser.parse_args()
    convert_transforms(args.transforms, args.output, args.points, **conversion_options(args))


if __name__ == "__main__":
    run_cli(main)
