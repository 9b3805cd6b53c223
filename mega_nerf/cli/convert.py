"""`mega-nerf-colmap` and `mega-nerf-transforms` (and `scripts/colmap_to_mega_nerf.py`,
`scripts/transforms_to_mega_nerf.py`): convert a COLMAP sparse model (text or binary) or a nerfstudio /
instant-ngp transforms.json, with their images, to Mega-NeRF's dataset layout.

    mega-nerf-colmap --model_path scene/sparse/0 --output data/scene     (images: scene/images by default)
    mega-nerf-transforms --transforms scene/transforms.json --output data/scene
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mega_nerf.cli.options import HelpFormatter
from mega_nerf.data.colmap import convert_colmap
from mega_nerf.data.convert import add_conversion_options, conversion_options
from mega_nerf.data.transforms_json import convert_transforms
from mega_nerf.lock import locked


def _parser(description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)


def default_images_path(model_path: str) -> Path:
    """COLMAP's layout: `images/` beside the `sparse/` folder the model is in (scene/sparse/0 -> scene/images),
    else beside the model folder."""
    model = Path(model_path).resolve()
    sparse = next((p for p in (model, *model.parents) if p.name == "sparse"), model)
    return sparse.parent / "images"


def _joined_up_axis(argv: list[str] | None) -> list[str]:
    """The words with `--up_axis -z` joined into `--up_axis=-z` (as the README writes it): argparse takes a
    value starting with '-' for an option."""
    joined: list[str] = []
    for word in sys.argv[1:] if argv is None else argv:
        if joined and joined[-1] == "--up_axis" and word.startswith("-"):
            joined[-1] = f"--up_axis={word}"
        else:
            joined.append(word)
    return joined


def colmap_main(argv: list[str] | None = None) -> None:
    parser = _parser("Convert a COLMAP sparse model (text or binary) and its images to Mega-NeRF's dataset layout.")
    parser.add_argument("--model_path", required=True, help="COLMAP sparse model folder (cameras, images, "
                        "points3D as .bin or .txt)")
    parser.add_argument("--images_path", default=None, help="folder the model's image names are relative to "
                        "(default: images/ beside the sparse/ folder holding the model)")
    add_conversion_options(parser)
    args = parser.parse_args(_joined_up_axis(argv))
    images = args.images_path or default_images_path(args.model_path)
    if args.images_path is None:
        print(f"images: {images} (the default beside sparse/; --images_path to choose another)")
    with locked({"--output": [args.output]}):
        convert_colmap(args.model_path, images, args.output, **conversion_options(args))


def transforms_main(argv: list[str] | None = None) -> None:
    parser = _parser("Convert a nerfstudio / instant-ngp transforms.json and its images to Mega-NeRF's layout.")
    parser.add_argument("--transforms", required=True, help="transforms.json (image paths relative to it)")
    parser.add_argument("--points", default=None,
                        help="PLY of sparse points in the json's world (default: its ply_file_path, if any)")
    add_conversion_options(parser)
    args = parser.parse_args(_joined_up_axis(argv))
    with locked({"--output": [args.output]}):
        convert_transforms(args.transforms, args.output, args.points, **conversion_options(args))
