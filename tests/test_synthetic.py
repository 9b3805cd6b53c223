"""The synthetic city: determinism, the dataset it writes, and its depth and colours against an independent
float64 ray caster written here (rays from the metadata, shapes from scene.json); the oblique survey over a town
in farmland and hills, on its 'oblique_tiny' preset."""
from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mega_nerf.cli.options import base_parser, scene_bounds
from mega_nerf.cli.synthetic import main, parse_args
from mega_nerf.data.dataset import ImageMetadata, load_dataset
from mega_nerf.errors import UserError
from mega_nerf.synthetic import PRESETS, generate_city, shading
from mega_nerf.synthetic.generate import plan_scene, subpixel_grid
from mega_nerf.synthetic.raycast import GROUND, HILL, first_hit
from mega_nerf.synthetic.scene import City, build_city
from mega_nerf.synthetic.shading import AMBIENT, COUNTRY_ROAD_WIDTH, FIELD_CROPS, SUN_LIGHT, albedo, render
from mega_nerf.synthetic.surface import depth_map, near_surface_fractions, surface_points
from mega_nerf.synthetic.survey import normalisation, plan_survey

TOL = 2e-5  # normalised units (about 2 mm in the tiny city): float32 rendering against float64 here
ROOT = Path(__file__).resolve().parents[1]



