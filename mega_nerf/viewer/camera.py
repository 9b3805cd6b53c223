"""What one browser asks to see, and the map between viser's cameras and ours.

viser places the scene in our normalised DRB world unchanged (its up direction set to -x) and reports each
browser's camera as a position and a rotation `wxyz` (w first) whose columns are the camera's right, down and
forward axes in the world (OpenCV's camera), with a vertical field of view and the canvas size in pixels. Ours
(docs/DESIGN.md, Coordinates) has columns right, up and back, so c2w[:, :3] = R_opencv @ diag(1, -1, -1). The
browser's camera is a centred pinhole with square pixels: fy = (H / 2) / tan(fov / 2) = fx, cx = W / 2, cy = H / 2.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.spatial.transform import Rotation

OVERLAYS = ("rgb", "depth", "cells")  # cells: which submodule owns each pixel (containers only)
FLIP = np.diag([1.0, -1.0, -1.0])  # OpenCV camera axes <-> ours (right, up, back)


@dataclass(frozen=True, eq=False)
class View:
    """One browser's request: pose, lens and canvas, appearance and overlay. Frames of a view are rendered at
    width x height (full) or smaller (while the camera moves)."""

    c2w: np.ndarray  # (3, 4) float64, normalised DRB, columns right, up, back, centre
    fov: float  # vertical field of view, radians
    width: int  # full-frame size in pixels
    height: int
    appearance: int  # image index whose appearance embedding every pixel uses
    overlay: str = "rgb"  # one of OVERLAYS

    def intrinsics(self, W: int, H: int) -> np.ndarray:
        """(4,) fx, fy, cx, cy of this view's lens on a W x H image (the same field of view at any size)."""
        return lens(self.fov, W, H)

    def same(self, other: View) -> bool:
        """Whether `other` asks for exactly the same frame (views compare by identity otherwise: c2w is an array)."""
        return (np.array_equal(self.c2w, other.c2w) and (self.fov, self.width, self.height, self.appearance,
                self.overlay) == (other.fov, other.width, other.height, other.appearance, other.overlay))


def lens(fov: float, W: int, H: int) -> np.ndarray:
    """(4,) fx, fy, cx, cy of a centred pinhole with square pixels and vertical field of view `fov` (radians)."""
    focal = 0.5 * H / math.tan(0.5 * fov)
    return np.array([focal, focal, 0.5 * W, 0.5 * H])


def fov_of(fy: float, H: int) -> float:
    """Vertical field of view (radians) of focal length fy (pixels) on an image H pixels high."""
    return 2 * math.atan(0.5 * H / fy)


def c2w_from_viser(wxyz: np.ndarray, position: np.ndarray) -> np.ndarray:
    """(3, 4) c2w in our convention from viser's camera rotation (w, x, y, z) and position (3,)."""
    w, x, y, z = (float(v) for v in wxyz)
    rotation = Rotation.from_quat([x, y, z, w]).as_matrix() @ FLIP
    return np.concatenate([rotation, np.asarray(position, np.float64).reshape(3, 1)], 1)


def viser_from_c2w(c2w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """viser's (wxyz (4,), position (3,)) of a (3, 4) c2w in our convention."""
    x, y, z, w = Rotation.from_matrix(np.asarray(c2w, np.float64)[:, :3] @ FLIP).as_quat()
    return np.array([w, x, y, z]), np.asarray(c2w, np.float64)[:, 3].copy()


def full_size(W: int, H: int, max_side: int) -> tuple[int, int]:
    """The canvas size W x H scaled down (aspect kept) so that its longer side is at most `max_side` pixels."""
    scale = min(1.0, max_side / max(W, H, 1))
    return max(1, round(W * scale)), max(1, round(H * scale))
