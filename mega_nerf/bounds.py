"""Scene bounds: the foreground box every field of a scene shares, and how the world beyond it is kept.

The foreground is the area of interest, at the fields' full resolution: horizontally the cameras' extent scaled
by `foreground_scale` about its centre (as Mega-NeRF's ellipse around the cameras, `--ellipse_scale_factor`),
vertically the altitude slab. It does not grow with what the cameras see: an oblique survey's image corners look
at the horizon, and a box fitted to where they land would be many times the area of interest, so the fields'
finest cells would be that many times coarser over the town (docs/DESIGN.md, Scene bounds).

Beyond the box, the world is contracted (mip-NeRF 360, Barron et al. 2022, eq. 10, one axis at a time): each
contracted axis maps [-1, 1] (box units) to itself and the rest of the line into (1, 2], so far fields, roads and
hills keep a place in the same hash grid at a resolution falling with distance. With an altitude slab only the
horizontal axes need contracting (rays are clipped to the slab); without one, all three are. The sky, which no
ray of the slab reaches, is the field's direction-only background.
"""
from __future__ import annotations

import torch

from mega_nerf.rays import Cameras, SceneBounds, rays_from_pixels

FOREGROUND_SCALE = 1.2  # the foreground's horizontal extent over the cameras' (each axis)
POSITION_RESOLUTION = 1e-6  # camera positions (normalised) closer than this are one place (camera_spacing)
SPACING_QUERIES = 1024  # cameras whose nearest neighbour camera_spacing finds, at most (a fixed random sample)


def foreground_box(positions: torch.Tensor, altitude: tuple[float, float] | None,
                   scale: float = FOREGROUND_SCALE) -> tuple[torch.Tensor, torch.Tensor]:
    """(box_min (3,), box_max (3,)) of the foreground from camera positions (I, 3): horizontally their extent
    scaled by `scale` about its centre (at least a tenth of the larger side, so that a line of cameras still has a
    box), vertically the altitude slab, or without one the cameras' altitudes down by as much as the box is wide
    (a guess; contraction covers the rest)."""
    lo, hi = positions.min(0).values.double(), positions.max(0).values.double()
    centre = (lo + hi) / 2
    half = ((hi - lo) / 2).clamp_min(float((hi - lo)[1:].max()) / 20) * scale
    lo, hi = centre - half, centre + half
    if altitude is not None:
        lo[0], hi[0] = altitude
    else:
        lo[0], hi[0] = positions[:, 0].min(), positions[:, 0].max() + 2 * float(half[1:].max())
    return lo.float(), hi.float()


def camera_spacing(positions: torch.Tensor) -> float:
    """The median distance from a camera position (I, 3) to the nearest other one: how far apart neighbouring
    views stand, in the positions' units, whatever the scene's extent. Cameras at one place (a rig's, a view listed
    twice) count once; 0 with fewer than two places. Over more than SPACING_QUERIES places, the median over a fixed
    random sample of them (each against every place): O(I) time and memory, where all pairs would take minutes
    for a city's 100,000 views."""
    places = torch.unique((positions.double() / POSITION_RESOLUTION).round(), dim=0) * POSITION_RESOLUTION
    if len(places) < 2:
        return 0.0
    queries = places[torch.randperm(len(places), generator=torch.Generator().manual_seed(0))[:SPACING_QUERIES]]
    # Each query's distances to every place: the nearest is the place itself, the next its neighbour
    return float(torch.cdist(queries, places).topk(2, largest=False).values[:, 1].median())


def contracted_axes(altitude: tuple[float, float] | None) -> list[bool]:
    """Which axes (x down, y, z) the fields contract: horizontal ones, and the vertical too without a slab."""
    return [altitude is None, True, True]


