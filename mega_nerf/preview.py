"""Look at a dataset before spending GPU time on it: cameras, sparse points, altitude slab and cells.

`render_preview` draws two panels (OpenCV, BGR): a top view (y to the right, z down the page, as seen from
above since x points down) and a side view (y to the right, x down the page) with the slab's top and ground
planes. `scene_report` says in words what is likely wrong (cameras below the ground, cameras looking up...).
`write_cameras_ply` exports the training cameras for a 3D viewer. Everything is in normalised DRB units.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import yaml
from plyfile import PlyData, PlyElement

from mega_nerf.data.dataset import Dataset, ImageMetadata, decode_image, load_dataset
from mega_nerf.data.frames import Similarity
from mega_nerf.errors import UserError
from mega_nerf.io import atomic_open, write_bgr
from mega_nerf.partition.cells import PartitionParams, load_params, params_file
from mega_nerf.rays import camera_directions, normalize_altitude_range

TRAIN, VAL = (200, 100, 20), (170, 0, 200)  # BGR
TOP, GROUND, CELLS = (200, 160, 0), (30, 130, 30), (40, 40, 170)
TITLE_ROWS, PAD = 34, 16
FONT = cv2.FONT_HERSHEY_SIMPLEX
MAX_DRAWN_POINTS = 200_000
# The largest --size: the image is then 16384 pixels wide, the widest texture many GPUs (and so image viewers)
# draw. Dots, lines and text have fixed pixel sizes, so a larger image only spreads them further apart, while
# drawing it takes about 9 bytes a pixel with cells (labels, masks; measured at --size 3000): 1.1 GiB here.
MAX_PREVIEW_SIZE = 8192
# The smallest: the side view's panel is 0.7 size - TITLE_ROWS rows high, none below 49 (with cells drawn, 50 divided
# by zero and 30 asked numpy for negative sizes); at 100 it keeps 36 rows under its title.
MIN_PREVIEW_SIZE = 100


@dataclass
class PreviewScene:
    """What the preview draws, in normalised DRB units."""

    centres: np.ndarray  # (N, 3) camera centres
    forwards: np.ndarray  # (N, 3) unit viewing directions (-back axis)
    is_val: np.ndarray  # (N,) bool
    points: np.ndarray  # (P, 3) sparse points, P may be 0
    colors: np.ndarray | None  # (P, 3) uint8 RGB
    altitude: tuple[float, float] | None  # (top, ground) down-coordinates
    altitude_source: str
    centroids: np.ndarray | None  # (K, 3)
    boundary_margin: float | None
    notes: list[str]  # problems found while loading


def _altitude(dataset: Dataset, given: list[float] | None, params: PartitionParams | None, params_path: Path | None
              ) -> tuple[tuple[float, float] | None, str]:
    """The normalised slab and where it came from: the option, the dataset's config.yaml, then params.pt."""
    config = dataset.path / "config.yaml"
    if given is None and config.is_file():
        given = (yaml.safe_load(config.read_text()) or {}).get("ray_altitude_range")
        source = str(config)
    else:
        source = "--ray_altitude_range"
    if given is not None:
        if len(given) != 2 or float(given[0]) >= float(given[1]):
            raise UserError(f"{source}: ray_altitude_range must be [top, ground] with top < ground (x is down)")
        return normalize_altitude_range([float(v) for v in given], dataset.coordinates), source
    if params is not None:
        return params.ray_altitude_range, str(params_path)
    return None, "nowhere"


def _image_notes(dataset: Dataset) -> list[str]:
    """A warning naming the images that do not decode whole (training would stop at the first of them); each
    is decoded at an eighth of its size, which still reads every byte."""
    bad = []
    for m in dataset.images:
        try:
            decode_image(m.image_path, cv2.IMREAD_REDUCED_COLOR_8)
        except UserError:
            bad.append(m.image_path.name)
    if not bad:
        return []
    more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
    return [f"warning: {len(bad)} images are unreadable or truncated (training stops at them): "
            f"{', '.join(bad[:3])}{more}"]


