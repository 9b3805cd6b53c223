"""The procedural city: presets, block layout, buildings, trees, the countryside around the town, sun and surface
colours.

Everything here is plain data in real-world metres in the DRB frame (x down, y right, z back), with the ground
at x = 0 and the city centred on y = z = 0. Randomness comes only from the numpy generator passed in, so a seed
fixes the city. Colours are linear RGB (sRGB picks raised to 2.2) so that lighting can be added up physically.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

# Ground kinds of a block.
BUILDINGS, PARK, PLAZA = 0, 1, 2
SIDEWALK = 2.0  # metres between a block's edge and its buildings or trees

WALL_PALETTE = [(0.80, 0.76, 0.68), (0.70, 0.70, 0.72), (0.62, 0.40, 0.32), (0.86, 0.85, 0.82),
                (0.55, 0.60, 0.66), (0.76, 0.62, 0.45)]
ROOF_PALETTE = [(0.35, 0.35, 0.37), (0.50, 0.30, 0.25), (0.45, 0.50, 0.42), (0.58, 0.56, 0.52)]
GLASS = (0.20, 0.26, 0.34)
LEAVES = [(0.25, 0.45, 0.18), (0.32, 0.50, 0.20), (0.20, 0.38, 0.22)]
HILL_SIZE = (0.15, 0.3)  # a hill's footprint radius, as a share of the band of terrain around the town
HILL_HEIGHT = (0.4, 0.8)  # a hill's height, as a share of the tallest building's, so below the altitude range
HILL_GAP = 10.0  # metres kept clear between a hill's foot and the town's circumcircle, the ground's edge, other hills


@dataclass(frozen=True)
class Preset:
    """What a preset fixes: city size, surroundings, survey size, camera and normalisation. Lengths in metres.
    The defaults are those of the first presets (a lawn around the town, a level flight, the whole ground in
    [-1, 1]); changing a default changes their files."""

    blocks: int  # the city is blocks x blocks
    views: int  # train + val
    val_every: int  # every val_every-th view along the flight path is a val view
    W: int
    H: int
    fov_deg: float = 65.0  # horizontal field of view
    block_size: float = 40.0
    road_width: float = 10.0
    margin: float = 30.0  # ground beyond the outer roads; past it rays see the sky
    height_range: tuple[float, float] = (6.0, 24.0)
    clearance: float = 25.0  # flight altitude above the tallest building
    overview_size: int = 256  # pixels of the top-down overview picture
    # Per-view flight altitude drawn in this range of multiples of the tallest shape's height; None: one altitude,
    # the tallest shape's height plus `clearance`.
    altitude_multiples: tuple[float, float] | None = None
    farmland: bool = False  # beyond the town: fields and straight country roads (else a lawn)
    hills: int = 0  # smooth hills (spherical caps) in the terrain around the town
    # What [-1, 1] holds: "ground", the whole ground square and every camera; "survey", every camera and the
    # town, as Mega-NeRF's datasets are normalised by their cameras, so that far terrain lies outside.
    normalise: Literal["ground", "survey"] = "ground"
    # Rays per pixel along each axis (odd): a pixel is the mean of pixel_samples^2 rays over its square, as a
    # camera's sensor integrates light. 1, one ray through the centre, aliases every texture finer than a pixel
    # (crop rows, grass, windows), as no photograph does.
    pixel_samples: int = 1
    # "drone": lawn-mower rows over the city (survey._drone_poses); "street": eye-level views walked along the
    # town's streets, looking along them and at the facades, up to the rooftops and out to the horizon.
    survey: Literal["drone", "street"] = "drone"

    def __post_init__(self) -> None:
        if self.pixel_samples < 1 or self.pixel_samples % 2 == 0:
            raise ValueError(f"pixel_samples must be odd and positive, not {self.pixel_samples}")
        if self.survey not in ("drone", "street"):
            raise ValueError(f"survey must be 'drone' or 'street', not {self.survey!r}")
        streets = 2 * (self.blocks + 1)
        if self.survey == "street" and self.views < 2 * streets:  # each street walked from one end to the other
            raise ValueError(f"a street survey of {self.blocks} x {self.blocks} blocks needs {2 * streets} views "
                             f"or more, not {self.views}")


# An oblique survey as in Mill 19 and UrbanScene3D: a wide lens pitched 30-60 degrees down from varying altitudes,
# whose upper image corners see the horizon, over a town surrounded by farmland and hills out to about 5 times its
# half-width. Few views per block (about 12), as in those datasets.
_OBLIQUE = Preset(blocks=4, views=200, val_every=8, W=400, H=300, fov_deg=80.0, margin=400.0,
                  height_range=(8.0, 40.0), overview_size=1024, altitude_multiples=(1.5, 3.0), farmland=True, hills=2,
                  normalise="survey")

# A street-level capture (a walked or car-mounted camera, as Block-NeRF's): eye-level views along every street of
# a town in farmland and hills, the cameras inside the altitude slab, half of every image above the horizon.
_STREET = dataclasses.replace(_OBLIQUE, views=240, fov_deg=70.0, overview_size=1024, survey="street")

_CITY = Preset(blocks=8, views=360, val_every=8, W=640, H=480, margin=50.0, height_range=(8.0, 60.0), clearance=30.0,
               overview_size=1024)

PRESETS: dict[str, Preset] = {
    "tiny": Preset(blocks=2, views=40, val_every=5, W=64, H=48, block_size=36.0),
    "small": Preset(blocks=3, views=72, val_every=9, W=128, H=96, block_size=36.0, height_range=(6.0, 30.0),
                    overview_size=384),
    "city": _CITY,
    "oblique": _OBLIQUE,
    "oblique_tiny": dataclasses.replace(_OBLIQUE, blocks=2, views=40, val_every=5, W=64, H=48, block_size=36.0,
                                        margin=180.0, height_range=(6.0, 24.0), overview_size=256),
    # The start-up benchmark's scene (issue 18): 256 views at 400x300, 30.7 M rays; a 2 x 2 grid gives cells of
    # about 10 M rays.
    "survey256": dataclasses.replace(_OBLIQUE, views=256),
    # As photographs are: every pixel integrates its square (3 x 3 rays). On `oblique` a pixel-centre render is
    # 26.6 dB from the same view's box-filtered render (val right halves), and held-out PSNR stops below that.
    "oblique_aa": dataclasses.replace(_OBLIQUE, pixel_samples=3),
    "city_aa": dataclasses.replace(_CITY, pixel_samples=3),  # `city` is 28.0 dB from its box-filtered self
    "street": _STREET,
    "street_tiny": dataclasses.replace(_STREET, blocks=2, views=40, val_every=5, W=64, H=48, block_size=36.0,
                                       margin=180.0, height_range=(6.0, 24.0), overview_size=256),
}


def _linear(rgb: tuple[float, float, float] | np.ndarray) -> np.ndarray:
    return np.asarray(rgb, dtype=np.float64) ** 2.2


@dataclass
class City:
    """One generated city: its geometry (metres, DRB) and what shading needs, as tensors on one device."""

    blocks: int
    block_size: float
    road_width: float
    extent: float  # the city (outer roads included) covers |y|, |z| <= extent
    ground_half: float  # the ground square covers |y|, |z| <= ground_half; beyond it is sky
    farmland: bool  # whether the ground beyond the town is farmland (else a lawn)
    field_angle: float  # radians from +y towards +z of the farmland's strips of fields
    noise_seed: int  # feeds the texture hash, so that textures change with the seed too
    block_kind: torch.Tensor  # (blocks, blocks) long, indexed [block along y, block along z]
    box_lo: torch.Tensor  # (B, 3) buildings' min corners; box_lo[:, 0] = -height
    box_hi: torch.Tensor  # (B, 3) max corners; box_hi[:, 0] = 0 (standing on the ground)
    wall_albedo: torch.Tensor  # (B, 3)
    roof_albedo: torch.Tensor  # (B, 3)
    glass_albedo: torch.Tensor  # (B, 3)
    floor_height: torch.Tensor  # (B,) metres between window rows
    window_pitch: torch.Tensor  # (B,) metres between window columns
    tree_yz: torch.Tensor  # (T, 2) trunk axis
    trunk_radius: torch.Tensor  # (T,)
    trunk_top: torch.Tensor  # (T,) down-coordinate of the trunk's top (negative); its bottom is the ground
    canopy_center: torch.Tensor  # (T, 3)
    canopy_radius: torch.Tensor  # (T,)
    canopy_albedo: torch.Tensor  # (T, 3)
    country_road: torch.Tensor  # (R, 3) road centre lines as rows (n_y, n_z, c): points with n_y y + n_z z = c
    hill_center: torch.Tensor  # (K, 3) sphere centres, below the ground: only the cap above x = 0 is a hill
    hill_radius: torch.Tensor  # (K,)
    sun: torch.Tensor  # (3,) unit vector towards the sun

    @property
    def pitch(self) -> float:
        """Distance between neighbouring blocks' starts: a block and a road."""
        return self.block_size + self.road_width

    @property
    def max_height(self) -> float:
        """Height of the tallest shape (building, tree top or hill top), metres."""
        tops = torch.cat([-self.box_lo[:, 0], -(self.canopy_center[:, 0] - self.canopy_radius),
                          self.hill_radius - self.hill_center[:, 0]])
        return float(tops.max())

    def footprints(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Boxes bounding every building and every tree: lo, hi (S, 3) each, buildings first."""
        r = self.canopy_radius.unsqueeze(-1)
        tree_lo = torch.cat([self.canopy_center[:, :1] - r, self.canopy_center[:, 1:] - r], 1)
        tree_hi = torch.cat([torch.zeros_like(r), self.canopy_center[:, 1:] + r], 1)
        return torch.cat([self.box_lo, tree_lo]), torch.cat([self.box_hi, tree_hi])

    def town_box(self) -> tuple[np.ndarray, np.ndarray]:
        """The area of interest: min and max corners (3,) of the box around every building and tree, from the
        ground up to the tallest of them, metres."""
        lo, hi = self.footprints()
        return lo.amin(0).double().cpu().numpy(), hi.amax(0).double().cpu().numpy()

    def hill_boxes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Boxes bounding the hills (the caps above the ground): lo, hi (K, 3) each."""
        height = self.hill_radius - self.hill_center[:, 0]
        top = -height
        # The cap's radius at the ground, sqrt(r^2 - x^2) written so that float32 keeps it for wide, low caps.
        foot = (height * (self.hill_radius + self.hill_center[:, 0])).sqrt()
        lo = torch.stack([top, self.hill_center[:, 1] - foot, self.hill_center[:, 2] - foot], 1)
        hi = torch.stack([torch.zeros_like(top), self.hill_center[:, 1] + foot, self.hill_center[:, 2] + foot], 1)
        return lo, hi

    def to(self, device: torch.device | str) -> City:
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).to(device)
                                            for f in dataclasses.fields(self)
                                            if isinstance(getattr(self, f.name), torch.Tensor)})


