"""`mega-nerf-render` (and `scripts/render_images.py`): render new views through a merged container along a
camera path, to PNG frames and an MP4."""
from __future__ import annotations

from pathlib import Path

import configargparse

from mega_nerf.camera_path import POSE_FILE_FORMAT, PathConfig, check_output_folder, render_images
from mega_nerf.cli.options import base_parser, config_from_args, parse_through_container, record_options
from mega_nerf.lock import locked


def render_parser() -> configargparse.ArgParser:
    p = base_parser("Render new views through a container along a camera path, to PNG frames and an MP4. Rays use "
                    "the near/far/altitude range stored in the container: --near, --far, --ray_altitude_range, "
                    "--boundary_margin, --cluster_2d and --foreground_scale are read from a shared config file "
                    "but refused on the command line.")
    p.epilog = POSE_FILE_FORMAT
    p.add_argument("--container_path", type=str, help="container file from scripts/merge_submodules.py")
    p.add_argument("--output", type=str, help="directory for frames/<00000>.png and video.mp4")
    p.add_argument("--path", type=str, default=None,
                   help="pose file (format below) or nerfstudio camera_path.json; default: an orbit")
    p.add_argument("--dataparser_transforms", type=str, default=None,
                   help="nerfstudio's dataparser_transforms.json of its run on the same data: a camera_path.json "
                        "read or written is then in nerfstudio's world")
    p.add_argument("--frames", type=int, default=120, help="frames in the video, spread over the path")
    p.add_argument("--height", type=int, default=None, help="frame height in pixels (default: the poses')")
    p.add_argument("--fps", type=float, default=30.0, help="video frame rate")
    p.add_argument("--train_scale_factor", type=int, default=1,
                   help="the scale the submodules were trained at (to check the container's dataset)")
    p.add_argument("--ray_chunk", type=int, default=None,
                   help="rays rendered at once, bounds memory (default: 262144 on a GPU, 8192 on a CPU)")
    p.add_argument("--no_progress", action="store_true", help="no progress bar (logs, benchmarks)")
    return p


def path_config(args: configargparse.Namespace) -> PathConfig:
    """The options as a PathConfig (one-line errors for missing ones)."""
    return config_from_args(PathConfig, args, ("container_path", "dataset_path", "output"))


def config_from_argv(argv: list[str] | None) -> PathConfig:
    """A PathConfig from command-line words (None: sys.argv's), as `mega-nerf-render` builds it; the scene
    options the container carries are refused on the command line (options.parse_through_container)."""
    return path_config(parse_through_container(render_parser(), argv, "rendering"))


def main(argv: list[str] | None = None) -> Path:
    config = config_from_argv(argv)
    check_output_folder(config)  # before the lock, whose file lies beside the folder (render_images checks again)
    with locked({"--output": [config.output]}):
        return render_images(config, on_ready=lambda: record_options(config, Path(config.output)))