def load_preview_scene(dataset_path: str | os.PathLike, partition_path: str | os.PathLike | None = None,
                       ray_altitude_range: list[float] | None = None) -> PreviewScene:
    """Cameras from the dataset, points from `points3D.npy` (+ `points3D_rgb.npy`) when present, the slab
    (real-world range given, else config.yaml next to the data, else params.pt), centroids from params.pt."""
    ds = load_dataset(dataset_path)
    c2w = torch.stack([m.c2w for m in ds.images]).double().numpy()
    points, colors = np.zeros((0, 3)), None
    if (ds.path / "points3D.npy").is_file():
        points = np.load(ds.path / "points3D.npy").astype(np.float64)
        if points.ndim != 2 or points.shape[1] != 3:
            raise UserError(f"{ds.path / 'points3D.npy'}: expected (P, 3) points, got {points.shape}")
        rgb_file = ds.path / "points3D_rgb.npy"
        colors = np.load(rgb_file) if rgb_file.is_file() else None
        colors = colors if colors is not None and colors.shape == points.shape else None
    params_path = None if partition_path is None else params_file(partition_path)
    params = None if params_path is None else load_params(params_path)
    altitude, source = _altitude(ds, ray_altitude_range, params, params_path)
    notes = _image_notes(ds)
    if params is not None and (not torch.allclose(params.origin_drb, ds.coordinates.origin_drb)
                               or abs(params.pose_scale_factor - ds.coordinates.pose_scale_factor) > 1e-9):
        notes.append(f"warning: {params_path} was made for another origin or scale than this dataset")
    return PreviewScene(c2w[:, :, 3], -c2w[:, :, 2], np.array([m.split == "val" for m in ds.images]),
                        points, colors, altitude, source,
                        None if params is None else params.centroids.double().numpy(),
                        None if params is None else params.boundary_margin, notes)


def scene_report(scene: PreviewScene) -> list[str]:
    """Lines describing the scene, with warnings for what usually means a wrong up axis or slab."""
    c, n = scene.centres, len(scene.centres)
    lines = [f"cameras: {n - scene.is_val.sum()} train, {scene.is_val.sum()} val; x (down) "
             f"[{c[:, 0].min():.3f}, {c[:, 0].max():.3f}], y [{c[:, 1].min():.3f}, {c[:, 1].max():.3f}], "
             f"z [{c[:, 2].min():.3f}, {c[:, 2].max():.3f}] (normalised)", f"sparse points: {len(scene.points)}"]
    if (scene.forwards[:, 0] < -0.1).mean() > 0.5:
        lines.append("warning: most cameras look up (-x): the up axis is probably flipped")
    if scene.altitude is None:
        lines.append("no ray_altitude_range: pass --ray_altitude_range or add it to the dataset's config.yaml")
        return lines + scene.notes
    top, ground = scene.altitude
    lines.append(f"altitude slab (normalised x): top {top:.4f}, ground {ground:.4f} (from {scene.altitude_source})")
    below = int((c[:, 0] > ground).sum())
    if below:
        lines.append(f"warning: {below} of {n} cameras lie below the ground plane: up axis or slab is wrong")
    above = int((c[:, 0] < top).sum())
    if above:
        lines.append(f"note: {above} cameras lie above the top plane (their rays start where they cross it)")
    if len(scene.points):
        low = float((scene.points[:, 0] > ground).mean())
        if low > 0.05:
            lines.append(f"warning: {100 * low:.0f}% of the sparse points lie below the ground plane: "
                         "move the ground down (a larger down-coordinate)")
    return lines + scene.notes


