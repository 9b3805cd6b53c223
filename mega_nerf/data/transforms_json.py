"""Read a nerfstudio / instant-ngp `transforms.json` into a SceneInput for the shared converter.

Each frame has `file_path` (relative to the json) and `transform_matrix`: camera-to-world in the OpenGL
camera convention (x right, y up, z back), which is the NeRF camera we use. Intrinsics (`fl_x`, `fl_y`, `cx`,
`cy`, `w`, `h`, or `camera_angle_x`/`camera_angle_y`) and distortion (`k1`, `k2`, `k3`, `p1`, `p2`) are
per frame or shared at the top level. Sparse points come from `ply_file_path` (nerfstudio) or `points_path`.
"""
from __future__ import annotations

import math
import os
from pathlib import Path, PurePosixPath

import cv2
import numpy as np
from plyfile import PlyData, PlyParseError

from mega_nerf.data.convert import (
    Conversion,
    SceneInput,
    check_intrinsics,
    convert,
    keep_existing_images,
    unique_stems,
)
from mega_nerf.data.dataset import IMAGE_EXTENSIONS, rotation_problem
from mega_nerf.errors import UserError
from mega_nerf.io import read_json

SUPPORTED_CAMERA_MODELS = ("OPENCV", "PINHOLE", "SIMPLE_PINHOLE")


def _image_path(root: Path, file_path: str) -> Path:
    """The frame's image; original-NeRF files name it without extension, so try the layout's extensions."""
    path = root / file_path
    if path.suffix or path.is_file():
        return path
    return next((path.with_suffix(e) for e in IMAGE_EXTENSIONS if path.with_suffix(e).is_file()), path)


def _image_size(path: Path) -> tuple[int, int]:
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise UserError(f"{path}: unreadable image (needed for its size: the json gives no w and h)")
    return img.shape[1], img.shape[0]


def _number(get: dict, key: str, where: str, default: float | None = None) -> float:
    """get[key] (or `default` when absent) as a finite float; UserError naming the key otherwise."""
    value = get.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{where}: '{key}' must be a finite number, got {value!r}")
    return float(value)


def _pixels(get: dict, key: str, where: str) -> int:
    """get[key] as a positive whole number of pixels (64.0 is one, 64.9 is not); UserError naming the key."""
    value = _number(get, key, where)
    if value <= 0 or not value.is_integer():
        raise UserError(f"{where}: '{key}' must be a positive whole number of pixels, got {get[key]!r}")
    return int(value)


def _focal_from_angle(get: dict, key: str, side: int, where: str) -> float:
    """The focal length in pixels of a field of view get[key] (radians) across `side` pixels."""
    angle = _number(get, key, where)
    if not 0 < angle < math.pi:
        raise UserError(f"{where}: '{key}' must be an angle in radians between 0 and pi, got {angle!r}")
    return 0.5 * side / math.tan(0.5 * angle)


