"""Colours of the city: procedural textures as functions of the hit point, sun and sky light, camera response.

Textures are hashed from integer cells of the hit position, so they are exact, cost nothing to store and are
identical wherever a point is seen from. Light is Lambert under a sun with hard shadows (one shadow ray per lit
hit) plus a constant sky ambient; rays that hit nothing take a sky colour that depends on direction only.
All colours are linear until `camera_response` applies exposure, white balance and the display gamma.
"""
from __future__ import annotations

import torch

from mega_nerf.synthetic.raycast import CANOPY, GROUND, ROOF, TRUNK, WALL, Hit, first_hit
from mega_nerf.synthetic.scene import PARK, PLAZA, City

_MASK = 0x7FFFFFFF  # hash arithmetic stays in 31 bits, so int64 products never overflow
SUN_LIGHT = (1.0, 0.96, 0.88)
AMBIENT = (0.30, 0.33, 0.38)  # the sky's light on any surface, shadowed or not
SHADOW_OFFSET = 1e-2  # metres along the normal where a shadow ray starts


def _colour(*rgb: float, like: torch.Tensor) -> torch.Tensor:
    """An sRGB pick as a linear colour (3,) on `like`'s device."""
    return torch.tensor(rgb, device=like.device) ** 2.2


def _hash(seed: int, *cells: torch.Tensor) -> torch.Tensor:
    """A uniform number in [0, 1) per integer cell (each cell coordinate a long tensor, broadcast)."""
    h = torch.full_like(cells[0], (seed * 0x2545F491) & _MASK)
    for c in cells:
        h = ((h ^ (c & _MASK)) * 0x5BD1E995) & _MASK
        h = ((h ^ (h >> 15)) * 0x27D4EB2D) & _MASK
    return (h & 0xFFFFFF).float() / 0x1000000


def _noise(seed: int, y: torch.Tensor, z: torch.Tensor, cell: float) -> torch.Tensor:
    """Smooth value noise in [0, 1) over the ground plane with features of about `cell` metres."""
    gy, gz = y / cell, z / cell
    iy, iz = gy.floor().long(), gz.floor().long()
    fy, fz = gy - iy, gz - iz
    fy, fz = fy * fy * (3 - 2 * fy), fz * fz * (3 - 2 * fz)
    top = torch.lerp(_hash(seed, iy, iz), _hash(seed, iy + 1, iz), fy)
    bottom = torch.lerp(_hash(seed, iy, iz + 1), _hash(seed, iy + 1, iz + 1), fy)
    return torch.lerp(top, bottom, fz)


