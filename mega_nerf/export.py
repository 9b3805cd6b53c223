"""Export a field (usually the merged container) as a coloured point cloud: the surfaces seen from above.

The field's box is sampled on a regular grid of cubic cells (`resolution` cells along its longest side), one slab
of y at a time so that memory is bounded by the slab, never by the scene. Each vertical (y, z) column is read as a
ray looking straight down (x points down): the surface is where that ray has lost half its light, i.e. where the
accumulated optical depth sum(sigma * spacing) from the top first reaches ln 2 (NeRF's eq. 3), and the column
keeps that cell and the `layers` - 1 below it. This is robust to the faint fog of a briefly trained model, and
drops the insides of buildings and the ground beneath them. With `density_threshold`, a cell counts instead when
its own density reaches the threshold (first `layers` such cells per column). Colours are the field's, looking
straight down (+x) with one appearance index. With `--min_views K` (and the training dataset) a point is kept only
if at least K training images have it inside their view: regions few cameras see are guesses, and that is where
a briefly trained model leaves its fog (tests/test_export.py, bench/RESULTS.md). That dataset, and the one whose
coordinates.pt `--real_units` or dataparser_transforms.json `--source_frame` reads, must be the one the container
was trained on: the container's fingerprint of its images (names, sizes and poses, taken at `--train_scale_factor`)
is checked before the export begins. Those two files are not in the fingerprint: a copy with the same images and
another origin or frame passes.

    python scripts/export_ply.py --container_path merged.pt --output scene.ply [--min_views 8 --dataset_path D \
        --train_scale_factor 4]

Points are written in normalised DRB, in real-world DRB metres (`--real_units`) or in the COLMAP / transforms.json
world the dataset was converted from (`--source_frame`, through its dataparser_transforms.json).
"""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import numpy as np
import torch
from plyfile import PlyData, PlyElement
from tqdm import tqdm

from mega_nerf.allocator import keep_freed_blocks
from mega_nerf.data.dataset import Coordinates
from mega_nerf.data.frames import to_source_map
from mega_nerf.errors import UserError
from mega_nerf.evaluation.evaluate import load_checked_dataset
from mega_nerf.fields.base import Field
from mega_nerf.io import atomic_open, begins_with, memory_shortfall
from mega_nerf.merging.container import Container, load_container
from mega_nerf.rays import Cameras

DOWN = (1.0, 0.0, 0.0)  # +x is down in DRB
PLY_MAGIC = b"ply\n"  # the first line of every PLY file
# What export_points holds at once, counted from its code (the field's own temporaries, bounded by `chunk`, and the
# allocator's slack come on top): per cell of a slab, on the export's device, its centre twice (stacked, then
# reordered), density, colour, the column's optical depth, its running sum and the masks, 59 bytes; per point kept,
# on the host, its centre and colour as found and while they are joined, 48 bytes (a column keeps `layers`).
SLAB_CELL_BYTES, POINT_BYTES = 59, 48
DEFAULT_LAYERS, DEFAULT_CHUNK = 2, 1 << 18  # dense cells kept per column; points per field call


def field_box(field: Field) -> tuple[torch.Tensor, torch.Tensor]:
    """(box_min (3,), box_max (3,)) of a box field, or the union of a container's submodule boxes."""
    parts = list(field.submodules) if isinstance(field, Container) else [field]
    lo = torch.stack([p.box_min.float().cpu() for p in parts]).min(0).values
    hi = torch.stack([p.box_max.float().cpu() for p in parts]).max(0).values
    return lo, hi


