"""`mega-nerf-view` (and `scripts/view.py`): a merged container in the browser (mega_nerf/viewer)."""
from __future__ import annotations

import configargparse

from mega_nerf.cli.options import base_parser, config_from_args


def view_parser() -> configargparse.ArgParser:
    p = base_parser("Serve a merged container to the browser: renders from the browser's camera (low resolution "
                    "while it moves, full at rest), the training cameras, a point cloud, depth and cell overlays, "
                    "and camera paths for mega-nerf-render. Rays use the near/far/altitude range stored in the "
                    "container.")
    p.add_argument("--container_path", type=str, help="container file from scripts/merge_submodules.py")
    p.add_argument("--host", type=str, default="0.0.0.0",
                   help="address of this machine to serve on (0.0.0.0: every one)")
    p.add_argument("--port", type=int, default=7007,
                   help="port to serve on (the next free one if taken; 0: any free port)")
    p.add_argument("--max_resolution", type=int, default=1920,
                   help="longer side of a full frame in pixels (the browser's canvas, scaled down to this)")
    p.add_argument("--target_fps", type=float, default=10.0,
                   help="frames per second while the camera moves: previews are sized to render in 1 / this")
    p.add_argument("--preview_samples", type=float, default=0.5,
                   help="share of the container's samples per ray (of each kind) that previews, the "
                        "frames shown while the camera moves, are rendered with: 0.5 about halves their cost; "
                        "1: the full frame's settings")
    p.add_argument("--point_resolution", type=int, default=128,
                   help="point cloud cells along the scene box's longest side (0: no point cloud)")
    p.add_argument("--path_file", type=str, default="viewer_path.txt",
                   help="pose file the 'Save path' button writes (for mega-nerf-render --path); it replaces "
                        "only an earlier pose file")
    p.add_argument("--train_scale_factor", type=int, default=1,
                   help="the scale the submodules were trained at (to check the container's dataset)")
    p.add_argument("--ray_chunk", type=int, default=None,
                   help="rays rendered at once, bounds memory (default: 524288 on a GPU, 8192 on a CPU)")
    p.add_argument("--no_progress", action="store_true", help="no progress bar while the point cloud is built")
    return p


def main(argv: list[str] | None = None) -> None:
    from mega_nerf.viewer.app import ViewerConfig, open_viewer  # here: --help needs neither torch nor viser

    config = config_from_args(ViewerConfig, view_parser().parse_args(argv), ("container_path",))
    viewer = open_viewer(config)
    print(f"viewer at {viewer.url} (Ctrl-C to stop)")
    try:
        viewer.server.sleep_forever()
    except KeyboardInterrupt:
        viewer.close()