# ---- an independent caster: every shape is an interval of the ray, entered after the origin -----------------
def _box_interval(o, d, lo, hi):
    """Entry and exit (N, S) of rays o, d (N, 3) through boxes lo, hi (S, 3)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t1 = (lo[None] - o[:, None]) / d[:, None]
        t2 = (hi[None] - o[:, None]) / d[:, None]
    t1, t2 = np.nan_to_num(t1, nan=-np.inf), np.nan_to_num(t2, nan=np.inf)
    return np.minimum(t1, t2).max(-1), np.maximum(t1, t2).min(-1)


def _sphere_interval(o, d, c, r):
    b = ((o[:, None] - c[None]) * d[:, None]).sum(-1)
    q = ((o[:, None] - c[None]) ** 2).sum(-1) - r[None] ** 2
    root = np.sqrt(np.maximum(b * b - q, 0))
    miss = b * b - q < 0
    return np.where(miss, np.inf, -b - root), np.where(miss, -np.inf, -b + root)


def _cap_interval(o, d, c, r, ground_x):
    """Hills: spheres c (S, 3), r (S,) cut by the half-space above the ground (x <= ground_x)."""
    t_in, t_out = _sphere_interval(o, d, c, r)
    with np.errstate(divide="ignore", invalid="ignore"):
        t_ground = (ground_x - o[:, :1]) / d[:, :1]  # (N, 1) where each ray crosses the ground plane
    down = d[:, :1] > 0
    return np.where(down, t_in, np.maximum(t_in, t_ground)), np.where(down, np.minimum(t_out, t_ground), t_out)


def _cylinder_interval(o, d, yz, r, top, bottom):
    """Vertical cylinders (axis yz (S, 2), radius r, top < x < bottom) as the infinite cylinder cut by a slab."""
    o2, d2 = o[:, None, 1:] - yz[None], d[:, None, 1:]
    a = np.maximum((d2 ** 2).sum(-1), 1e-300)
    b, q = (o2 * d2).sum(-1), (o2 ** 2).sum(-1) - r[None] ** 2
    disc = b * b - a * q
    root = np.sqrt(np.maximum(disc, 0))
    t_in, t_out = np.where(disc < 0, np.inf, (-b - root) / a), np.where(disc < 0, -np.inf, (-b + root) / a)
    lo = np.stack([top, yz[:, 0] - r, yz[:, 1] - r], 1)
    hi = np.stack([bottom, yz[:, 0] + r, yz[:, 1] + r], 1)
    s_in, s_out = _box_interval(o, d, lo, hi)
    return np.maximum(t_in, s_in), np.minimum(t_out, s_out)


def _shapes(summary: dict) -> dict:
    trees = summary["trees"]
    return {
        "box_lo": np.array([b["min"] for b in summary["buildings"]]),
        "box_hi": np.array([b["max"] for b in summary["buildings"]]),
        "canopy_c": np.array([t["canopy"]["center"] for t in trees]),
        "canopy_r": np.array([t["canopy"]["radius"] for t in trees]),
        "trunk_yz": np.array([t["trunk"]["top"][1:] for t in trees]),
        "trunk_r": np.array([t["trunk"]["radius"] for t in trees]),
        "trunk_top": np.array([t["trunk"]["top"][0] for t in trees]),
        "trunk_bottom": np.array([t["trunk"]["bottom"][0] for t in trees]),
        "ground_lo": np.array(summary["ground"]["min"]), "ground_hi": np.array(summary["ground"]["max"]),
        "hill_c": np.array([h["center"] for h in summary["hills"]]).reshape(-1, 3),
        "hill_r": np.array([h["radius"] for h in summary["hills"]]),
    }


def _robust_first_hit(o: np.ndarray, d: np.ndarray, s: dict, tol: float) -> np.ndarray:
    """Distance (N,) to the first shape each ray passes through by more than `tol` (grazes are ambiguous)."""
    g_lo, g_hi = s["ground_lo"], s["ground_hi"]
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (g_lo[0] - o[:, 0]) / d[:, 0]
    p = o + t[:, None] * d
    inside = ((p[:, 1:] > g_lo[1:] + tol) & (p[:, 1:] < g_hi[1:] - tol)).all(-1)
    best = np.where((d[:, 0] > 0) & (t > 0) & inside, t, np.inf)
    for t_in, t_out in (_box_interval(o, d, s["box_lo"], s["box_hi"]),
                        _sphere_interval(o, d, s["canopy_c"], s["canopy_r"]),
                        _cylinder_interval(o, d, s["trunk_yz"], s["trunk_r"], s["trunk_top"], s["trunk_bottom"]),
                        _cap_interval(o, d, s["hill_c"], s["hill_r"], g_lo[0])):
        entered = (t_in > 0) & (t_out - t_in > tol)
        best = np.minimum(best, np.where(entered, t_in, np.inf).min(-1, initial=np.inf))
    return best


def _on_a_surface(p: np.ndarray, s: dict, tol: float) -> np.ndarray:
    """Whether each point (N, 3) lies on the ground square, a box face, a canopy or a trunk, within `tol`."""
    g_lo, g_hi = s["ground_lo"], s["ground_hi"]
    on = (np.abs(p[:, 0] - g_lo[0]) < tol) & ((p[:, 1:] > g_lo[1:] - tol) & (p[:, 1:] < g_hi[1:] + tol)).all(-1)
    q = p[:, None]
    in_box = ((q > s["box_lo"] - tol) & (q < s["box_hi"] + tol)).all(-1)
    near_face = np.minimum(np.abs(q - s["box_lo"]), np.abs(q - s["box_hi"])).min(-1) < tol
    on |= (in_box & near_face).any(-1)
    on |= (np.abs(np.linalg.norm(q - s["canopy_c"], axis=-1) - s["canopy_r"]) < tol).any(-1)
    radial = np.linalg.norm(q[..., 1:] - s["trunk_yz"], axis=-1)
    height_ok = (q[..., 0] > s["trunk_top"] - tol) & (q[..., 0] < s["trunk_bottom"] + tol)
    side = (np.abs(radial - s["trunk_r"]) < tol) & height_ok
    cap = (np.abs(q[..., 0] - s["trunk_top"]) < tol) & (radial < s["trunk_r"] + tol)
    hill = (np.abs(np.linalg.norm(q - s["hill_c"], axis=-1) - s["hill_r"]) < tol) & (q[..., 0] < g_lo[0] + tol)
    return on | (side | cap).any(-1) | hill.any(-1)


def _inside_a_shape(p: np.ndarray, s: dict) -> np.ndarray:
    """Whether each point (N, 3) lies strictly inside a box, canopy or trunk, or under the ground square."""
    q = p[:, None]
    under = (p[:, 0] > s["ground_lo"][0]) & ((p[:, 1:] > s["ground_lo"][1:]) & (p[:, 1:] < s["ground_hi"][1:])).all(-1)
    box = ((q > s["box_lo"]) & (q < s["box_hi"])).all(-1).any(-1)
    canopy = (np.linalg.norm(q - s["canopy_c"], axis=-1) < s["canopy_r"]).any(-1)
    trunk = ((np.linalg.norm(q[..., 1:] - s["trunk_yz"], axis=-1) < s["trunk_r"])
             & (q[..., 0] > s["trunk_top"]) & (q[..., 0] < s["trunk_bottom"])).any(-1)
    hill = ((np.linalg.norm(q - s["hill_c"], axis=-1) < s["hill_r"]) & (q[..., 0] < s["ground_lo"][0])).any(-1)
    return under | box | canopy | trunk | hill


def _camera_rays(m: ImageMetadata, dx: float = 0.5, dy: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Row-major rays of an image from its metadata, by docs/DESIGN.md's convention, in float64; through the
    point (dx, dy) of each pixel's square (the centre by default)."""
    fx, fy, cx, cy = m.intrinsics.double().numpy()
    j, i = np.mgrid[0:m.H, 0:m.W]
    d = np.stack([(i + dx - cx) / fx, -(j + dy - cy) / fy, -np.ones(i.shape)], -1).reshape(-1, 3)
    c2w = m.c2w.double().numpy()
    d = (d / np.linalg.norm(d, axis=-1, keepdims=True)) @ c2w[:, :3].T
    return np.broadcast_to(c2w[:, 3], d.shape), d


def _depth(root: Path, m: ImageMetadata) -> np.ndarray:
    return np.load(root / "depth" / m.split / f"{m.name}.npy")


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---- determinism and layout ---------------------------------------------------------------------------------
def test_same_seed_gives_identical_files_and_another_seed_another_city(tiny_city: Path, tmp_path: Path) -> None:
    generate_city(tmp_path / "again", "tiny", seed=0, device="cpu", progress=False)
    first, again = _files(tiny_city), _files(tmp_path / "again")
    assert first.keys() == again.keys()
    for name, data in first.items():  # config.yaml names its own directory
        expected = data.replace(str(tiny_city).encode(), str(tmp_path / "again").encode())
        assert again[name] == expected, name
    other = generate_city(tmp_path / "other", "tiny", seed=1, device="cpu", write_depth=False, progress=False)
    assert other["buildings"] != json.loads(first["scene.json"])["buildings"]
    assert (tmp_path / "other/train/rgbs/000000.png").read_bytes() != first["train/rgbs/000000.png"]
    assert not (tmp_path / "other" / "depth").exists()


