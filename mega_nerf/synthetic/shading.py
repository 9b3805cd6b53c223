"""Colours of the city: procedural textures as functions of the hit point, sun and sky light, camera response.

Textures are hashed from integer cells of the hit position, so they are exact, cost nothing to store and are
identical wherever a point is seen from. Light is Lambert under a sun with hard shadows (one shadow ray per lit
hit) plus a constant sky ambient; rays that hit nothing take a sky colour that depends on direction only.
All colours are linear until `camera_response` applies exposure, white balance and the display gamma.
"""
from __future__ import annotations

import math

import torch

from mega_nerf.synthetic.raycast import CANOPY, GROUND, HILL, ROOF, TRUNK, WALL, Hit, first_hit
from mega_nerf.synthetic.scene import PARK, PLAZA, City

_MASK = 0x7FFFFFFF  # hash arithmetic stays in 31 bits, so int64 products never overflow
SUN_LIGHT = (1.0, 0.96, 0.88)
AMBIENT = (0.30, 0.33, 0.38)  # the sky's light on any surface, shadowed or not
SHADOW_OFFSET = 1e-2  # metres along the normal where a shadow ray starts
# Farmland: strips FIELD_WIDTH wide, cut into fields of 0.8-2.4 strip widths, each sown with one of these crops
# (sRGB: ripe wheat, young wheat, ploughed soil, pasture, stubble, rapeseed) in rows ROW_PITCH apart.
FIELD_WIDTH = 60.0
FIELD_CROPS = [(0.80, 0.70, 0.42), (0.45, 0.58, 0.25), (0.45, 0.34, 0.24), (0.28, 0.44, 0.20),
               (0.72, 0.66, 0.48), (0.85, 0.78, 0.25)]
ROW_PITCH = 2.5
HEDGE_WIDTH = 1.5  # metres of hedge along each field's two lower edges
COUNTRY_ROAD_WIDTH = 7.0


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
    """Roads with dashed centre lines, pavement around buildings, parks with paths, tiled plazas, and outside
    the city grass or farmland. p: (N, 3) points on the ground or a hill; returns (N, 3)."""
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
    out[road] = _asphalt(city, p)[road]
    dash_u = road_u & ~road_v & ((su - city.road_width / 2).abs() < 0.15) & (v.remainder(6.0) < 3.0)
    dash_v = road_v & ~road_u & ((sv - city.road_width / 2).abs() < 0.15) & (u.remainder(6.0) < 3.0)
    out[dash_u | dash_v] = _colour(0.90, 0.86, 0.60, like=p)
    outside = _farmland(city, p) if city.farmland else grass
    return torch.where(inside.unsqueeze(-1), out, outside)


def _asphalt(city: City, p: torch.Tensor) -> torch.Tensor:
    """Road surface (N, 3) at points p (N, 3)."""
    grain = _noise(city.noise_seed + 2, p[:, 1], p[:, 2], 0.7)
    return _colour(0.26, 0.26, 0.28, like=p) * (0.9 + 0.2 * grain).unsqueeze(-1)


def _with_country_roads(city: City, p: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Colours out (N, 3) of points p (N, 3) with the country roads laid over them."""
    road = city.country_road
    on_road = ((p[:, 1:] @ road[:, :2].T - road[:, 2]).abs() < COUNTRY_ROAD_WIDTH / 2).any(-1)
    out[on_road] = _asphalt(city, p)[on_road]
    return out


def _farmland(city: City, p: torch.Tensor) -> torch.Tensor:
    """A patchwork of fields: strips along city.field_angle, each cut into fields of its own length (staggered
    from strip to strip), each field one crop in rows along or across it, hedges between fields, and the
    country roads over it all. p: (N, 3) points on the ground; returns (N, 3)."""
    s = city.noise_seed
    y, z = p[:, 1], p[:, 2]
    cos, sin = math.cos(city.field_angle), math.sin(city.field_angle)
    u, v = cos * y + sin * z, cos * z - sin * y
    strip = (u / FIELD_WIDTH).floor().long()
    length = FIELD_WIDTH * (0.8 + 1.6 * _hash(s + 6, strip))
    v = v + length * _hash(s + 7, strip)
    field = (v / length).floor().long()
    fu, fv = u - strip * FIELD_WIDTH, v - field * length  # metres into the field
    crops = torch.tensor(FIELD_CROPS, device=p.device) ** 2.2
    crop = crops[(_hash(s + 8, strip, field) * len(FIELD_CROPS)).long()]
    rows = torch.where(_hash(s + 9, strip, field) < 0.5, fu, fv).remainder(ROW_PITCH) < 0.4 * ROW_PITCH
    out = crop * ((0.85 + 0.3 * _noise(s + 10, y, z, 5.0)) * torch.where(rows, 0.8, 1.0)).unsqueeze(-1)
    hedge = (fu < HEDGE_WIDTH) | (fv < HEDGE_WIDTH)
    leaves = _colour(0.22, 0.36, 0.16, like=p) * (0.7 + 0.6 * _noise(s + 11, y, z, 1.0)).unsqueeze(-1)
    out[hedge] = leaves[hedge]
    return _with_country_roads(city, p, out)


def _woodland(city: City, p: torch.Tensor) -> torch.Tensor:
    """Hills are wooded, which sets them apart from the fields: dark greens in clumps of crowns a few metres
    wide, crossed by the country roads. p: (N, 3) points on hills; returns (N, 3)."""
    s = city.noise_seed
    y, z = p[:, 1], p[:, 2]
    woods = _mix(_colour(0.14, 0.26, 0.10, like=p), _colour(0.30, 0.42, 0.16, like=p), _noise(s + 12, y, z, 12.0))
    crowns = 0.6 + 0.8 * _noise(s + 13, y, z, 2.5)
    return _with_country_roads(city, p, woods * crowns.unsqueeze(-1))


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
        HILL: lambda m: _woodland(city, p[m]),
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
