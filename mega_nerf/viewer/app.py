"""`mega-nerf-view`: a merged container in the browser, with its dataset's training cameras and a point cloud of
its surfaces (export.export_points, at a coarse `point_resolution`)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mega_nerf.camera_path import camera_centres
from mega_nerf.errors import UserError
from mega_nerf.evaluation.evaluate import load_checked_dataset
from mega_nerf.export import (
    DEFAULT_CHUNK,
    DEFAULT_LAYERS,
    check_export_memory,
    export_box,
    export_points,
    field_box,
    grid_shape,
)
from mega_nerf.merging.container import load_container
from mega_nerf.viewer.scene import PREVIEW_SAMPLES, Scene, view_chunk
from mega_nerf.viewer.server import Viewer, check_address, check_path_file, home_pose


@dataclass(frozen=True)
class ViewerConfig:
    """One viewer, as `mega-nerf-view` was asked for it (built in cli/view)."""

    container_path: str
    dataset_path: str | None = None  # training cameras, nearest appearance; None: neither
    host: str = "0.0.0.0"
    port: int = 7007  # the next free one if taken; 0: any free port
    max_resolution: int = 1920  # longer side of a full frame, pixels (the canvas, scaled down)
    target_fps: float = 10.0  # frames per second while the camera moves (previews sized to match)
    preview_samples: float = PREVIEW_SAMPLES  # share of the samples per ray previews take, in (0, 1]
    point_resolution: int = 128  # cells along the box's longest side of the point cloud; 0: none
    path_file: str = "viewer_path.txt"  # where "Save path" writes the key poses
    train_scale_factor: int = 1  # the scale the submodules were trained at (checks the dataset)
    ray_chunk: int | None = None  # rays rendered at once; None: scene.view_chunk for the device
    progress: bool = True  # a progress bar while the point cloud is built


def check(config: ViewerConfig) -> None:
    """One-line UserError, before anything slow, for an option out of range, a --path_file that "Save path"
    would destroy, or a --host this machine cannot serve on."""
    for option in ("max_resolution", "train_scale_factor"):
        if getattr(config, option) < 1:
            raise UserError(f"--{option} must be at least 1, got {getattr(config, option)}")
    if not config.target_fps > 0:
        raise UserError(f"--target_fps must be positive, got {config.target_fps}")
    if not 0 < config.preview_samples <= 1:
        raise UserError(f"--preview_samples must be in (0, 1], got {config.preview_samples}")
    if config.point_resolution < 0 or (config.ray_chunk is not None and config.ray_chunk < 1):
        raise UserError("--point_resolution must be at least 0 and --ray_chunk at least 1")
    check_path_file(config.path_file, {"--container_path": [config.container_path],
                                       "--dataset_path": [config.dataset_path]})
    check_address(config.host, config.port)


def open_viewer(config: ViewerConfig) -> Viewer:
    """Load the container (and dataset), build the point cloud and start serving; returns the running viewer."""
    check(config)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    container, info = load_container(config.container_path, device)
    box_min, box_max = export_box(container, info.altitude_range)
    if config.point_resolution:
        check_export_memory("--point_resolution", box_min, box_max, config.point_resolution, DEFAULT_LAYERS,
                            DEFAULT_CHUNK, device)
    dataset = None
    if config.dataset_path is not None:
        dataset = load_checked_dataset(info, config.dataset_path, config.train_scale_factor,
                                       config.train_scale_factor)
    chunk = view_chunk(device) if config.ray_chunk is None else config.ray_chunk
    scene = Scene(container, info.bounds, info.render, chunk, info.n_images, preview_samples=config.preview_samples)
    points = None
    if config.point_resolution:
        spacing, counts = grid_shape(box_min, box_max, config.point_resolution)
        print(f"point cloud: the top surfaces in a grid of {' x '.join(map(str, counts))} cells (--point_resolution "
              f"{config.point_resolution}; 0: none)")
        xyz, rgb = export_points(container, box_min, box_max, config.point_resolution, progress=config.progress)
        points = xyz, rgb, spacing
    centres = None if dataset is None else camera_centres(dataset)
    box = tuple(t.double().numpy() for t in field_box(container))
    ground = None if info.altitude_range is None else info.altitude_range[1]
    home, target = home_pose(centres, box, ground)
    return Viewer(scene, None if dataset is None else dataset.train, centres, points, home, target, config.host,
                  config.port, config.max_resolution, config.target_fps, config.path_file)
