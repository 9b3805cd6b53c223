"""Rays from poses, recomputed on the fly from (image index, pixel index), and their near/far bounds.

Camera convention (docs/DESIGN.md, the original NeRF's): pixel (column i, row j) looks along
[(i + 0.5 - cx) / fx, -(j + 0.5 - cy) / fy, -1] in camera space, normalised, rotated by c2w[:, :3].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mega_nerf.data.dataset import Coordinates, Dataset
from mega_nerf.errors import UserError


def camera_directions(intrinsics: torch.Tensor, cols: torch.Tensor, rows: torch.Tensor,
                      center: float = 0.5) -> torch.Tensor:
    """Unnormalised camera-space directions.

    intrinsics: (N, 4) or (4,) fx, fy, cx, cy; cols, rows: (N,) pixel coordinates (integers or floats).
    Returns (N, 3).
    """
    fx, fy, cx, cy = intrinsics.unbind(-1)
    x = (cols + center - cx) / fx
    y = -(rows + center - cy) / fy
    return torch.stack([x, y, -torch.ones_like(x)], -1)


def rays_from_pixels(c2w: torch.Tensor, intrinsics: torch.Tensor, cols: torch.Tensor, rows: torch.Tensor,
                     center: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """World-space rays. c2w: (N, 3, 4) or (3, 4); intrinsics: (N, 4) or (4,); cols, rows: (N,).

    Returns origins (N, 3) and unit directions (N, 3).
    """
    d = camera_directions(intrinsics, cols.to(c2w.dtype), rows.to(c2w.dtype), center)
    d = d / d.norm(dim=-1, keepdim=True)
    rot = c2w[..., :3].expand(d.shape[0], 3, 3) if c2w.dim() == 2 else c2w[..., :3]
    dirs = (rot @ d.unsqueeze(-1)).squeeze(-1)
    origins = c2w[..., 3].expand_as(dirs)
    return origins, dirs


def image_rays(c2w: torch.Tensor, intrinsics: torch.Tensor, W: int, H: int,
               center: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """All rays of one image in row-major pixel order: origins (H * W, 3), directions (H * W, 3)."""
    pix = torch.arange(W * H, device=c2w.device)
    rows = torch.div(pix, W, rounding_mode="floor")
    return rays_from_pixels(c2w, intrinsics.to(c2w), pix % W, rows, center)


@dataclass
class Cameras:
    """Every image's pose and intrinsics as tensors, so rays are regenerated instead of stored."""

    c2w: torch.Tensor  # (I, 3, 4)
    intrinsics: torch.Tensor  # (I, 4)
    width: torch.Tensor  # (I,) long
    height: torch.Tensor  # (I,) long

    @classmethod
    def from_dataset(cls, dataset: Dataset) -> Cameras:
        return cls(torch.stack([m.c2w for m in dataset.images]),
                   torch.stack([m.intrinsics for m in dataset.images]),
                   torch.tensor([m.W for m in dataset.images]), torch.tensor([m.H for m in dataset.images]))

    def to(self, device: torch.device | str) -> Cameras:
        return Cameras(self.c2w.to(device), self.intrinsics.to(device), self.width.to(device),
                       self.height.to(device))

    def rays(self, image_index: torch.Tensor, pixel_index: torch.Tensor,
             center: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
        """Rays for (image index, row-major pixel index) pairs, both (N,) long. Returns (N, 3), (N, 3)."""
        W = self.width[image_index]
        cols = pixel_index % W
        rows = torch.div(pixel_index, W, rounding_mode="floor")
        return rays_from_pixels(self.c2w[image_index], self.intrinsics[image_index], cols, rows, center)


def normalize_altitude_range(altitude_range: tuple[float, float] | list[float] | None,
                             coordinates: Coordinates) -> tuple[float, float] | None:
    """Real-world down-coordinates [a_top, a_ground] to the normalised frame (None stays None)."""
    if altitude_range is None:
        return None
    origin_down = float(coordinates.origin_drb[0])
    top, ground = ((a - origin_down) / coordinates.pose_scale_factor for a in altitude_range)
    return top, ground


def _plane_distance(origins: torch.Tensor, dirs: torch.Tensor, altitude: float,
                    default: torch.Tensor) -> torch.Tensor:
    """Distance along each ray to the plane x = altitude, for rays above it heading down; else `default`."""
    hits = (origins[:, 0] < altitude) & (dirs[:, 0] > 0)
    t = (altitude - origins[:, 0]) / dirs[:, 0].clamp_min(1e-12)
    return torch.where(hits, t, default)


def near_far(origins: torch.Tensor, dirs: torch.Tensor, near: float, far: float,
             altitude_range: tuple[float, float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-ray bounds (N,), (N,), in normalised units, clipped to the altitude slab as Mega-NeRF does.

    A ray that starts above the top plane and heads down starts where it crosses it; one that starts above
    the ground plane and heads down ends where it crosses it; both within [near, far]. A ray that starts above
    the top plane and never heads down (the sky of an oblique view) never enters the slab: its interval is empty
    (near = far), and it sees only the background. So does a grazing ray that meets the top plane beyond far.
    altitude_range: normalised (top, ground) down-coordinates, top < ground.
    """
    n = torch.full_like(origins[:, 0], near)
    f = torch.full_like(origins[:, 0], far)
    if altitude_range is not None:
        top, ground = altitude_range
        n = _plane_distance(origins, dirs, top, n).clamp(near, far)
        f = _plane_distance(origins, dirs, ground, f).clamp_max(far)
        above = (origins[:, 0] < top) & (dirs[:, 0] <= 0)
        f = torch.where(above, n, torch.maximum(n, f))
    return n, f


# Far enough for any terrain a survey sees (cameras lie within [-1, 1]): the world beyond the foreground box is
# contracted (bounds.py) and sampled evenly in 1 / t, so a far bound this large costs nothing; rays of the slab
# end at the ground plane long before it. Mega-NeRF's default, 1e5 real-world units, plays the same part.
DEFAULT_FAR = 1e3


@dataclass(frozen=True)
class SceneBounds:
    """Where rays are sampled, in normalised units: [near, far] along each ray, clipped to the altitude slab
    (top, ground) in down-coordinates (None: no slab). One value handed to every stage that makes rays."""

    near: float
    far: float
    altitude: tuple[float, float] | None = None

    @classmethod
    def from_real(cls, near: float, far: float | None, altitude_range: tuple[float, float] | list[float] | None,
                  coordinates: Coordinates) -> SceneBounds:
        """From the real-world options --near, --far (None: DEFAULT_FAR normalised units) and
        --ray_altitude_range."""
        n = near / coordinates.pose_scale_factor
        f = DEFAULT_FAR if far is None else far / coordinates.pose_scale_factor
        if f <= n:
            raise UserError(f"--far ({far}) must exceed --near ({near})")
        altitude = normalize_altitude_range(altitude_range, coordinates)
        if altitude is not None and altitude[0] >= altitude[1]:
            raise UserError("--ray_altitude_range must be [top, ground] with top < ground (x points down)")
        return cls(n, f, altitude)

    def clip(self, origins: torch.Tensor, dirs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-ray [near, far] (N,), (N,) of rays (N, 3), (N, 3): `near_far` with these bounds."""
        return near_far(origins, dirs, self.near, self.far, self.altitude)
