"""The user's own frame: how a converted dataset's normalised DRB world relates to the world it came from.

The converters write `dataparser_transforms.json` beside the dataset, in the format nerfstudio uses for the same
thing (the map from its input's world to the world its model sees):

    {"transform": [[3 x 4]], "scale": s, ...}     p_ours = s * (transform @ [p_source; 1])

Ours: transform = [R | -origin_drb], with R the proper rotation from the source world to DRB (up -> -x), and
s = 1 / pose_scale_factor, so that p_ours = (R p_source - origin_drb) / pose_scale_factor (docs/DESIGN.md,
coordinates). Camera rotations map by R alone. The file also holds the same map as one 4x4 matrix
(`source_to_normalised`), `origin_drb`, `pose_scale_factor`, the up direction in the source world and the source
it was converted from (`colmap` or `transforms.json`). Cameras in the source frame are NeRF cameras (columns
right, up, back): a transforms.json's convention; a COLMAP camera's y and z axes are these negated.

A nerfstudio run's own `dataparser_transforms.json` (same format) maps the same source world to nerfstudio's,
which is how a nerfstudio camera path reaches ours (camera_path.py).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mega_nerf.data.dataset import rotation_problem
from mega_nerf.errors import UserError
from mega_nerf.io import write_json

FILE = "dataparser_transforms.json"


@dataclass(frozen=True)
class Similarity:
    """p_out = scale * (rotation @ p_in + translation): a proper rotation, a translation and a uniform scale."""

    rotation: np.ndarray  # (3, 3) float64
    translation: np.ndarray  # (3,)
    scale: float

    @property
    def matrix(self) -> np.ndarray:
        """(4, 4) homogeneous matrix of the map."""
        m = np.eye(4)
        m[:3, :3], m[:3, 3] = self.scale * self.rotation, self.scale * self.translation
        return m

    def then(self, other: Similarity) -> Similarity:
        """This map followed by `other`."""
        return Similarity(other.rotation @ self.rotation,
                          other.rotation @ self.translation + other.translation / self.scale, other.scale * self.scale)

    def inverse(self) -> Similarity:
        return Similarity(self.rotation.T, -self.scale * self.translation @ self.rotation, 1.0 / self.scale)

    def points(self, xyz: np.ndarray) -> np.ndarray:
        """(P, 3) -> (P, 3), float64."""
        return self.scale * (np.asarray(xyz, np.float64) @ self.rotation.T + self.translation)

    def cameras(self, c2w: np.ndarray) -> np.ndarray:
        """(N, 3, 4) camera-to-world -> (N, 3, 4): rotations turned, centres mapped as points."""
        c2w = np.asarray(c2w, np.float64)
        rot = np.einsum("ij,njk->nik", self.rotation, c2w[:, :, :3])
        return np.concatenate([rot, self.points(c2w[:, :, 3])[:, :, None]], 2)


def dataset_similarity(rotation: np.ndarray, origin_drb: np.ndarray, pose_scale_factor: float) -> Similarity:
    """The map from a source world to a dataset's normalised DRB world."""
    return Similarity(np.asarray(rotation, np.float64), -np.asarray(origin_drb, np.float64),
                      1.0 / float(pose_scale_factor))


def write_source_frame(folder: Path, to_ours: Similarity, pose_scale_factor: float, origin_drb: np.ndarray,
                       up: np.ndarray, source: str) -> None:
    """Write `folder/dataparser_transforms.json` (format in the module docstring)."""
    data = {"transform": np.concatenate([to_ours.rotation, to_ours.translation[:, None]], 1).tolist(),
            "scale": to_ours.scale, "source_to_normalised": to_ours.matrix.tolist(),
            "origin_drb": np.asarray(origin_drb, np.float64).tolist(), "pose_scale_factor": float(pose_scale_factor),
            "up_in_source": np.asarray(up, np.float64).tolist(), "source": source}
    write_json(folder / FILE, data)


def read_similarity(path: str | os.PathLike) -> Similarity:
    """The map of a dataparser_transforms.json (ours or nerfstudio's); one-line errors naming the file."""
    file = Path(path)
    try:
        data = json.loads(file.read_text())
        transform, scale = np.array(data["transform"], np.float64), float(data["scale"])
    except FileNotFoundError:
        raise UserError(f"{file}: not found") from None
    except (ValueError, TypeError, KeyError, UnicodeDecodeError) as e:
        raise UserError(f"{file}: not a dataparser_transforms.json ({type(e).__name__}: {e})") from None
    if transform.shape != (3, 4) or not np.isfinite(transform).all() or not (math.isfinite(scale) and scale > 0):
        raise UserError(f"{file}: needs a finite 3x4 'transform' and a positive 'scale'")
    problem = rotation_problem(transform[:, :3])
    if problem is not None:
        raise UserError(f"{file}: the rotation part of 'transform' is {problem}")
    return Similarity(transform[:, :3], transform[:, 3], scale)


def load_source_frame(dataset_path: str | os.PathLike) -> Similarity | None:
    """The dataset's map from its source world to normalised DRB, or None when it was not converted by us."""
    file = Path(dataset_path) / FILE
    return read_similarity(file) if file.is_file() else None


def to_source_map(dataset_path: str | os.PathLike, option: str) -> Similarity:
    """The map from the dataset's normalised DRB back to its source world; a one-line error naming `option`
    when the dataset has no dataparser_transforms.json."""
    frame = load_source_frame(dataset_path)
    if frame is None:
        raise UserError(f"{option}: {Path(dataset_path) / FILE} not found (our converters write it; a dataset "
                        "made otherwise has no source frame)")
    return frame.inverse()
