"""Ground truth for judging geometry on a synthetic city: its true surface points, from the depth maps that
`generate_city(write_depth=True)` writes, and how many of a model's points lie near them."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from scipy.spatial import cKDTree

from mega_nerf.data.dataset import ImageMetadata, load_dataset
from mega_nerf.errors import UserError
from mega_nerf.rays import image_rays


def depth_map(dataset_path: Path, meta: ImageMetadata) -> torch.Tensor:
    """(H * W,) the generator's depth of each pixel of an image (inf where its ray sees the sky), in the units of
    the loader's ray directions; a one-line UserError where the map is missing or of another size."""
    path = Path(dataset_path) / "depth" / meta.split / f"{meta.name}.npy"
    if not path.is_file():
        raise UserError(f"{path}: missing (generate the city with write_depth=True)")
    depth = torch.from_numpy(np.load(path)).reshape(-1)
    if depth.numel() != meta.W * meta.H:
        raise UserError(f"{path}: {depth.numel()} depths for a {meta.W}x{meta.H} image (another scale factor?)")
    return depth


def surface_points(dataset_path: Path, stride: int = 4) -> np.ndarray:
    """(P, 3) true surface points in normalised DRB: origin + depth * direction for every `stride`-th pixel along
    each axis of every image (train and val, so the whole surveyed city is covered) whose ray hits the city."""
    dataset_path = Path(dataset_path)
    points = []
    for meta in load_dataset(dataset_path).images:
        depth = depth_map(dataset_path, meta)
        origins, dirs = image_rays(meta.c2w, meta.intrinsics, meta.W, meta.H)
        keep = torch.zeros(meta.H, meta.W, dtype=torch.bool)
        keep[::stride, ::stride] = True
        hit = torch.isfinite(depth) & keep.reshape(-1)
        points.append((origins[hit] + depth[hit, None] * dirs[hit]).double().numpy())
    return np.concatenate(points)


def surface_distances(xyz: np.ndarray, dataset_path: Path) -> np.ndarray:
    """(P,) distance from each point (P, 3) (normalised DRB) to the nearest true surface point."""
    return cKDTree(surface_points(dataset_path)).query(xyz)[0]


def near_surface_fractions(xyz: np.ndarray, dataset_path: Path, tolerances: list[float]) -> list[float]:
    """Per tolerance (normalised units), the fraction of points (P, 3) (normalised DRB) within it of a true
    surface point. The surface is read once, however many tolerances."""
    distance = surface_distances(xyz, dataset_path)
    return [float(np.mean(distance <= tolerance)) for tolerance in tolerances]
