"""The drone survey: a lawn-mower flight over the city at a fixed altitude (or, for oblique presets, at altitudes
drawn per view), the camera's appearance drift, and the normalisation of the world into the dataset's units.

Poses follow docs/DESIGN.md: c2w columns are the camera's right, up and back axes in the DRB world (x down), so the
camera looks along -back. Views are numbered in flight order; every `val_every`-th is a val view.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mega_nerf.synthetic.scene import City, Preset, street_centres

PITCH_DEG = (30.0, 60.0)  # how far below the horizon cameras look
YAW_SPREAD_DEG = 80.0  # how far a camera's heading may turn away from the city's centre
EYE_HEIGHT_M = (1.6, 2.4)  # a street camera's height above the ground
STREET_PITCH_DEG = (-20.0, 5.0)  # a street camera's angle below the horizon: mostly up, towards the rooftops
STREET_YAW_SPREAD_DEG = 70.0  # how far a street camera turns from the street's direction towards the facades
WORLD_UP = np.array([-1.0, 0.0, 0.0])


@dataclass
class Survey:
    """Every view's pose and appearance, in flight order, real-world metres."""

    positions: np.ndarray  # (V, 3) camera centres, DRB
    rotations: np.ndarray  # (V, 3, 3) columns right, up, back
    splits: list[str]  # (V,) "train" or "val"
    exposure: np.ndarray  # (V,) exposure factor
    white_balance: np.ndarray  # (V, 3) per-channel gains
    focal: float  # pixels, fx = fy

    @property
    def names(self) -> list[str]:
        """File stems; sorting them keeps flight order, so appearance indices follow the path."""
        return [f"{i:06d}" for i in range(len(self.splits))]

    def gains(self, device: torch.device) -> torch.Tensor:
        """(V, 3) float32: each view's per-channel gains, exposure times white balance, as camera_response takes
        them."""
        return torch.as_tensor(self.exposure[:, None] * self.white_balance, dtype=torch.float32, device=device)

    @property
    def altitudes(self) -> np.ndarray:
        """(V,) metres above the ground."""
        return -self.positions[:, 0]


def look_rotation(yaw: float, pitch: float) -> np.ndarray:
    """Rotation (3, 3) with columns right, up, back for a camera heading `yaw` (radians, from +y towards +z)
    and looking `pitch` radians below the horizon, with no roll."""
    forward = np.array([np.sin(pitch), np.cos(pitch) * np.cos(yaw), np.cos(pitch) * np.sin(yaw)])
    right = np.cross(forward, WORLD_UP)
    right /= np.linalg.norm(right)
    up = np.cross(right, forward)
    return np.stack([right, up, -forward], 1)


