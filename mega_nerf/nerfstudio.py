"""nerfstudio's camera path file (`camera_path.json`, written by its viewer, read by `ns-render camera-path`),
read into and written from cameras of our normalised DRB frame.

The file holds `render_width`, `render_height`, `fps`, `seconds`, `camera_type` ("perspective"; nerfstudio's
fisheye and equirectangular cameras are refused, as we render pinholes only) and `camera_path`,
one entry per frame: `camera_to_world` (16 numbers, a 4x4 matrix row by row; OpenGL camera: right, up, back, as
ours), `fov` (vertical field of view, degrees) and `aspect` (width / height). Its cameras are pinholes centred on
the image with square pixels, so what we write keeps fy and the size, not fx, cx or cy.

Frames: a path lives in some world. `to_ours` maps that world to our normalised one (camera_path.path_frame picks
it: nerfstudio's own world through its dataparser_transforms.json and the dataset's, the dataset's source world,
or ours).
"""
from __future__ import annotations

import json
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


def _pixels(path: Path, key: str, value: object) -> int:
    """A size field's value as a positive whole number of pixels (12.0 is 12); a one-line error naming the file
    and the field otherwise (JSON's true, Infinity, 12.7 or 0 would become 1, an OverflowError, 12 or a
    frame without pixels)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value != int(value) or value < 1:
        raise UserError(f"{path}: {key} must be a positive whole number of pixels, got {json.dumps(value)}")
    return int(value)


def _size(path: Path, data: dict) -> tuple[int, int]:
    """(W, H) of a camera path: render_width, or the first frame's aspect times the height where it is absent."""
    H = _pixels(path, "render_height", data.get("render_height"))
    if "render_width" in data:
        return _pixels(path, "render_width", data["render_width"]), H
    aspect = data["camera_path"][0].get("aspect")  # read_camera_path found every frame a dict
    if isinstance(aspect, bool) or not isinstance(aspect, (int, float)) or not 0 < aspect < math.inf:
        raise UserError(f"{path}: needs render_width, or a positive aspect in its first frame, got "
                        f"{json.dumps(aspect)}")
    return _pixels(path, "render_width (render_height x aspect)", round(H * aspect)), H


def read_camera_path(path: Path, to_ours: Similarity | None) -> list[PathCamera]:
    """Every frame of a nerfstudio camera_path.json, in our normalised frame; one-line errors naming the file
    (and the field, for the size and camera_type: only perspective cameras are rendered)."""
    data = _load(path)
    try:
        c2w = np.array([f["camera_to_world"] for f in data["camera_path"]], np.float64).reshape(-1, 4, 4)[:, :3]
        fov = np.array([float(f["fov"]) for f in data["camera_path"]])
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise UserError(f"{path}: needs render_height and, per frame, camera_to_world (16 numbers) and fov "
                        f"({type(e).__name__}: {e})") from None
    if not np.isfinite(c2w).all() or not ((fov > 0) & (fov < 180)).all():
        raise UserError(f"{path}: camera_to_world or fov out of range")
    camera_type = data.get("camera_type", "perspective")
    if camera_type != "perspective":
        raise UserError(f"{path}: camera_type {json.dumps(camera_type)} is not rendered (only \"perspective\" "
                        "cameras are)")
    W, H = _size(path, data)
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