def _block_kinds(n: int, rng: np.random.Generator) -> np.ndarray:
    """Mostly building blocks, with at least one park; plazas from 3 x 3 cities on."""
    parks = max(1, round(0.15 * n * n))
    plazas = round(0.1 * n * n)
    kinds = np.full(n * n, BUILDINGS)
    kinds[:parks] = PARK
    kinds[parks:parks + plazas] = PLAZA
    return rng.permutation(kinds).reshape(n, n)


def _split(lo: float, hi: float, parts: int, rng: np.random.Generator) -> np.ndarray:
    """Cut [lo, hi] into `parts` lots of jittered widths; returns the parts + 1 cut positions."""
    cuts = np.linspace(lo, hi, parts + 1)
    cuts[1:-1] += rng.uniform(-0.15, 0.15, parts - 1) * (hi - lo) / parts
    return cuts


def _buildings(city_extent: float, bounds: list[tuple[float, float, float, float]],
               height_range: tuple[float, float], rng: np.random.Generator) -> list[tuple[np.ndarray, ...]]:
    """Boxes on a jittered grid of lots inside each building block; taller towards the centre."""
    h_min, h_max = height_range
    boxes = []
    for y0, y1, z0, z1 in bounds:
        ys = _split(y0 + SIDEWALK, y1 - SIDEWALK, int(rng.choice([1, 2, 3], p=[0.1, 0.5, 0.4])), rng)
        zs = _split(z0 + SIDEWALK, z1 - SIDEWALK, int(rng.choice([1, 2, 3], p=[0.1, 0.5, 0.4])), rng)
        for a in range(len(ys) - 1):
            for b in range(len(zs) - 1):
                setback = rng.uniform(0.5, 3.0, 4)
                lo_y, hi_y = ys[a] + setback[0], ys[a + 1] - setback[1]
                lo_z, hi_z = zs[b] + setback[2], zs[b + 1] - setback[3]
                if rng.random() < 0.08 or hi_y - lo_y < 5 or hi_z - lo_z < 5:
                    continue  # an empty lot
                r = np.hypot(lo_y + hi_y, lo_z + hi_z) / 2 / city_extent
                downtown = 0.45 + 0.55 * np.exp(-2 * r * r)
                height = h_min + (h_max - h_min) * rng.beta(1.5, 3.0) * downtown
                boxes.append((np.array([-height, lo_y, lo_z]), np.array([0.0, hi_y, hi_z])))
    # A landmark tower: the building nearest the centre gets the full height, so the preset fixes the skyline.
    if boxes:
        centre = min(range(len(boxes)), key=lambda i: np.abs(boxes[i][0][1:] + boxes[i][1][1:]).sum())
        boxes[centre][0][0] = -h_max
    return boxes


