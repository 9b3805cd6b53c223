"""Render new views through a merged container along a camera path, to PNG frames and an MP4.

python scripts/render_images.py --container_path merged.pt --dataset_path D --output renders \
    [--path poses.txt] [--frames 120] [--height 480]      (--help describes the pose file)
"""
from __future__ import annotations

from mega_nerf.camera_path import render_images, render_parser
from mega_nerf.errors import run_cli


def main() -> None:
    render_images(render_parser().parse_args())


if __name__ == "__main__":
    run_cli(main)