def _mix(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per-point blend of colours a, b ((3,) or (N, 3)) by weights w (N,)."""
    return a + (b - a) * w.unsqueeze(-1)


def _ground(city: City, p: torch.Tensor) -> torch.Tensor:
    """Roads with dashed centre lines, pavement around buildings, parks with paths, tiled plazas, and grass
    outside the city. p: (N, 3) points on the ground; returns (N, 3)."""
    s = city.noise_seed
    y, z = p[:, 1], p[:, 2]
    u, v = y + city.extent, z + city.extent  # from the city's corner
    inside = (u >= 0) & (u <= 2 * city.extent) & (v >= 0) & (v <= 2 * city.extent)
    su, sv = u.remainder(city.pitch), v.remainder(city.pitch)  # position within the block's pitch
    road_u, road_v = su < city.road_width, sv < city.road_width  # roads along z, roads along y
    iy = ((u - city.road_width) / city.pitch).floor().long().clamp(0, city.blocks - 1)
    iz = ((v - city.road_width) / city.pitch).floor().long().clamp(0, city.blocks - 1)
    kind = city.block_kind[iy, iz]
    by, bz = su - city.road_width, sv - city.road_width  # position within the block
    half = city.block_size / 2

    grass = _mix(_colour(0.30, 0.45, 0.20, like=p), _colour(0.42, 0.52, 0.24, like=p), _noise(s, y, z, 8.0))
    out = grass * (0.92 + 0.16 * _hash(s + 1, y.floor().long(), z.floor().long())).unsqueeze(-1)
    path = (((by - half).abs() < 1.2) | ((bz - half).abs() < 1.2)) & (kind == PARK)
    out[path] = _colour(0.72, 0.64, 0.50, like=p)
    checker = ((by / 2.5).floor().long() + (bz / 2.5).floor().long()) % 2 == 1
    out[kind == PLAZA] = _mix(_colour(0.80, 0.68, 0.54, like=p), _colour(0.66, 0.50, 0.40, like=p),
                              checker.float())[kind == PLAZA]
    sidewalk = (by < 2) | (by > city.block_size - 2) | (bz < 2) | (bz > city.block_size - 2)
    paved = sidewalk | ((kind != PARK) & (kind != PLAZA))
    joint = ((by.remainder(2.0) < 0.1) | (bz.remainder(2.0) < 0.1)).float()
    out[paved] = _mix(_colour(0.64, 0.63, 0.60, like=p), _colour(0.50, 0.50, 0.48, like=p), joint)[paved]
    road = road_u | road_v
    asphalt = _colour(0.26, 0.26, 0.28, like=p) * (0.9 + 0.2 * _noise(s + 2, y, z, 0.7)).unsqueeze(-1)
    out[road] = asphalt[road]
    dash_u = road_u & ~road_v & ((su - city.road_width / 2).abs() < 0.15) & (v.remainder(6.0) < 3.0)
    dash_v = road_v & ~road_u & ((sv - city.road_width / 2).abs() < 0.15) & (u.remainder(6.0) < 3.0)
    out[dash_u | dash_v] = _colour(0.90, 0.86, 0.60, like=p)
    return torch.where(inside.unsqueeze(-1), out, grass)


def _wall(city: City, p: torch.Tensor, index: torch.Tensor, normal: torch.Tensor) -> torch.Tensor:
    """Facades: a grid of windows (one row per floor) on the building's wall colour, a darker slab line at
    each floor. p: (N, 3) points on walls of buildings `index` (N,) with face normals (N, 3)."""
    lo = city.box_lo[index]
    along = torch.where(normal[:, 1].abs() > 0.5, p[:, 2] - lo[:, 2], p[:, 1] - lo[:, 1])
    rows, cols = -p[:, 0] / city.floor_height[index], along / city.window_pitch[index]
    fr, fc = rows - rows.floor(), cols - cols.floor()
    window = (fc > 0.2) & (fc < 0.8) & (fr > 0.3) & (fr < 0.82)
    shade = 0.6 + 0.8 * _hash(city.noise_seed + 3, index, rows.floor().long(), cols.floor().long())
    glass = city.glass_albedo[index] * shade.unsqueeze(-1)
    wall = city.wall_albedo[index] * torch.where(fr < 0.06, 0.75, 1.0).unsqueeze(-1)
    return torch.where(window.unsqueeze(-1), glass, wall)


def _roof(city: City, p: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Roofs: the roof colour in 1.5 m gravel patches, inside a parapet of the wall colour."""
    lo, hi = city.box_lo[index], city.box_hi[index]
    edge = torch.minimum((p[:, 1:] - lo[:, 1:]).amin(-1), (hi[:, 1:] - p[:, 1:]).amin(-1))
    cells = (p[:, 1:] / 1.5).floor().long()
    roof = city.roof_albedo[index] * (0.9 + 0.2 * _hash(city.noise_seed + 4, cells[:, 0], cells[:, 1]))[:, None]
    return torch.where((edge < 0.6).unsqueeze(-1), city.wall_albedo[index] * 0.8, roof)


def _canopy(city: City, p: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    cells = (p / 0.8).floor().long()
    leaves = 0.8 + 0.4 * _hash(city.noise_seed + 5, cells[:, 0], cells[:, 1], cells[:, 2])
    return city.canopy_albedo[index] * leaves.unsqueeze(-1)


def albedo(city: City, hit: Hit, p: torch.Tensor) -> torch.Tensor:
    """Surface colour (N, 3) at hit points p (N, 3); zeros where the ray hit nothing."""
    out = torch.zeros_like(p)
    textures = {
        GROUND: lambda m: _ground(city, p[m]),
        WALL: lambda m: _wall(city, p[m], hit.index[m], hit.normal[m]),
        ROOF: lambda m: _roof(city, p[m], hit.index[m]),
        CANOPY: lambda m: _canopy(city, p[m], hit.index[m]),
        TRUNK: lambda m: _colour(0.35, 0.25, 0.17, like=p).expand(int(m.sum()), 3),
    }
    for material, texture in textures.items():
        m = hit.material == material
        if m.any():
            out[m] = texture(m)
    return out


def sky(d: torch.Tensor) -> torch.Tensor:
    """Sky colour (N, 3) by unit direction d (N, 3): zenith blue to a pale horizon, and below the horizon (seen
    past the ground's edge) a haze that deepens towards the nadir."""
    up = -d[:, 0]
    horizon = _colour(0.80, 0.86, 0.92, like=d)
    above = _mix(horizon, _colour(0.32, 0.52, 0.86, like=d), up.clamp_min(0).pow(0.6))
    below = _mix(horizon, _colour(0.55, 0.62, 0.72, like=d), (-up).clamp(0, 1).sqrt())
    return torch.where((up >= 0).unsqueeze(-1), above, below)


def render(city: City, o: torch.Tensor, d: torch.Tensor, budget: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear colour (N, 3) and hit distance (N,) (metres, inf for sky) of rays o, d (N, 3), unit directions.

    budget: how many ray-shape tests may be held in memory at once.
    """
    hit = first_hit(city, o, d, budget)
    found = hit.t.isfinite()
    p = o + hit.t.nan_to_num(posinf=0.0).unsqueeze(-1) * d
    cos_sun = (hit.normal @ city.sun).clamp_min(0)
    lit = found & (cos_sun > 0)
    shadow = first_hit(city, p[lit] + SHADOW_OFFSET * hit.normal[lit], city.sun.expand(int(lit.sum()), 3), budget)
    sunlit = torch.zeros_like(cos_sun)
    sunlit[lit] = cos_sun[lit] * shadow.t.isinf().float()
    light = torch.tensor(AMBIENT, device=o.device) + sunlit.unsqueeze(-1) * torch.tensor(SUN_LIGHT, device=o.device)
    rgb = torch.where(found.unsqueeze(-1), albedo(city, hit, p) * light, sky(d))
    return rgb, hit.t


def camera_response(rgb: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    """Linear colour (..., 3) to display colour in [0, 1]: per-channel gains (exposure times white balance,
    broadcast to rgb), clipped, then gamma 2.2."""
    return (rgb * gain).clamp(0, 1).pow(1 / 2.2)