def _trees(kind: int, bounds: tuple[float, float, float, float], rng: np.random.Generator) -> list[np.ndarray]:
    """Tree positions (y, z, canopy radius): scattered in parks, four at a plaza's corners."""
    y0, y1, z0, z1 = bounds
    if kind == PLAZA:
        inset = 5.0
        return [np.array([y, z, rng.uniform(2.0, 3.0)]) for y in (y0 + inset, y1 - inset)
                for z in (z0 + inset, z1 - inset)]
    trees: list[np.ndarray] = []
    wanted = int(rng.integers(6, 12))
    for _ in range(200):  # rejection sampling with a bounded number of tries
        if len(trees) == wanted:
            break
        r = rng.uniform(2.0, 3.5)
        pad = SIDEWALK + r
        y, z = rng.uniform(y0 + pad, y1 - pad), rng.uniform(z0 + pad, z1 - pad)
        if all(np.hypot(y - t[0], z - t[1]) > r + t[2] + 0.5 for t in trees):
            trees.append(np.array([y, z, r]))
    return trees


def _sun(rng: np.random.Generator) -> np.ndarray:
    elevation = np.radians(rng.uniform(40.0, 60.0))
    azimuth = rng.uniform(0.0, 2 * np.pi)
    return np.array([-np.sin(elevation), np.cos(elevation) * np.cos(azimuth), np.cos(elevation) * np.sin(azimuth)])