def test_dataset_loads_with_counts_sizes_intrinsics_and_files(tiny_city: Path, tiny_city_summary: dict) -> None:
    preset = PRESETS["tiny"]
    dataset = load_dataset(tiny_city)
    val_every = preset.val_every
    assert (len(dataset.train), len(dataset.val)) == (32, 8)
    assert (tiny_city_summary["train_images"], tiny_city_summary["val_images"]) == (32, 8)
    assert [m.index for m in dataset.val] == list(range(val_every - 1, preset.views, val_every))
    focal = preset.W / 2 / math.tan(math.radians(preset.fov_deg) / 2)
    for m in dataset.images:
        assert (m.W, m.H) == (64, 48) and m.load_rgb().shape == (48, 64, 3)
        assert torch.allclose(m.intrinsics, torch.tensor([focal, focal, 32.0, 24.0]))
        depth = _depth(tiny_city, m)
        assert depth.dtype == np.float32 and depth.shape == (48, 64)
    assert (tiny_city / "overview.png").is_file()
    assert tiny_city_summary["blocks"] == [2, 2] and tiny_city_summary["num_buildings"] >= 5


def test_survey_flies_level_above_the_city_looking_down(tiny_city: Path, tiny_city_summary: dict) -> None:
    dataset = load_dataset(tiny_city)
    c2w = torch.stack([m.c2w for m in dataset.images]).double()
    centres, rot = c2w[:, :, 3], c2w[:, :, :3]
    assert torch.allclose(torch.linalg.det(rot), torch.ones(len(rot), dtype=rot.dtype), atol=1e-5)
    assert torch.allclose(centres.mean(0), torch.zeros(3, dtype=rot.dtype), atol=1e-6)  # origin_drb is their centre
    assert centres.abs().max() <= 1 and np.abs(np.array([b["max"] for b in tiny_city_summary["buildings"]])).max() <= 1
    assert torch.allclose(centres[:, 0], centres[0, 0])  # one altitude ...
    tallest = min(b["min"][0] for b in tiny_city_summary["buildings"])
    assert centres[0, 0] < tallest  # ... above every roof (x points down)
    pitch = torch.rad2deg(torch.asin(-rot[:, 0, 2]))  # forward = -back; its down component
    assert pitch.min() >= 30 - 1e-3 and pitch.max() <= 60 + 1e-3 and pitch.std() > 3
    assert rot[:, 0, 0].abs().max() < 1e-5  # no roll: the right axis stays horizontal


def test_config_file_parses_with_our_options(tiny_city: Path, tiny_city_summary: dict) -> None:
    args = base_parser("test").parse_args(["--config_file", str(tiny_city / "config.yaml")])
    assert Path(args.dataset_path) == tiny_city
    assert args.ray_altitude_range == tiny_city_summary["ray_altitude_range"]
    top, ground = scene_bounds(args, load_dataset(tiny_city).coordinates).altitude
    tallest = min(b["min"][0] for b in tiny_city_summary["buildings"])
    assert top < tallest and ground > tiny_city_summary["ground"]["min"][0]


def test_refuses_to_overwrite_a_dataset(tiny_city: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="already holds a dataset"):
        main(["--preset", "tiny", "--output", str(tiny_city)])
    (tmp_path / "train").mkdir()  # someone else's data
    with pytest.raises(UserError, match="train not written by generate_city"):
        generate_city(tmp_path, "tiny", device="cpu", progress=False)
    assert (tmp_path / "train").is_dir()
    masks = tmp_path / "masks"  # a folder of other files: the dataset would be mixed into it
    masks.mkdir()
    (masks / "params.pt").write_bytes(b"")
    with pytest.raises(UserError, match="params.pt not written by generate_city"):
        generate_city(masks, "tiny", device="cpu", progress=False)
    assert [p.name for p in masks.iterdir()] == ["params.pt"]


# ---- geometry: depth and the caster against the independent one --------------------------------------------
@pytest.mark.parametrize("scene", ["tiny_city", "oblique_city"])
def test_depth_is_the_first_hit_of_each_ray(scene: str, request: pytest.FixtureRequest) -> None:
    root = request.getfixturevalue(scene)
    shapes = _shapes(json.loads((root / "scene.json").read_text()))
    dataset = load_dataset(root)
    exact = total = 0
    for m in dataset.images[::3]:
        o, d = _camera_rays(m)
        depth = _depth(root, m).reshape(-1).astype(np.float64)
        expected = _robust_first_hit(o, d, shapes, TOL)
        sky = np.isinf(depth)
        assert np.isinf(expected[sky]).all(), f"{m.name}: a sky pixel's ray hits a shape"
        assert (expected[~sky] > depth[~sky] - TOL).all(), f"{m.name}: a shape lies before the recorded depth"
        assert _on_a_surface(o[~sky] + depth[~sky, None] * d[~sky], shapes, TOL).all(), m.name
        exact += int((np.abs(expected[~sky] - depth[~sky]) < TOL).sum() + sky.sum())
        total += depth.size
    assert exact >= 0.999 * total