def _lawn_mower(count: int, half: float) -> np.ndarray:
    """`count` horizontal positions (y, z) on back-and-forth rows covering [-half, half]^2, in flight order."""
    rows = max(2, round(np.sqrt(count / 2)))
    per_row = -(-count // rows)
    along = np.linspace(-half, half, per_row)
    points = [(y, z) for r, z in enumerate(np.linspace(-half, half, rows))
              for y in (along if r % 2 == 0 else along[::-1])]
    return np.array(points[:count])


def _drift(count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Exposure (V,) and white balance (V, 3) as slow random sinusoids of the position along the path, so
    that neighbouring views look alike and distant ones do not."""
    s = np.linspace(0.0, 1.0, count)[:, None]
    freq, phase = rng.uniform(0.8, 2.5, (2, 4)), rng.uniform(0, 2 * np.pi, (2, 4))
    waves = np.sin(2 * np.pi * freq * s[:, :, None] + phase)  # (V, 2, 4)
    exposure = np.exp(0.25 * (0.7 * waves[:, 0, 0] + 0.3 * waves[:, 1, 0]))
    white_balance = np.exp(0.08 * (0.7 * waves[:, 0, 1:] + 0.3 * waves[:, 1, 1:]))
    return exposure, white_balance


def _altitudes(city: City, preset: Preset, count: int, rng: np.random.Generator) -> np.ndarray:
    """Flight altitudes (V,), metres: the tallest shape's height plus the preset's clearance for every view, or
    drawn per view within the preset's altitude_multiples of that height. Draws only in the latter case, so that
    level-flight presets keep their draws."""
    if preset.altitude_multiples is None:
        return np.full(count, city.max_height + preset.clearance)
    return city.max_height * rng.uniform(*preset.altitude_multiples, count)


def _street_poses(city: City, preset: Preset, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Positions (V, 3) and rotations (V, 3, 3) of eye-level views walked along the town's streets, those along
    y first, each street from end to end (a lane off its centre line drawn per view): each view heads up or down
    the street, turned towards the facades by up to STREET_YAW_SPREAD_DEG, and looks STREET_PITCH_DEG below the
    horizon."""
    V, n = preset.views, 2 * (city.blocks + 1)
    centres = street_centres(city.blocks, city.extent, city.road_width, city.block_size)
    counts = np.full(n, V // n) + (np.arange(n) < V % n)
    positions, yaws = [], []
    for street, count in enumerate(counts):
        along = np.linspace(-city.extent, city.extent, count)
        across = centres[street % (city.blocks + 1)] + rng.uniform(-0.25, 0.25, count) * city.road_width
        height = -rng.uniform(*EYE_HEIGHT_M, count)
        along_y = street < city.blocks + 1
        positions.append(np.stack([height, along, across] if along_y else [height, across, along], 1))
        direction = (0.0 if along_y else np.pi / 2) + np.pi * rng.integers(0, 2, count)
        yaws.append(direction + np.radians(rng.uniform(-STREET_YAW_SPREAD_DEG, STREET_YAW_SPREAD_DEG, count)))
    pitch = np.radians(rng.uniform(*STREET_PITCH_DEG, V))
    yaw = np.concatenate(yaws)
    rotations = np.stack([look_rotation(a, b) for a, b in zip(yaw, pitch, strict=True)])
    return np.concatenate(positions), rotations


def _drone_poses(city: City, preset: Preset, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Positions (V, 3) and rotations (V, 3, 3) of rows flown over the city at the preset's altitudes (see
    _altitudes). Each view looks PITCH_DEG below the horizon (drawn at random), heading within YAW_SPREAD_DEG of the
    city's centre, so that views near the edge look over the city rather than away from it."""
    V = preset.views
    yz = _lawn_mower(V, 0.85 * city.extent)
    positions = np.concatenate([-_altitudes(city, preset, V, rng)[:, None], yz], 1)
    spread = np.radians(YAW_SPREAD_DEG)
    yaw = np.arctan2(-yz[:, 1], -yz[:, 0]) + rng.uniform(-spread, spread, V)
    pitch = np.radians(rng.uniform(*PITCH_DEG, V))
    return positions, np.stack([look_rotation(a, b) for a, b in zip(yaw, pitch, strict=True)])


def plan_survey(city: City, preset: Preset, rng: np.random.Generator) -> Survey:
    """The preset's views (_drone_poses, or _street_poses for a street preset) in capture order, every
    `val_every`-th a val view, with the camera's appearance drift along the path."""
    poses = _street_poses if preset.survey == "street" else _drone_poses
    positions, rotations = poses(city, preset, rng)
    V = preset.views
    splits = ["val" if i % preset.val_every == preset.val_every - 1 else "train" for i in range(V)]
    exposure, white_balance = _drift(V, rng)
    focal = preset.W / 2 / np.tan(np.radians(preset.fov_deg) / 2)
    return Survey(positions, rotations, splits, exposure, white_balance, float(focal))


def normalisation(city: City, survey: Survey, preset: Preset) -> tuple[np.ndarray, float]:
    """origin_drb (the centre of the camera positions) and a pose_scale_factor that puts within [-1, 1] every
    camera and, by the preset's `normalise`, the whole ground square, hence every shape ("ground"), or the town
    box only ("survey": Mega-NeRF's datasets are scaled by their cameras, and their far terrain lies outside)."""
    origin = survey.positions.mean(0)
    if preset.normalise == "ground":
        g = city.ground_half
        corners = np.array([[0.0, y, z] for y in (-g, g) for z in (-g, g)])
    else:
        lo, hi = city.town_box()
        corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    scale = np.abs(np.concatenate([survey.positions, corners]) - origin).max()
    return origin, float(scale)