def street_centres(blocks: int, extent: float, road_width: float, block_size: float) -> np.ndarray:
    """Where the town's blocks + 1 streets run (their centre lines), metres along y, and the same along z."""
    return -extent + road_width / 2 + (block_size + road_width) * np.arange(blocks + 1)


def _country_roads(preset: Preset, extent: float, rng: np.random.Generator) -> np.ndarray:
    """Centre lines (3, 3) as rows (n_y, n_z, c): a street of the town continued along y, one along z, and a
    bypass crossing the farmland at a slant, clear of the town (farther than its corners from the centre)."""
    streets = street_centres(preset.blocks, extent, preset.road_width, preset.block_size)
    slant = rng.uniform(0.0, np.pi)
    offset = rng.choice([-1.0, 1.0]) * rng.uniform(1.8, 2.5) * extent
    return np.array([[0.0, 1.0, rng.choice(streets)], [1.0, 0.0, rng.choice(streets)],
                     [np.cos(slant), np.sin(slant), offset]])


def _hills(preset: Preset, extent: float, ground_half: float, rng: np.random.Generator) -> np.ndarray:
    """Up to `preset.hills` hills as rows (x, y, z, r) of spheres sunk into the ground so that a cap of
    HILL_HEIGHT x the tallest building's height shows, its foot within the terrain around the town and clear of
    the other hills (rejection sampling with a bounded number of tries). No draws when the preset has no hills."""
    hills: list[np.ndarray] = []  # rows (y, z, foot radius, height)
    town = extent * np.sqrt(2)
    band = ground_half - town
    for _ in range(100 * preset.hills):
        if len(hills) == preset.hills:
            break
        foot = rng.uniform(*HILL_SIZE) * band
        height = rng.uniform(*HILL_HEIGHT) * preset.height_range[1]
        y, z = rng.uniform(-ground_half + foot + HILL_GAP, ground_half - foot - HILL_GAP, 2)
        if np.hypot(y, z) - foot > town + HILL_GAP and all(
                np.hypot(y - h[0], z - h[1]) > foot + h[2] + HILL_GAP for h in hills):
            hills.append(np.array([y, z, foot, height]))
    out = np.array(hills).reshape(-1, 4)
    # A cap of height h over a foot of radius a belongs to the sphere of radius (a^2 + h^2) / 2h.
    radius = (out[:, 2] ** 2 + out[:, 3] ** 2) / (2 * out[:, 3])
    return np.stack([radius - out[:, 3], out[:, 0], out[:, 1], radius], 1)


