"""nerfstudio's camera path file (`camera_path.json`, written by its viewer, read by `ns-render camera-path`),
read into and written from cameras of our normalised DRB frame.

The file holds `render_width`, `render_height`, `fps`, `seconds`, `camera_type` ("perspective") and `camera_path`,
one entry per frame: `camera_to_world` (16 numbers, a 4x4 matrix row by row; OpenGL camera: right, up, back, as
ours), `fov` (vertical field of view, degrees) and `aspect` (width / height). Its cameras are pinholes centred on
the image with square pixels, so what we write keeps fy and the size, not fx, cx or cy.

Frames: a path lives in some world. `to_ours` maps that world to our normalised one (camera_path.path_frame picks
it: nerfstudio's own world through its dataparser_transforms.json and the dataset's, the dataset's source world,
or ours).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from mega_nerf.data.dataset import rotation_problem
from mega_nerf.data.frames import Similarity
from mega_nerf.errors import UserError
from mega_nerf.io import read_json, write_json

PathCamera = tuple[np.ndarray, np.ndarray, tuple[int, int]]  # c2w (3, 4), intrinsics fx fy cx cy (4,), (W, H)


def _load(path: Path) -> dict:
    data = read_json(path)
    if not isinstance(data, dict) or not data.get("camera_path"):
        raise UserError(f"{path}: has no 'camera_path' (not a nerfstudio camera path)")
    return data


def read_camera_path(path: Path, to_ours: Similarity | None) -> list[PathCamera]:
    """Every frame of a nerfstudio camera_path.json, in our normalised frame; one-line errors naming the file."""
    data = _load(path)
    try:
        H = int(data["render_height"])
        W = int(data.get("render_width") or round(H * float(data["camera_path"][0]["aspect"])))
        c2w = np.array([f["camera_to_world"] for f in data["camera_path"]], np.float64).reshape(-1, 4, 4)[:, :3]
        fov = np.array([float(f["fov"]) for f in data["camera_path"]])
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise UserError(f"{path}: needs render_height and, per frame, camera_to_world (16 numbers) and fov "
                        f"({type(e).__name__}: {e})") from None
    if min(W, H) < 1 or not np.isfinite(c2w).all() or not ((fov > 0) & (fov < 180)).all():
        raise UserError(f"{path}: image size, camera_to_world or fov out of range")
    for i, m in enumerate(c2w):
        if rotation_problem(m[:, :3]) is not None:
            raise UserError(f"{path}: frame {i}: the rotation of camera_to_world is {rotation_problem(m[:, :3])}")
    if to_ours is not None:
        c2w = to_ours.cameras(c2w)
    focal = 0.5 * H / np.tan(np.radians(fov) / 2)
    return [(m, np.array([f, f, W / 2, H / 2]), (W, H)) for m, f in zip(c2w, focal, strict=True)]


def write_camera_path(path: Path, cameras: list[PathCamera], fps: float, from_ours: Similarity | None) -> None:
    """The cameras (all of one size) as a nerfstudio camera_path.json, in the world `from_ours` maps ours to."""
    W, H = cameras[0][2]
    c2w = np.stack([c[0] for c in cameras])
    if from_ours is not None:
        c2w = from_ours.cameras(c2w)
    bottom = np.array([[0.0, 0.0, 0.0, 1.0]])
    frames = [{"camera_to_world": np.concatenate([m, bottom]).flatten().tolist(),
               "fov": math.degrees(2 * math.atan(0.5 * H / float(c[1][1]))), "aspect": W / H}
              for m, c in zip(c2w, cameras, strict=True)]
    write_json(path, {"camera_type": "perspective", "render_width": W, "render_height": H, "fps": fps,
                      "seconds": len(frames) / fps, "camera_path": frames})