def _city_shapes(city: City) -> dict:
    """A city's shapes in metres, in the form the caster above takes."""
    def np64(t: torch.Tensor) -> np.ndarray:
        return t.double().numpy()

    return {"box_lo": np64(city.box_lo), "box_hi": np64(city.box_hi), "canopy_c": np64(city.canopy_center),
            "canopy_r": np64(city.canopy_radius), "trunk_yz": np64(city.tree_yz), "trunk_r": np64(city.trunk_radius),
            "trunk_top": np64(city.trunk_top), "trunk_bottom": np.zeros(len(city.trunk_top)),
            "ground_lo": np.array([0.0, -city.ground_half, -city.ground_half]),
            "ground_hi": np.array([0.0, city.ground_half, city.ground_half]),
            "hill_c": np64(city.hill_center), "hill_r": np64(city.hill_radius)}


@pytest.mark.parametrize("preset", ["small", "oblique_tiny"])
def test_caster_matches_brute_force_on_random_rays(preset: str) -> None:
    """Random rays from inside the building layer (and the hills' layer) and above it, over the city (over the
    whole terrain where there are hills), in every direction (horizontal and upward ones too), with a small
    budget so that candidate culling runs in many groups."""
    city = build_city(PRESETS[preset], np.random.default_rng(3))
    shapes = _city_shapes(city)
    rng = np.random.default_rng(0)
    n = 20000
    reach = city.ground_half if len(city.hill_radius) else city.extent
    o = np.stack([rng.uniform(-50, -0.5, n), *rng.uniform(-reach, reach, (2, n))], 1)
    d = rng.normal(size=(n, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    # The rays the caster sees, in float64: far grazing hits would otherwise differ by the float32 rounding.
    o, d = o.astype(np.float32).astype(np.float64), d.astype(np.float32).astype(np.float64)
    o, d = o[~_inside_a_shape(o, shapes)], d[~_inside_a_shape(o, shapes)]
    hit = first_hit(city, torch.from_numpy(o).float(), torch.from_numpy(d).float(), budget=4096)
    t = hit.t.double().numpy()
    tol = 1e-3  # metres
    expected = _robust_first_hit(o, d, shapes, tol)
    missed = np.isinf(t)
    assert np.isinf(expected[missed]).all() and (expected[~missed] > t[~missed] - tol).all()
    assert _on_a_surface(o[~missed] + t[~missed, None] * d[~missed], shapes, tol).all()
    assert (np.abs(expected[~missed] - t[~missed]) < tol).mean() > 0.999 and (~missed).mean() > 0.3
    p, n = o[~missed] + t[~missed, None] * d[~missed], hit.normal.double().numpy()[~missed]
    assert np.allclose(np.linalg.norm(n, axis=1), 1, atol=1e-4)
    outward = _inside_a_shape(p - 0.01 * n, shapes) & ~_inside_a_shape(p + 0.01 * n, shapes)
    assert outward.mean() > 0.999


def test_ground_light_is_lambert_with_hard_shadows() -> None:
    """Ground points seen from straight above: colour / albedo is the ambient light plus, where a float64
    shadow ray towards the sun reaches the sky, the sun's light times cos(normal, sun)."""
    city = build_city(PRESETS["small"], np.random.default_rng(5))
    shapes = _city_shapes(city)
    rng = np.random.default_rng(1)
    p = np.stack([np.zeros(4000), *rng.uniform(-city.extent, city.extent, (2, 4000))], 1)
    o = torch.from_numpy(p - [city.max_height + 10, 0, 0]).float()
    d = torch.tensor([[1.0, 0.0, 0.0]]).expand_as(o)
    rgb, t = render(city, o, d, budget=1 << 16)
    hit = first_hit(city, o, d, budget=1 << 16)
    ground = (hit.material == GROUND).numpy()
    ratio = (rgb / albedo(city, hit, o + t.unsqueeze(-1) * d))[ground].double().numpy()
    sun = city.sun.double().numpy()
    lit = np.isinf(_robust_first_hit(p[ground] - [0.01, 0, 0], np.broadcast_to(sun, p[ground].shape), shapes, 1e-3))
    expected = np.array(AMBIENT) + np.outer(lit * -sun[0], SUN_LIGHT)
    assert 0.2 < lit.mean() < 0.95  # both kinds of points are there
    assert (np.abs(ratio - expected).max(1) < 1e-4).mean() > 0.995  # a few may sit on a shadow's edge


# ---- colours ------------------------------------------------------------------------------------------------
def _pixels(m: ImageMetadata) -> np.ndarray:
    return m.load_rgb().numpy().reshape(-1, 3).astype(np.float64)


def test_roofs_look_unlike_the_sky(tiny_city: Path, tiny_city_summary: dict) -> None:
    shapes = _shapes(tiny_city_summary)
    margin = 1.5 / tiny_city_summary["pose_scale_factor"]  # 1.5 m inside the edges, clear of the parapet
    roof, sky = [], []
    for m in load_dataset(tiny_city).images:
        o, d = _camera_rays(m)
        depth = _depth(tiny_city, m).reshape(-1).astype(np.float64)
        p = o + np.nan_to_num(depth, posinf=0)[:, None] * d
        on_roof = ((np.abs(p[:, None, 0] - shapes["box_lo"][:, 0]) < TOL)
                   & (p[:, None, 1:] > shapes["box_lo"][:, 1:] + margin).all(-1)
                   & (p[:, None, 1:] < shapes["box_hi"][:, 1:] - margin).all(-1)).any(-1)
        roof.append(_pixels(m)[on_roof])
        sky.append(_pixels(m)[np.isinf(depth)])
    roof, sky = np.concatenate(roof), np.concatenate(sky)
    assert len(roof) > 100 and len(sky) > 100
    assert np.linalg.norm(roof.mean(0) - sky.mean(0)) > 40
    assert (sky[:, 2] - sky[:, 0]).mean() > (roof[:, 2] - roof[:, 0]).mean() + 10  # the sky is the bluer


def test_sky_is_a_gradient_by_direction(tiny_city: Path) -> None:
    checked = 0
    for m in load_dataset(tiny_city).images:
        sky = np.isinf(_depth(tiny_city, m).reshape(-1))
        if sky.sum() < 50:
            continue
        _, d = _camera_rays(m)
        rgb = _pixels(m)[sky]
        luma = rgb @ np.array([0.299, 0.587, 0.114])
        assert rgb[:, 2].mean() > rgb[:, 0].mean()
        assert np.corrcoef(-d[sky, 0], luma)[0, 1] > 0.9  # brighter towards the horizon (nan if flat)
        checked += 1
    assert checked >= 5


def test_appearance_drifts_smoothly_along_the_path(tiny_city_summary: dict) -> None:
    views = tiny_city_summary["appearance"]
    assert [v["name"] for v in views] == sorted(v["name"] for v in views)
    exposure = np.array([v["exposure"] for v in views])
    gains = np.array([v["white_balance"] for v in views])
    for factor in (exposure[:, None], gains):
        span = factor.max(0) - factor.min(0)
        assert (span > 0.05).all()
        assert (np.abs(np.diff(factor, axis=0)).mean(0) < 0.25 * span).all()  # neighbours look alike


# ---- the first presets keep their numbers -------------------------------------------------------------------
def test_level_presets_keep_their_normalisation(tiny_city_summary: dict) -> None:
    """Seed 0's pose_scale_factor and origin (down) of the first presets, as before the oblique presets came:
    the whole ground square in [-1, 1]."""
    before = {"tiny": (81.0, -49.0), "small": (104.0, -55.0), "city": (256.93611111111113, -90.0)}
    for name, (scale, down) in before.items():
        rng = np.random.default_rng(0)
        city = build_city(PRESETS[name], rng)
        origin, got = normalisation(city, plan_survey(city, PRESETS[name], rng), PRESETS[name])
        assert got == pytest.approx(scale, rel=1e-12), name
        assert origin[0] == pytest.approx(down, rel=1e-12), name
    s = tiny_city_summary
    assert (s["pose_scale_factor"], s["altitude"], s["max_height"], s["ray_altitude_range"]) == (81.0, 49.0, 24.0,
                                                                                                  [-29.0, 2.0])
    assert s["flight_altitudes"] == [49.0, 49.0] and s["terrain_half"] == pytest.approx(1.0) and s["hills"] == []


# ---- the oblique survey ---------------------------------------------------------------------------------------
def _poses(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """Camera centres (V, 3) and rotations (V, 3, 3) of every image, normalised, float64."""
    c2w = torch.stack([m.c2w for m in load_dataset(root).images]).double().numpy()
    return c2w[:, :, 3], c2w[:, :, :3]


def _town(summary: dict) -> np.ndarray:
    """The town box (2, 3): its min and max corners, normalised."""
    return np.array([summary["town"]["min"], summary["town"]["max"]])


@pytest.mark.parametrize("preset", ["oblique", "oblique_tiny", "survey256"])
def test_oblique_presets_scale_by_cameras_and_town(preset: str) -> None:
    """Without rendering, so that the benchmark preset is checked too: cameras and town fill [-1, 1], the
    ground square reaches 4 times as far as the town, both hills stand, lower than the tallest building."""
    rng = np.random.default_rng(0)
    city = build_city(PRESETS[preset], rng)
    survey = plan_survey(city, PRESETS[preset], rng)
    origin, scale = normalisation(city, survey, PRESETS[preset])
    town = (np.stack(city.town_box()) - origin) / scale
    extent = max(np.abs((survey.positions - origin) / scale).max(), np.abs(town).max())
    assert extent == pytest.approx(1.0, abs=1e-12)
    assert city.ground_half / scale >= 4 * np.abs(town[:, 1:]).max()
    assert len(city.hill_radius) == PRESETS[preset].hills == 2
    assert city.max_height == -float(city.box_lo[:, 0].min())  # the tallest shape is a building


@pytest.mark.parametrize("preset", ["street", "street_tiny"])
def test_street_views_walk_every_street_at_eye_level(preset: str) -> None:
    """Without rendering: views walk each street end to end, those along y first, each standing on its roadway
    (within a quarter of its width of the centre line, clear of every building and tree) 1.6-2.4 m above the ground,
    heading within 70 degrees of the street's direction, both ways, and looking 20 degrees up to 5 down; the
    cameras and the town fill [-1, 1]."""
    preset_ = PRESETS[preset]
    rng = np.random.default_rng(0)
    city = build_city(preset_, rng)
    survey = plan_survey(city, preset_, rng)
    streets = city.blocks + 1
    centres = -city.extent + city.road_width / 2 + city.pitch * np.arange(streets)
    counts = [len(part) for part in np.array_split(np.arange(preset_.views), 2 * streets)]
    street = np.repeat(np.arange(2 * streets), counts)
    along_y = street < streets
    across = np.where(along_y, survey.positions[:, 2], survey.positions[:, 1])
    along = np.where(along_y, survey.positions[:, 1], survey.positions[:, 2])
    assert np.abs(across - centres[street % streets]).max() <= city.road_width / 4 + 1e-9
    lo, hi = (x[:, 1:].numpy() for x in city.footprints())  # every building and tree, horizontally
    yz = survey.positions[:, None, 1:]
    assert not ((yz > lo) & (yz < hi)).all(-1).any()
    for k in range(2 * streets):
        assert along[street == k].min() == -city.extent and along[street == k].max() == city.extent
    assert survey.altitudes.min() >= 1.6 and survey.altitudes.max() <= 2.4
    forward = -survey.rotations[:, :, 2]
    pitch = np.degrees(np.arcsin(forward[:, 0]))  # below the horizon
    assert pitch.min() >= -20 - 1e-6 and pitch.max() <= 5 + 1e-6 and pitch.std() > 4
    heading = forward[:, 1:] / np.linalg.norm(forward[:, 1:], axis=1, keepdims=True)
    turn = np.degrees(np.arccos(np.abs(np.where(along_y, heading[:, 0], heading[:, 1]))))
    assert turn.max() <= 70 + 1e-6
    assert (np.where(along_y, heading[:, 0], heading[:, 1]) > 0).mean() == pytest.approx(0.5, abs=0.2)
    origin, scale = normalisation(city, survey, preset_)
    town = (np.stack(city.town_box()) - origin) / scale
    assert max(np.abs((survey.positions - origin) / scale).max(), np.abs(town).max()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match=f"needs {4 * streets} views or more"):
        dataclasses.replace(preset_, views=4 * streets - 1)
    with pytest.raises(ValueError, match="survey must be 'drone' or 'street'"):
        dataclasses.replace(preset_, survey="walk")


def test_oblique_normalisation_holds_cameras_and_town_not_terrain(oblique_city: Path, oblique_summary: dict
                                                                  ) -> None:
    """What the files say: every camera and building corner in [-1, 1] and in the town box (buildings), which
    with the cameras fills it; the ground square (terrain_half) 4 times as wide as the town, past [-3, 3]."""
    s = oblique_summary
    centres, _ = _poses(oblique_city)
    corners = np.array([[b["min"], b["max"]] for b in s["buildings"]])  # (B, 2, 3)
    town = _town(s)
    assert np.abs(centres).max() <= 1 + 1e-6 and np.abs(corners).max() <= 1 + 1e-6
    assert (corners >= town[0] - 1e-9).all() and (corners <= town[1] + 1e-9).all()
    assert max(np.abs(centres).max(), np.abs(town).max()) == pytest.approx(1.0, abs=1e-6)  # and no wider
    town_half = np.abs(town[:, 1:]).max()
    assert s["terrain_half"] >= 4 * town_half and s["terrain_half"] > 3
    assert np.array(s["ground"]["max"][1:]) == pytest.approx([s["terrain_half"]] * 2, abs=1e-9)


def test_oblique_cameras_look_30_to_60_degrees_down_from_varied_altitudes(oblique_city: Path,
                                                                           oblique_summary: dict) -> None:
    """80 degrees of horizontal field of view; altitudes 1.5-3 x the tallest building; over the town (give or
    take a road), heading towards its centre give or take 80 degrees."""
    s = oblique_summary
    centres, rot = _poses(oblique_city)
    pitch = np.degrees(np.arcsin(-rot[:, 0, 2]))  # forward = -back; its down component
    assert pitch.min() >= 30 - 1e-3 and pitch.max() <= 60 + 1e-3 and pitch.std() > 5
    for m in load_dataset(oblique_city).images:
        assert math.degrees(2 * math.atan(m.W / 2 / float(m.intrinsics[0]))) == pytest.approx(80.0, abs=1e-4)
    scale, origin = s["pose_scale_factor"], np.array(s["origin_drb"])
    tallest = (s["ground"]["min"][0] - min(b["min"][0] for b in s["buildings"])) * scale
    assert tallest == pytest.approx(s["max_height"], rel=1e-6)  # no tree or hill stands higher
    ratio = -(centres[:, 0] * scale + origin[0]) / tallest
    assert ratio.min() >= 1.5 - 1e-5 and ratio.max() <= 3 + 1e-5 and ratio.max() - ratio.min() > 1
    assert np.abs(centres[:, 1:]).max() <= 1.25 * np.abs(_town(s)[:, 1:]).max()
    heading, to_centre = -rot[:, 1:, 2], -centres[:, 1:]
    cos = (heading * to_centre).sum(1) / np.linalg.norm(heading, axis=1) / np.linalg.norm(to_centre, axis=1)
    assert cos.min() >= math.cos(math.radians(80)) - 1e-6


def test_oblique_upper_corners_see_past_the_unit_cube(oblique_city: Path, oblique_summary: dict) -> None:
    """In 3 images of 4 both upper corner rays see the sky or land on terrain more than twice as far out as
    [-1, 1] (which blows up a scene box fitted to where corner rays land); in 9 of 20 both see the sky. The
    hills show too."""
    images = load_dataset(oblique_city).images
    past = sky = on_hills = 0
    shapes = _shapes(oblique_summary)
    for m in images:
        o, d = _camera_rays(m)
        depth = _depth(oblique_city, m).reshape(-1).astype(np.float64)
        p = o + np.nan_to_num(depth, posinf=0)[:, None] * d
        top = [0, m.W - 1]  # row-major: the ends of the top row
        far = np.isinf(depth[top]) | (np.abs(p[top, 1:]).max(1) > 2)
        past += int(far.all())
        sky += int(np.isinf(depth[top]).all())
        on_hill = np.abs(np.linalg.norm(p[:, None] - shapes["hill_c"], axis=-1) - shapes["hill_r"]) < TOL
        on_hills += int((on_hill.any(1) & np.isfinite(depth)).sum())
    assert past >= 0.75 * len(images) and sky >= 0.45 * len(images)
    assert on_hills > 1000


def test_surface_points_of_an_oblique_scene_reach_the_far_terrain(oblique_city: Path, oblique_summary: dict
                                                                   ) -> None:
    """surface.py on an oblique scene: its true surface points lie on the shapes of scene.json, a tenth of them
    on terrain more than twice as far out as [-1, 1]; each is found again as a surface point."""
    points = surface_points(oblique_city, stride=4)
    assert _on_a_surface(points, _shapes(oblique_summary), TOL).all()
    assert (np.abs(points[:, 1:]).max(1) > 2).mean() > 0.1
    assert near_surface_fractions(points[::50], oblique_city, [1e-9]) == [1.0]


def test_a_depth_map_is_read_whole_or_refused_in_one_line(tiny_city: Path, tmp_path: Path) -> None:
    """depth_map gives an image's H * W depths as written (inf where the sky is seen); a missing map or one of
    another size is a UserError naming its file."""
    meta = load_dataset(tiny_city).images[0]
    written = np.load(tiny_city / "depth" / meta.split / f"{meta.name}.npy")
    depth = depth_map(tiny_city, meta)
    assert depth.shape == (meta.W * meta.H,) and np.array_equal(depth.numpy(), written.reshape(-1))
    other = tmp_path / "other"
    missing = other / "depth" / meta.split / f"{meta.name}.npy"
    with pytest.raises(UserError, match=f"{missing}: missing"):
        depth_map(other, meta)
    missing.parent.mkdir(parents=True)
    np.save(missing, written.reshape(-1)[:-1])
    with pytest.raises(UserError, match=rf"{missing}: {meta.W * meta.H - 1} depths for a {meta.W}x{meta.H} image"):
        depth_map(other, meta)


def test_hills_are_caps_at_their_analytic_height() -> None:
    """Rays straight down within each hill's foot land on its cap at the height of its sphere, and just
    beyond the foot on the ground; level rays towards its axis meet its flank where the sphere says above the
    ground, and nothing below it (only the cap is a hill). Hills stand outside the town, on the ground square,
    below the tallest building."""
    preset = PRESETS["oblique_tiny"]
    city = build_city(preset, np.random.default_rng(0))
    assert len(city.hill_radius) == preset.hills
    rng = np.random.default_rng(1)
    town_lo, town_hi = city.town_box()
    tallest = -float(city.box_lo[:, 0].min())
    for c, r in zip(city.hill_center.double().numpy(), city.hill_radius.double().numpy()):
        foot, height = math.sqrt(r * r - c[0] ** 2), r - c[0]
        assert 0 < height < tallest and np.abs(c[1:]).max() + foot < city.ground_half
        assert np.hypot(*c[1:]) - foot > np.hypot(*np.maximum(-town_lo[1:], town_hi[1:]))
        rho = foot * np.concatenate([np.sqrt(rng.uniform(0, 1, 500)), rng.uniform(1.02, 1.15, 100)])
        angle = rng.uniform(0, 2 * np.pi, rho.shape)
        yz = c[1:] + rho[:, None] * np.stack([np.cos(angle), np.sin(angle)], 1)
        o = np.concatenate([np.full((len(yz), 1), -100.0), yz], 1)
        hit = first_hit(city, torch.from_numpy(o).float(), torch.tensor([[1.0, 0.0, 0.0]]).expand(len(o), 3), 1 << 16)
        on_cap = rho < foot
        expected = np.where(on_cap, c[0] - np.sqrt(np.maximum(r * r - rho ** 2, 0)), 0.0)
        assert np.abs(-100.0 + hit.t.double().numpy() - expected).max() < 1e-3  # metres
        assert (hit.material.numpy() == np.where(on_cap, HILL, GROUND)).all()
        level = np.array([-height / 2, c[0] / 2])  # half-way up the hill; half-way down to the sphere's centre
        towards = rng.uniform(0, 2 * np.pi, 16)
        d = np.stack([np.zeros(16), np.cos(towards), np.sin(towards)], 1)
        o = np.concatenate([level.repeat(8)[:, None], c[1:] - (r + 5) * d[:, 1:]], 1)
        t = first_hit(city, torch.from_numpy(o).float(), torch.from_numpy(d).float(), 1 << 16).t.double().numpy()
        flank = r + 5 - np.sqrt(r * r - (level[0] - c[0]) ** 2)
        assert np.abs(t[:8] - flank).max() < 1e-3 and np.isinf(t[8:]).all()


def test_farmland_is_a_patchwork_of_crops_and_roads() -> None:
    """Ground beyond the town seen from straight above: off the hedges, every point has the chromaticity of one
    crop (crop rows and soil noise only scale brightness), most crops show, and the country roads are asphalt."""
    city = build_city(PRESETS["oblique_tiny"], np.random.default_rng(0))
    rng = np.random.default_rng(2)
    yz = rng.uniform(-city.ground_half, city.ground_half, (20000, 2))
    road = city.country_road.double().numpy()  # rows (n_y, n_z, c)
    normal, along = road[:, :2], np.stack([-road[:, 1], road[:, 0]], 1)
    steps = rng.uniform(-city.ground_half, city.ground_half, (len(road), 300, 1))
    on_roads = road[:, None, 2:] * normal[:, None] + steps * along[:, None]  # (R, 300, 2) on the centre lines
    yz = np.concatenate([yz, on_roads.reshape(-1, 2)])
    yz = yz[(np.abs(yz).max(1) > city.extent + 1) & (np.abs(yz).max(1) < city.ground_half - 1)]
    o = torch.from_numpy(np.concatenate([np.full((len(yz), 1), -100.0), yz], 1)).float()
    d = torch.tensor([[1.0, 0.0, 0.0]]).expand_as(o)
    hit = first_hit(city, o, d, 1 << 16)
    rgb = albedo(city, hit, o + hit.t.unsqueeze(-1) * d).double().numpy()
    chroma = rgb / rgb.sum(1, keepdims=True)
    ground = hit.material.numpy() == GROUND
    road_distance = np.abs(yz @ road[:, :2].T - road[:, 2]).min(1)
    asphalt = np.array([0.26, 0.26, 0.28]) ** 2.2
    assert np.abs(chroma[ground & (road_distance < 1)] - asphalt / asphalt.sum()).max() < 1e-4
    assert (ground & (road_distance < 1)).sum() > 500
    crops = np.array(FIELD_CROPS) ** 2.2
    match = np.abs(chroma[:, None] - crops / crops.sum(1, keepdims=True)).max(-1) < 1e-4  # (N, crops)
    fields = ground & (road_distance > COUNTRY_ROAD_WIDTH)
    assert match[fields].any(1).mean() > 0.9  # the rest: hedges
    assert (match[fields].mean(0) > 0.05).sum() >= 5


def test_an_anti_aliased_pixel_is_the_mean_of_its_square(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    """pixel_samples 3: each pixel is the camera response of the mean linear colour of 9 float64 rays on a 3x3
    grid over its square; the depth map is still the centre ray's, equal to the same scene's with one ray."""
    one = dataclasses.replace(PRESETS["oblique_tiny"], views=10)
    monkeypatch.setitem(PRESETS, "one", one)
    monkeypatch.setitem(PRESETS, "nine", dataclasses.replace(one, pixel_samples=3))
    assert generate_city(tmp_path / "one", "one", device="cpu", progress=False)["rays_per_pixel"] == 1
    assert generate_city(tmp_path / "nine", "nine", device="cpu", progress=False)["rays_per_pixel"] == 9
    city, survey, origin, scale = plan_scene(one, seed=0)  # generate_city's default seed
    gains = survey.exposure[:, None] * survey.white_balance
    for m, point in zip(load_dataset(tmp_path / "nine").images[:3], load_dataset(tmp_path / "one").images,
                        strict=False):
        assert np.array_equal(_depth(tmp_path / "nine", m), _depth(tmp_path / "one", point))
        linear = np.zeros((m.H * m.W, 3))
        for dx in (1 / 6, 1 / 2, 5 / 6):
            for dy in (1 / 6, 1 / 2, 5 / 6):
                o, d = _camera_rays(m, dx, dy)
                rgb, _ = render(city, torch.from_numpy(o * scale + origin).float(), torch.from_numpy(d).float(),
                                budget=1 << 20)
                linear += rgb.double().numpy() / 9
        gain = torch.as_tensor(gains[survey.names.index(m.name)])
        expected = shading.camera_response(torch.from_numpy(linear), gain).numpy() * 255
        error = np.abs(_pixels(m) - expected).max(1)
        assert (error <= 0.51).mean() > 0.999  # the rest: a ray on a shape's edge, float32 against float64
        assert np.abs(_pixels(m) - _pixels(point)).mean() > 1  # a pixel-centre render differs
    assert subpixel_grid(1) == [(0.5, 0.5)] and subpixel_grid(3)[0] == (0.5, 0.5) and len(subpixel_grid(3)) == 9
    with pytest.raises(ValueError, match="odd"):
        dataclasses.replace(one, pixel_samples=2)


def test_script_makes_an_oblique_survey(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert parse_args(["--preset", "oblique", "--output", "x"]).preset == "oblique"
    s = main(["--preset", "oblique_tiny", "--output", str(tmp_path / "o"), "--no_depth", "--device", "cpu"])
    low, high = s["flight_altitudes"]
    out = capsys.readouterr().out
    assert f"flown at {low:.1f}-{high:.1f} m" in out and high - low > 10 and "a pixel one ray through its centre" in out


def test_the_demo_ends_a_failed_stage_in_one_line(tmp_path: Path) -> None:
    """A stage that fails (here the generator, given a preset it lacks) prints its own error; the demo adds one line
    naming the stage and exits 2, without a traceback of its own."""
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "demo.py"), "--output", str(tmp_path / "demo"),
                             "--preset", "nowhere"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert "invalid choice: 'nowhere'" in lines[-2] and "Traceback" not in result.stderr, result.stderr
    assert lines[-1] == ("error: the demo stopped: make_synthetic_scene.py failed with exit code 2; rerun the demo to "
                         "resume from the stages done")