def export_box(field: Field, altitude_range: tuple[float, float] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """`field_box` clipped to the altitude slab, where the renderer samples (never above its top plane or below
    the ground)."""
    box_min, box_max = field_box(field)
    if altitude_range is not None:
        box_min[0], box_max[0] = max(float(box_min[0]), altitude_range[0]), min(float(box_max[0]), altitude_range[1])
    return box_min, box_max


@torch.no_grad()
def _evaluate(field: Field, points: torch.Tensor, appearance: int, chunk: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Density (N,) and downward-looking rgb (N, 3) at points (N, 3); zero where the field says unoccupied
    (those points are not run through the networks)."""
    density = torch.zeros(points.shape[0], device=points.device)
    rgb = torch.zeros(points.shape[0], 3, device=points.device)
    for start in range(0, points.shape[0], chunk):
        block = points[start:start + chunk]
        index = field.occupied(block).nonzero()[:, 0]
        if index.numel() == 0:
            continue
        dirs = torch.tensor(DOWN, device=points.device).expand(index.numel(), 3)
        app = torch.full((index.numel(),), appearance, dtype=torch.long, device=points.device)
        sigma, color = field(block[index], dirs, app)
        density[start + index] = sigma.float()
        rgb[start + index] = color.float()
    return density, rgb


def grid_shape(box_min: torch.Tensor, box_max: torch.Tensor, resolution: int) -> tuple[float, list[int]]:
    """(cell side, [cells along x, y, z]) of export_points' grid over the box (3,): cubes, `resolution` of them
    along its longest side."""
    extent = box_max.double().cpu() - box_min.double().cpu()
    spacing = float(extent.max()) / resolution
    return spacing, [max(1, math.ceil(float(e) / spacing - 1e-9)) for e in extent]


def slab_rows(counts: list[int], chunk: int) -> int:
    """y values per slab of export_points, so that a slab is about one chunk (at least one whole x-z plane)."""
    return max(1, chunk // (counts[0] * counts[2]))


def export_memory(box_min: torch.Tensor, box_max: torch.Tensor, resolution: int, layers: int, chunk: int
                  ) -> tuple[int, int]:
    """(bytes on the export's device, bytes on the host) that export_points holds at once for this grid, as
    SLAB_CELL_BYTES and POINT_BYTES count them, with every column keeping `layers` points (over a city almost
    every column has a surface)."""
    _, (x, y, z) = grid_shape(box_min, box_max, resolution)
    return SLAB_CELL_BYTES * slab_rows([x, y, z], chunk) * x * z, POINT_BYTES * y * z * min(layers, x)


def check_export_memory(option: str, box_min: torch.Tensor, box_max: torch.Tensor, resolution: int, layers: int,
                        chunk: int, device: torch.device) -> None:
    """One-line UserError naming `option` (the resolution's) before an export whose grid would not fit in the
    memory available now (export_memory: the slab on `device`, the points on the host); torch's own error comes
    mid-export, as a traceback."""
    slab, points = export_memory(box_min, box_max, resolution, layers, chunk)
    if (short := memory_shortfall(device, points, slab)) is not None:
        what, needed, free = short
        counts = grid_shape(box_min, box_max, resolution)[1]
        raise UserError(f"{option} {resolution}: its grid of {' x '.join(map(str, counts))} cells needs about "
                        f"{needed / 2 ** 30:,.1f} GiB of {what}, {free / 2 ** 30:,.1f} GiB available; choose a "
                        "lower resolution")


def export_points(field: Field, box_min: torch.Tensor, box_max: torch.Tensor, resolution: int,
                  density_threshold: float | None = None, layers: int = DEFAULT_LAYERS, appearance: int = 0,
                  chunk: int = DEFAULT_CHUNK, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The top-visible dense cells of `field` in the box [box_min, box_max] (3,) (normalised DRB).

    Returns cell centres xyz (P, 3) float32 and colours (P, 3) uint8, in order of (y, z, x) cell index.
    `resolution`: cells along the box's longest side (cells are cubes); `density_threshold`: None to find where
    a downward ray has lost half its light; `layers`: cells kept per column; `chunk`: points per field call;
    `progress`: a progress bar over the slabs.
    """
    device = next(field.buffers()).device
    lo = box_min.double().cpu()
    spacing, counts = grid_shape(box_min, box_max, resolution)
    axes = [(lo[i] + (torch.arange(counts[i], dtype=torch.float64) + 0.5) * spacing).float().to(device)
            for i in range(3)]
    slab = slab_rows(counts, chunk)
    xyz, rgb = [], []
    for y0 in tqdm(range(0, counts[1], slab), desc="export", unit="slab", disable=not progress):
        ys = axes[1][y0:y0 + slab]
        grid = torch.stack(torch.meshgrid(ys, axes[2], axes[0], indexing="ij"), -1)  # (Y, Z, X, 3) y, z, x
        points = grid[..., [2, 0, 1]].reshape(-1, 3)  # to x, y, z; x fastest so each column is contiguous
        density, color = _evaluate(field, points, appearance, chunk)
        column = density.reshape(-1, counts[0])  # (columns, X), top first
        if density_threshold is None:  # monotone: true from the cell where half the light is gone
            dense = (column * spacing).cumsum(1) >= math.log(2.0)
        else:
            dense = column >= density_threshold
        keep = (dense & (dense.cumsum(1) <= layers)).reshape(-1)
        xyz.append(points[keep].cpu())
        rgb.append(color[keep].cpu())
    colors = (torch.cat(rgb).clamp(0, 1) * 255).round().to(torch.uint8)
    return torch.cat(xyz).numpy(), colors.numpy()


def count_views(xyz: torch.Tensor, cameras: Cameras, far: float, chunk: int = 1 << 14) -> torch.Tensor:
    """(P,) how many cameras see each point xyz (P, 3) (normalised DRB): in front of the camera, within `far`
    of it, and projecting inside its image (rays.py's pinhole convention inverted). Occlusion is not checked.
    Points are taken `chunk` at a time, so memory is chunk x cameras."""
    rot, centre = cameras.c2w[:, :, :3].to(xyz), cameras.c2w[:, :, 3].to(xyz)  # (I, 3, 3), (I, 3)
    fx, fy, cx, cy = cameras.intrinsics.to(xyz).unbind(-1)  # (I,) each
    counts = torch.zeros(xyz.shape[0], dtype=torch.long, device=xyz.device)
    for start in range(0, xyz.shape[0], chunk):
        offset = xyz[start:start + chunk, None, :] - centre  # (P', I, 3)
        local = torch.einsum("pij,ijk->pik", offset, rot)  # camera space: R^T (x - centre)
        depth = -local[..., 2]  # the camera looks along -z
        col = fx * local[..., 0] / depth + cx  # pixel edges: the image spans [0, W] x [0, H]
        row = cy - fy * local[..., 1] / depth
        seen = ((depth > 0) & (offset.norm(dim=-1) <= far) & (col >= 0) & (col <= cameras.width.to(xyz))
                & (row >= 0) & (row <= cameras.height.to(xyz)))
        counts[start:start + chunk] = seen.sum(1)
    return counts


def subsample(xyz: np.ndarray, rgb: np.ndarray, max_points: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """At most `max_points` of the points, drawn uniformly without replacement (seeded), in their order."""
    if len(xyz) <= max_points:
        return xyz, rgb
    keep = np.sort(np.random.default_rng(seed).choice(len(xyz), max_points, replace=False))
    return xyz[keep], rgb[keep]


def write_ply(path: str | os.PathLike, xyz: np.ndarray, rgb: np.ndarray) -> None:
    """A binary PLY with one vertex element: float x, y, z and uchar red, green, blue. xyz, rgb: (P, 3)."""
    vertex = np.zeros(len(xyz), [("x", "f4"), ("y", "f4"), ("z", "f4"), ("red", "u1"), ("green", "u1"),
                                 ("blue", "u1")])
    vertex["x"], vertex["y"], vertex["z"] = xyz.T
    vertex["red"], vertex["green"], vertex["blue"] = rgb.T
    with atomic_open(path) as f:
        PlyData([PlyElement.describe(vertex, "vertex")]).write(f)


def is_ply(path: Path) -> bool:
    """Whether `path` begins with the PLY magic line (what `write_ply` writes)."""
    return begins_with(path, PLY_MAGIC)


def to_real_units(xyz: np.ndarray, coordinates: Coordinates) -> np.ndarray:
    """Normalised (P, 3) -> real-world DRB metres: p * pose_scale_factor + origin_drb (in float64, then f4)."""
    real = xyz.astype(np.float64) * coordinates.pose_scale_factor + coordinates.origin_drb.numpy()
    return real.astype(np.float32)


def check_args(args: argparse.Namespace, n_images: int) -> None:
    """One-line UserError for an option out of range."""
    for option in ("resolution", "max_points", "layers", "chunk"):
        if getattr(args, option) < 1:
            raise UserError(f"--{option} must be at least 1, got {getattr(args, option)}")
    if not 0 <= args.appearance < n_images:
        raise UserError(f"--appearance {args.appearance} is not an image index (0 to {n_images - 1})")
    if args.density_threshold is not None and not args.density_threshold > 0:
        raise UserError(f"--density_threshold must be positive, got {args.density_threshold}")
    if args.min_views < 0:
        raise UserError(f"--min_views must be at least 0, got {args.min_views}")
    for option in ("real_units", "source_frame", "min_views"):
        if getattr(args, option) and args.dataset_path is None:
            raise UserError(f"--{option} needs --dataset_path (its coordinates.pt, dataparser_transforms.json and "
                            "cameras)")
    if args.real_units and args.source_frame:
        raise UserError("--real_units and --source_frame exclude each other: choose one frame")


def export_ply(args: argparse.Namespace) -> Path:
    """Export the container named by the options (cli.export's parser); returns the PLY path."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    keep_freed_blocks(device)  # each slab's temporaries, reused (allocator.py: 82 s against 201 s on the demo)
    container, info = load_container(args.container_path, device)
    check_args(args, info.n_images)
    box_min, box_max = export_box(container, info.altitude_range)
    check_export_memory("--resolution", box_min, box_max, args.resolution, args.layers, args.chunk,
                        torch.device(device))
    to_source = to_source_map(args.dataset_path, "--source_frame") if args.source_frame else None
    dataset = None
    if args.min_views > 0 or args.real_units or args.source_frame:  # the container's own, checked before the export
        scale = args.train_scale_factor
        dataset = load_checked_dataset(info, args.dataset_path, scale, scale)
    coordinates = dataset.coordinates if args.real_units else None  # to metres
    cameras = Cameras.from_dataset(dataset) if args.min_views > 0 else None  # to count views
    xyz, rgb = export_points(container, box_min, box_max, args.resolution, args.density_threshold, args.layers,
                             args.appearance, args.chunk, not args.no_progress)
    found = len(xyz)
    if cameras is not None:
        views = count_views(torch.from_numpy(xyz).to(device), cameras, info.far).cpu()
        keep = (views >= args.min_views).numpy()
        print(f"kept {int(keep.sum())} of {found} points seen by at least {args.min_views} training views")
        xyz, rgb = xyz[keep], rgb[keep]
    xyz, rgb = subsample(xyz, rgb, args.max_points)
    units = "normalised DRB"
    if coordinates is not None:
        xyz, units = to_real_units(xyz, coordinates), "real-world DRB metres"
    if to_source is not None:
        xyz, units = to_source.points(xyz).astype(np.float32), "the source frame of dataparser_transforms.json"
    output = Path(args.output)
    write_ply(output, xyz, rgb)
    print(f"wrote {len(xyz)} points ({found} found) to {output} ({units}, "
          f"{output.stat().st_size / 2 ** 10:.0f} KiB)")
    return output