def box_exit(origins: torch.Tensor, dirs: torch.Tensor, box_min: torch.Tensor, box_max: torch.Tensor
             ) -> torch.Tensor:
    """Distance along each ray (N, 3), (N, 3) at which it leaves the box (N,) (slab method): negative when the box
    lies behind the ray, and 0 when the ray misses it, so that a caller clamping to [near, far] gets no part of
    the ray inside (a ray from a camera over the box that reaches the slab beyond the box's side never enters)."""
    safe = torch.where(dirs.abs() < 1e-12, torch.full_like(dirs, 1e-12), dirs)
    t0, t1 = (box_min.to(dirs) - origins) / safe, (box_max.to(dirs) - origins) / safe
    enter, leave = torch.minimum(t0, t1).max(-1).values, torch.maximum(t0, t1).min(-1).values
    return torch.where(leave >= enter, leave, torch.zeros_like(leave))


def contract(x: torch.Tensor) -> torch.Tensor:
    """Per-axis scene contraction of box units: [-1, 1] stays, |x| > 1 goes to sign(x) (2 - 1 / |x|), so the whole
    line fits in [-2, 2] (mip-NeRF 360's contraction, Barron et al. 2022, eq. 10, applied to each axis)."""
    a = x.abs()
    return torch.where(a > 1, x.sign() * (2 - 1 / a.clamp_min(1)), x)


def uncontract(c: torch.Tensor) -> torch.Tensor:
    """The inverse of `contract` on [-2, 2]: +-2 go to +-inf."""
    a = c.abs()
    return torch.where(a > 1, c.sign() / (2 - a).clamp_min(0), c)


def world_to_box(positions: torch.Tensor, box_min: torch.Tensor, box_max: torch.Tensor, contracted: torch.Tensor,
                 any_contracted: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Field coordinates u (N, 3) of world positions (N, 3) in a box (3,), (3,) with `contracted` (3,) bool axes
    (the box fills [0, 1] on a plain axis, [1/4, 3/4] on a contracted one), and whether each point lies in the
    domain [0, 1]^3 (N,). `any_contracted`: whether any axis is, known without reading the device's tensor."""
    u = (positions - box_min) / (box_max - box_min)
    if any_contracted:
        u = torch.where(contracted, (contract(2 * u - 1) + 2) / 4, u)
    return u, ((u >= 0) & (u <= 1)).all(-1)


def box_to_world(u: torch.Tensor, box_min: torch.Tensor, box_max: torch.Tensor, contracted: torch.Tensor
                 ) -> torch.Tensor:
    """World positions (N, 3) of field coordinates u (N, 3) of a box (3,), (3,) with `contracted` (3,) bool axes
    (infinite at a contracted axis' ends): the inverse of world_to_box."""
    x = torch.where(contracted, uncontract(4 * u - 2), 2 * u - 1)
    return box_min + (box_max - box_min) * (x + 1) / 2


def contracted_position(positions: torch.Tensor, box_min: torch.Tensor, box_max: torch.Tensor,
                        contracted: torch.Tensor) -> torch.Tensor:
    """World positions (N, 3) with what lies beyond the box (3,), (3,) along a `contracted` (3,) bool axis pulled
    in by the contraction (to at most a box half-width beyond it), and the rest exactly as given: where a far
    point is routed among the cells, next to the part of the box it lies beyond."""
    x = 2 * (positions - box_min) / (box_max - box_min) - 1
    pulled = box_min + (box_max - box_min) * (contract(x) + 1) / 2
    return torch.where(contracted & (x.abs() > 1), pulled, positions)


def mean_segment(cameras: Cameras, bounds: SceneBounds, box: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Mean length of the foreground part of every image's corner and centre rays (normalised units): what one
    uniform sample's interval spans, times the sample count."""
    W, H = cameras.width.float(), cameras.height.float()
    cols = torch.stack([torch.zeros_like(W), W - 1, torch.zeros_like(W), W - 1, (W - 1) / 2], 1)
    rows = torch.stack([torch.zeros_like(H), torch.zeros_like(H), H - 1, H - 1, (H - 1) / 2], 1)
    c2w = cameras.c2w.repeat_interleave(5, 0)
    origins, dirs = rays_from_pixels(c2w, cameras.intrinsics.repeat_interleave(5, 0), cols.flatten(), rows.flatten())
    n, f = bounds.clip(origins, dirs)
    split = torch.minimum(box_exit(origins, dirs, *box).clamp_min(0), f).clamp_min(n)
    length = split - n
    return float(length[length > 0].mean()) if (length > 0).any() else float((f - n).mean())