class _Panel:
    """Maps two world coordinates (a to the right, b down the page) into a panel's plot area."""

    def __init__(self, left: int, top: int, width: int, height: int, a_range: tuple[float, float],
                 b_range: tuple[float, float], equal: bool):
        sa = width / max(a_range[1] - a_range[0], 1e-9)
        sb = height / max(b_range[1] - b_range[0], 1e-9)
        self.sa, self.sb = (min(sa, sb),) * 2 if equal else (sa, sb)
        self.a0 = left + (width - self.sa * (a_range[1] - a_range[0])) / 2 - self.sa * a_range[0]
        self.b0 = top + (height - self.sb * (b_range[1] - b_range[0])) / 2 - self.sb * b_range[0]

    def px(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """(M, 2) int32 pixel (col, row) of coordinates a, b (M,)."""
        return np.stack([self.a0 + self.sa * a, self.b0 + self.sb * b], -1).round().astype(np.int32)


def _padded(values: np.ndarray) -> tuple[float, float]:
    lo, hi = float(values.min()), float(values.max())
    pad = 0.08 * max(hi - lo, 1e-3)
    return lo - pad, hi + pad


def _extent(scene: PreviewScene) -> np.ndarray:
    """Positions (M, 3) that must be visible: cameras, the bulk of the points, centroids."""
    parts = [scene.centres]
    if len(scene.points):
        parts.append(np.percentile(scene.points, [1, 99], axis=0))
    if scene.centroids is not None:
        parts.append(scene.centroids)
    return np.concatenate(parts)


def _draw_cells(img: np.ndarray, panel: _Panel, area: tuple[int, int, int, int], scene: PreviewScene) -> None:
    """Nearest-centroid cells on the top view (horizontal distance): boundaries as lines, and a tint where a
    point at the centroids' altitude is within `boundary_margin` of several centroids."""
    left, top, width, height = area
    y = ((np.arange(left, left + width) - panel.a0) / panel.sa).astype(np.float32)
    cent = scene.centroids[:, 1:].astype(np.float32)
    labels = np.empty((height, width), np.int64)
    shared = np.zeros((height, width), bool)
    for r in range(0, height, 32):  # blocks of rows bound the (rows, width, K) distances
        z = ((np.arange(top + r, top + min(r + 32, height)) - panel.b0) / panel.sb).astype(np.float32)
        d = np.hypot(y[None, :, None] - cent[:, 0], z[:, None, None] - cent[:, 1])
        labels[r:r + len(z)] = d.argmin(-1)
        if scene.boundary_margin:
            shared[r:r + len(z)] = (d <= scene.boundary_margin * d.min(-1, keepdims=True)).sum(-1) > 1
    img[top:top + height, left:left + width][shared] = (225, 240, 250)
    edges = np.zeros_like(labels, bool)
    edges[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edges[1:] |= labels[1:] != labels[:-1]
    img[top:top + height, left:left + width][edges] = CELLS


def _draw_points(img: np.ndarray, pix: np.ndarray, colors: np.ndarray, cols: tuple[int, int]) -> None:
    """2x2-pixel dots at pix (M, 2) (col, row) in colours (M, 3) BGR, clipped to the columns [cols)."""
    for dc, dr in ((0, 0), (1, 0), (0, 1), (1, 1)):
        c, r = pix[:, 0] + dc, pix[:, 1] + dr
        inside = (c >= cols[0]) & (c < cols[1]) & (r >= 0) & (r < img.shape[0])
        img[r[inside], c[inside]] = colors[inside]


def _draw_cameras(img: np.ndarray, panel: _Panel, scene: PreviewScene, a: int, b: int) -> None:
    """Dots at the centres, 14-pixel lines along the viewing directions projected on the panel (nadir: a dot
    in the top view)."""
    start = panel.px(scene.centres[:, a], scene.centres[:, b])
    end = start + (14 * scene.forwards[:, [a, b]]).round().astype(np.int32)  # true angles, also when exaggerated
    for s, e, val in zip(start, end, scene.is_val, strict=True):
        colour = VAL if val else TRAIN
        cv2.line(img, tuple(map(int, s)), tuple(map(int, e)), colour, 1, cv2.LINE_AA)
        cv2.circle(img, tuple(map(int, s)), 3, colour, -1, cv2.LINE_AA)


def _text(img: np.ndarray, text: str, col: int, row: int, colour: tuple[int, int, int] = (0, 0, 0)) -> None:
    cv2.putText(img, text, (col, row), FONT, 0.45, colour, 1, cv2.LINE_AA)


def _point_sample(scene: PreviewScene) -> tuple[np.ndarray, np.ndarray]:
    """At most MAX_DRAWN_POINTS points (M, 3), highest last (seen from above), and their BGR colours (M, 3)."""
    rng = np.random.default_rng(0)
    keep = rng.permutation(len(scene.points))[:MAX_DRAWN_POINTS]
    keep = keep[np.argsort(-scene.points[keep, 0], kind="stable")]
    colors = scene.colors[keep, ::-1] if scene.colors is not None else np.full((len(keep), 3), 150, np.uint8)
    return scene.points[keep], colors


def render_preview(scene: PreviewScene, size: int = 800) -> np.ndarray:
    """(size, 2 * size, 3) uint8 BGR: top view on the left, side view (with the slab) on the right."""
    img = np.full((size, 2 * size, 3), 255, np.uint8)
    ext = _extent(scene)
    area = (PAD, TITLE_ROWS, size - 2 * PAD, size - TITLE_ROWS - PAD)
    top_view = _Panel(*area, _padded(ext[:, 1]), _padded(ext[:, 2]), equal=True)
    xs = ext[:, 0] if scene.altitude is None else np.concatenate([ext[:, 0], scene.altitude])
    side_area = (size + PAD, TITLE_ROWS, size - 2 * PAD, int(0.7 * size) - TITLE_ROWS)
    side = _Panel(*side_area, _padded(ext[:, 1]), _padded(xs), equal=False)
    side.sa, side.a0 = top_view.sa, top_view.a0 + size  # same y scale as the top view
    if scene.centroids is not None:
        _draw_cells(img, top_view, area, scene)
    if len(scene.points):
        points, colors = _point_sample(scene)
        _draw_points(img, top_view.px(points[:, 1], points[:, 2]), colors, (0, size))
        _draw_points(img, side.px(points[:, 1], points[:, 0]), np.full_like(colors, 150), (size, 2 * size))
    if scene.altitude is not None:
        for x, colour, name in zip(scene.altitude, (TOP, GROUND), ("top", "ground"), strict=True):
            row = int(side.px(np.zeros(1), np.array([x]))[0, 1])
            cv2.line(img, (size + PAD, row), (2 * size - PAD, row), colour, 1, cv2.LINE_AA)
            _text(img, f"{name} x={x:.3f}", size + PAD + 4, row - 4, colour)
    _draw_cameras(img, top_view, scene, 1, 2)
    _draw_cameras(img, side, scene, 1, 0)
    if scene.centroids is not None:
        for k, (u, v) in enumerate(top_view.px(scene.centroids[:, 1], scene.centroids[:, 2])):
            cv2.drawMarker(img, (int(u), int(v)), (0, 0, 0), cv2.MARKER_CROSS, 12, 2)
            _text(img, str(k), int(u) + 5, int(v) - 5)
    _text(img, "top view, from above: y right, z down the page", PAD, 22)
    _text(img, f"side view: y right, x (down) down the page, height x{side.sb / side.sa:.1f}", size + PAD, 22)
    cv2.line(img, (size, 0), (size, size), (0, 0, 0), 1)
    legend = [("train cameras", TRAIN), ("val cameras", VAL), (f"{len(scene.points)} sparse points", (150,) * 3)]
    for i, (name, colour) in enumerate(legend):
        _text(img, name, size + PAD, int(0.7 * size) + 30 + 20 * i, colour)
    return img


def write_preview(dataset_path: str | os.PathLike, output: str | os.PathLike,
                  partition_path: str | os.PathLike | None = None, ray_altitude_range: list[float] | None = None,
                  size: int = 800) -> list[str]:
    """Render the preview PNG to `output`; returns the report lines."""
    scene = load_preview_scene(dataset_path, partition_path, ray_altitude_range)
    write_bgr(output, render_preview(scene, size))
    return scene_report(scene)


def frustum_corners(meta: ImageMetadata, depth: float) -> torch.Tensor:
    """(4, 3) float64 world points of the image's corners (top-left, top-right, bottom-right, bottom-left)
    `depth` normalised units in front of the camera along its axis."""
    d = camera_directions(meta.intrinsics.double(), torch.tensor([0.0, meta.W, meta.W, 0], dtype=torch.float64),
                          torch.tensor([0.0, 0, meta.H, meta.H], dtype=torch.float64), center=0.0)
    return meta.c2w[:, 3].double() + depth * d @ meta.c2w[:, :3].double().T


def write_cameras_ply(dataset: Dataset, path: str | os.PathLike, frusta: bool = False, depth: float = 0.05,
                      to_frame: Similarity | None = None) -> int:
    """The training cameras as a PLY in normalised DRB (or, with `to_frame`, mapped by it, e.g. to the source
    world): a vertex per centre, plus, with `frusta`, a vertex per image corner `depth` normalised units in front
    and edges outlining each frustum. Returns the number of cameras."""
    cams = dataset.train
    centres = torch.stack([m.c2w[:, 3] for m in cams]).double()
    vertices, elements = [centres], []
    if frusta:
        n = len(cams)
        vertices += [frustum_corners(m, depth) for m in cams]
        corner = n + 4 * np.arange(n)[:, None] + np.arange(4)  # (n, 4) vertex indices
        edge = np.zeros(8 * n, [("vertex1", "i4"), ("vertex2", "i4")])
        edge["vertex1"] = np.concatenate([np.repeat(np.arange(n), 4), corner.ravel()])  # centre to corners,
        edge["vertex2"] = np.concatenate([corner.ravel(), np.roll(corner, -1, 1).ravel()])  # corner to corner
        elements.append(PlyElement.describe(edge, "edge"))
    xyz = torch.cat(vertices).numpy()
    if to_frame is not None:
        xyz = to_frame.points(xyz)
    vertex = np.zeros(len(xyz), [("x", "f4"), ("y", "f4"), ("z", "f4"), ("red", "u1"), ("green", "u1"),
                                 ("blue", "u1")])
    vertex["x"], vertex["y"], vertex["z"] = xyz.T
    vertex["red"], vertex["green"], vertex["blue"] = TRAIN[::-1]
    with atomic_open(path) as f:
        PlyData([PlyElement.describe(vertex, "vertex"), *elements]).write(f)
    return len(cams)