def _intrinsics(get: dict, path: Path, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(W, H), (fx, fy, cx, cy) and OpenCV distortion of one frame merged over the top level."""
    model = get.get("camera_model", "OPENCV")
    if model not in SUPPORTED_CAMERA_MODELS:
        raise UserError(f"{where}: camera model {model} is not supported (supported: "
                        f"{', '.join(SUPPORTED_CAMERA_MODELS)})")
    if _number(get, "k4", where, 0.0):
        raise UserError(f"{where}: k4 is set, which only fisheye models use; not supported")
    if "w" in get and "h" in get:
        W, H = _pixels(get, "w", where), _pixels(get, "h", where)
    else:
        W, H = _image_size(path)
    if "fl_x" in get:
        fx = _number(get, "fl_x", where)
    elif "camera_angle_x" in get:
        fx = _focal_from_angle(get, "camera_angle_x", W, where)
    else:
        raise UserError(f"{where}: needs fl_x or camera_angle_x")
    if "fl_y" in get:
        fy = _number(get, "fl_y", where)
    else:
        fy = _focal_from_angle(get, "camera_angle_y", H, where) if "camera_angle_y" in get else fx
    K = np.array([fx, fy, _number(get, "cx", where, W / 2), _number(get, "cy", where, H / 2)], float)
    check_intrinsics((W, H), K, where)
    dist = np.array([_number(get, k, where, 0.0) for k in ("k1", "k2", "p1", "p2", "k3")], float)
    dist = dist if dist[4] else dist[:4]
    return np.array([W, H]), K, dist if dist.any() else None


def _c2w(frame: dict, where: str) -> np.ndarray:
    """(3, 4) float64 camera-to-world, its rotation (orthonormal within the dataset's tolerance) snapped to the
    nearest orthonormal one."""
    try:
        m = np.array(frame["transform_matrix"], float)[:3, :4]
    except (KeyError, ValueError, IndexError, TypeError):  # absent, text, a scalar, objects inside
        raise UserError(f"{where}: needs a 4x4 'transform_matrix'") from None
    if m.shape != (3, 4) or not np.isfinite(m).all():
        raise UserError(f"{where}: 'transform_matrix' must be 4x4 finite numbers")
    rot = m[:, :3]
    if rotation_problem(rot) is not None:
        raise UserError(f"{where}: the rotation in 'transform_matrix' is scaled or mirrored")
    u, _, vt = np.linalg.svd(rot)
    return np.concatenate([u @ vt, m[:, 3:]], 1)


def read_points_ply(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Vertices (P, 3) float64 and colours (P, 3) uint8 (grey without colour) of a PLY point cloud."""
    try:
        v = PlyData.read(str(path))["vertex"]
        xyz = np.stack([v["x"], v["y"], v["z"]], 1).astype(np.float64)
    except (OSError, PlyParseError, ValueError, LookupError) as e:  # what plyfile raises on a damaged file
        raise UserError(f"{path}: not a PLY point cloud ({type(e).__name__}: {e})") from None
    names = {p.name for p in v.properties}
    rgb = (np.stack([v["red"], v["green"], v["blue"]], 1) if {"red", "green", "blue"} <= names
           else np.full((len(xyz), 3), 128))
    # Dropped with a count, not refused: organised clouds (PCL's, a depth camera's) mark a missing point with NaN
    # by design, and one left in made every percentile, hence the scale and the altitude range, NaN. A cloud with
    # none finite is refused: that is no point cloud, and dropping all would pass as "no points".
    finite = np.isfinite(xyz).all(1)
    if not finite.any() and len(xyz):
        raise UserError(f"{path}: none of its {len(xyz)} vertices has finite coordinates")
    if not finite.all():
        print(f"warning: {path}: dropped {int((~finite).sum())} of {len(xyz)} vertices with non-finite coordinates")
    return xyz[finite], rgb[finite].astype(np.uint8)


def _frames(data: object, file: Path) -> list[dict]:
    """The json's 'frames': a non-empty list of objects, each with a 'file_path' string (its
    'transform_matrix' is checked with the frame's pose, by `_c2w`); UserError naming the file otherwise."""
    frames = data.get("frames") if isinstance(data, dict) else None
    if not frames:
        raise UserError(f"{file}: has no 'frames'")
    if not isinstance(frames, list) or not all(isinstance(f, dict) for f in frames):
        raise UserError(f"{file}: 'frames' must be a list of objects, each with 'file_path' and 'transform_matrix'")
    if not all(isinstance(f.get("file_path"), str) for f in frames):
        raise UserError(f"{file}: every frame needs a 'file_path' string")
    return frames


def transforms_scene(path: str | os.PathLike, points_path: str | os.PathLike | None = None,
                     allow_missing: bool = False) -> SceneInput:
    """A SceneInput (frames found on disk, in file order) from a transforms.json."""
    file = Path(path)
    data = read_json(file)
    frames = _frames(data, file)
    paths = [_image_path(file.parent, f["file_path"]) for f in frames]
    keep = keep_existing_images(paths, str(file), allow_missing)
    frames = [f for f, k in zip(frames, keep, strict=True) if k]
    paths = [p for p, k in zip(paths, keep, strict=True) if k]
    shared = {k: v for k, v in data.items() if k != "frames"}
    cams = [_intrinsics({**shared, **f}, p, f"{file}: frame {f['file_path']}")
            for f, p in zip(frames, paths, strict=True)]
    if not isinstance(data.get("ply_file_path", ""), str):
        raise UserError(f"{file}: 'ply_file_path' must be a path, got {data['ply_file_path']!r}")
    ply = points_path or (file.parent / data["ply_file_path"] if "ply_file_path" in data else None)
    xyz, rgb = read_points_ply(Path(ply)) if ply else (np.zeros((0, 3)), np.zeros((0, 3), np.uint8))
    relative = [PurePosixPath(os.path.relpath(p, file.parent)).as_posix() for p in paths]
    return SceneInput(names=unique_stems(relative), image_paths=paths,
                      c2w=np.stack([_c2w(f, f"{file}: frame {f['file_path']}") for f in frames]),
                      intrinsics=np.stack([c[1] for c in cams]), sizes=np.stack([c[0] for c in cams]),
                      distortion=[c[2] for c in cams], points=xyz, colors=rgb, source="transforms.json",
                      file=str(file))


def convert_transforms(path: str | os.PathLike, output: str | os.PathLike, points_path: str | None = None,
                       up_axis: str = "auto", val_every: int = 8, undistort: bool = False,
                       link_images: bool = False, allow_missing_images: bool = False) -> Conversion:
    """Convert a transforms.json and its images to our layout."""
    scene = transforms_scene(path, points_path, allow_missing_images)
    return convert(scene, output, up_axis, val_every, undistort, link_images)