def _jittered(palette: list[tuple[float, float, float]], count: int, jitter: float,
              rng: np.random.Generator) -> np.ndarray:
    """`count` linear colours picked from an sRGB palette, each channel moved by up to `jitter`."""
    picks = np.asarray(palette)[rng.integers(0, len(palette), count)].reshape(count, 3)
    return _linear(np.clip(picks + rng.uniform(-jitter, jitter, (count, 3)), 0, 1))


def build_city(preset: Preset, rng: np.random.Generator) -> City:
    """Lay out a city for `preset`, drawing every random choice from `rng` (CPU tensors)."""
    n = preset.blocks
    pitch = preset.block_size + preset.road_width
    extent = (n * pitch + preset.road_width) / 2
    kinds = _block_kinds(n, rng)
    start = -extent + preset.road_width  # where the first block begins, along y and along z
    bounds = {(iy, iz): (start + iy * pitch, start + iy * pitch + preset.block_size,
                         start + iz * pitch, start + iz * pitch + preset.block_size)
              for iy in range(n) for iz in range(n)}
    boxes = _buildings(extent, [b for k, b in bounds.items() if kinds[k] == BUILDINGS], preset.height_range, rng)
    trees = [t for k, b in bounds.items() if kinds[k] != BUILDINGS for t in _trees(int(kinds[k]), b, rng)]
    B, T = len(boxes), len(trees)
    tree = np.array(trees).reshape(T, 3)
    trunk_height = rng.uniform(2.0, 4.0, T)
    # The canopy's centre sits 0.75 radius above the trunk's top, which hides the trunk's top inside it.
    canopy_center = np.stack([-(trunk_height + 0.75 * tree[:, 2]), tree[:, 0], tree[:, 1]], 1)
    ground_half = extent + preset.margin
    # Drawn only for presets with a countryside, so that the other presets' draws, hence files, stay as they were.
    roads = _country_roads(preset, extent, rng) if preset.farmland else np.zeros((0, 3))
    field_angle = rng.uniform(-0.4, 0.4) if preset.farmland else 0.0
    hills = _hills(preset, extent, ground_half, rng)

    def tensor(a: np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.as_tensor(np.asarray(a), dtype=dtype)

    return City(
        blocks=n, block_size=preset.block_size, road_width=preset.road_width, extent=extent,
        ground_half=ground_half, farmland=preset.farmland, field_angle=float(field_angle),
        noise_seed=int(rng.integers(0, 2 ** 30)),
        block_kind=tensor(kinds, torch.long),
        box_lo=tensor(np.array([b[0] for b in boxes]).reshape(B, 3)),
        box_hi=tensor(np.array([b[1] for b in boxes]).reshape(B, 3)),
        wall_albedo=tensor(_jittered(WALL_PALETTE, B, 0.04, rng)),
        roof_albedo=tensor(_jittered(ROOF_PALETTE, B, 0.03, rng)),
        glass_albedo=tensor(_jittered([GLASS], B, 0.05, rng)),
        floor_height=tensor(rng.uniform(3.0, 4.0, B)),
        window_pitch=tensor(rng.uniform(2.5, 4.0, B)),
        tree_yz=tensor(tree[:, :2]),
        trunk_radius=tensor(rng.uniform(0.3, 0.45, T)),
        trunk_top=tensor(-trunk_height),
        canopy_center=tensor(canopy_center),
        canopy_radius=tensor(tree[:, 2]),
        canopy_albedo=tensor(_jittered(LEAVES, T, 0.03, rng)),
        country_road=tensor(roads),
        hill_center=tensor(hills[:, :3]),
        hill_radius=tensor(hills[:, 3]),
        sun=tensor(_sun(rng)),
    )
