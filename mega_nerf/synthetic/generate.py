"""Write a synthetic city as a Mega-NeRF dataset, with ground-truth depth, a config, a summary and an overview.

Output layout (besides the dataset itself, see mega_nerf.data.dataset):
    depth/<split>/<stem>.npy   float32 (H, W): distance along the unit ray through the pixel's centre to the
                               first hit, normalised units; inf for sky
    scene.json                 the summary generate_city returns
    config.yaml                dataset_path and ray_altitude_range for our entry points
    overview.png               top-down render with the camera positions and headings
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

from mega_nerf.data.dataset import write_coordinates, write_image
from mega_nerf.errors import UserError, check_device
from mega_nerf.io import atomic_open, atomic_write, write_bgr
from mega_nerf.rays import rays_from_pixels
from mega_nerf.synthetic.scene import PRESETS, City, Preset, build_city
from mega_nerf.synthetic.shading import camera_response, render
from mega_nerf.synthetic.survey import Survey, normalisation, plan_survey

ALTITUDE_MARGIN = (5.0, 2.0)  # metres the altitude range extends above the tallest shape and below the ground


def _budgets(device: torch.device) -> tuple[int, int]:
    """(rays rendered at once, ray-shape tests held at once): what keeps memory near 1 GB on CPU, 10 GB on GPU."""
    return (1 << 22, 1 << 25) if device.type == "cuda" else (1 << 18, 1 << 22)


OWNED = ("coordinates.pt", "train", "val", "depth")  # what a new generation replaces


def clear_output(output: Path) -> None:
    """Remove the dataset parts of `output` that a generation writes, whoever wrote them."""
    for name in OWNED:
        path = output / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def _prepare(output: Path) -> None:
    """Make `output` ready: clear a previous generation (marked by its scene.json), refuse a folder holding
    anything else (anyone's dataset, or other files a dataset would be mixed into)."""
    if not (output / "scene.json").exists() and output.is_dir():
        foreign = sorted(entry.name for entry in output.iterdir())
        if foreign:
            raise UserError(f"{output}: holds {', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''} not "
                            "written by generate_city; refusing to write into it (choose a new or empty --output)")
    clear_output(output)
    output.mkdir(parents=True, exist_ok=True)


def _normalised_shapes(city: City, origin: np.ndarray, scale: float) -> tuple[list[dict], list[dict], list[dict]]:
    """Buildings as {min, max} corners, trees as trunk + canopy and hills as the sphere whose cap above the
    ground they are, in normalised DRB coordinates."""
    def norm(p: torch.Tensor) -> list[float]:
        return ((p.double().numpy() - origin) / scale).tolist()

    buildings = [{"min": norm(lo), "max": norm(hi)} for lo, hi in zip(city.box_lo, city.box_hi, strict=True)]
    trees = []
    for i in range(city.tree_yz.shape[0]):
        base = torch.cat([torch.zeros(1), city.tree_yz[i]])
        top = base.clone()
        top[0] = city.trunk_top[i]
        trees.append({"trunk": {"top": norm(top), "bottom": norm(base),
                                "radius": float(city.trunk_radius[i]) / scale},
                      "canopy": {"center": norm(city.canopy_center[i]),
                                 "radius": float(city.canopy_radius[i]) / scale}})
    hills = [{"center": norm(c), "radius": float(r) / scale}
             for c, r in zip(city.hill_center, city.hill_radius, strict=True)]
    return buildings, trees, hills


def _summary(preset_name: str, seed: int, city: City, survey: Survey, origin: np.ndarray, scale: float) -> dict:
    """What scene.json holds: the preset, the survey, the normalisation and every shape in normalised units."""
    preset = PRESETS[preset_name]
    buildings, trees, hills = _normalised_shapes(city, origin, scale)
    ground = [((np.array([0.0, c, c]) - origin) / scale).tolist() for c in (-city.ground_half, city.ground_half)]
    town = [((corner - origin) / scale).tolist() for corner in city.town_box()]
    return {
        "preset": preset_name, "seed": seed,
        "train_images": survey.splits.count("train"), "val_images": survey.splits.count("val"),
        "W": preset.W, "H": preset.H, "focal": survey.focal, "rays_per_pixel": preset.pixel_samples ** 2,
        "blocks": [city.blocks, city.blocks], "num_buildings": len(buildings), "num_trees": len(trees),
        "max_height": city.max_height, "altitude": float(np.median(survey.altitudes)),  # metres
        "flight_altitudes": [float(survey.altitudes.min()), float(survey.altitudes.max())],  # metres
        "ray_altitude_range": [-(city.max_height + ALTITUDE_MARGIN[0]), ALTITUDE_MARGIN[1]],
        "origin_drb": origin.tolist(), "pose_scale_factor": scale,
        "sun_direction": city.sun.tolist(),
        "ground": {"min": ground[0], "max": ground[1]},  # the ground square, normalised; its x is the ground's
        "terrain_half": city.ground_half / scale,  # the ground square's half-width, normalised
        "town": {"min": town[0], "max": town[1]},  # the area of interest: every building and tree, normalised
        "buildings": buildings, "trees": trees, "hills": hills,
        "appearance": [{"name": n, "split": s, "exposure": float(e), "white_balance": w.tolist()}
                       for n, s, e, w in zip(survey.names, survey.splits, survey.exposure, survey.white_balance,
                                             strict=True)],
    }


@contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Render on one CPU thread: the work is many mid-sized tensor ops, which extra threads barely speed up on
    free cores and slowed 5 to 15 times on a 2-core machine whose cores were shared (measured on 'tiny')."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _render(city: City, o: torch.Tensor, d: torch.Tensor, device: torch.device
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """shading.render over chunks of rays, so that memory is bounded however many rays are asked for."""
    rays, tests = _budgets(device)
    parts = [render(city, o[i:i + rays], d[i:i + rays], tests) for i in range(0, o.shape[0], rays)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _write_view(output: Path, name: str, split: str, image: np.ndarray, depth: np.ndarray | None,
                intrinsics: torch.Tensor, c2w: torch.Tensor) -> None:
    write_image(output, split, name, image, intrinsics, c2w)
    if depth is not None:
        with atomic_open(output / "depth" / split / f"{name}.npy", depth.nbytes) as f:
            np.save(f, depth)


def subpixel_grid(samples: int) -> list[tuple[float, float]]:
    """Where in a pixel (column, row offsets in [0, 1)) the rays of a `samples` x `samples` grid pass, the centre
    first: its ray gives the depth map. `samples` is odd (Preset checks it), so that the centre is one of them."""
    grid = [((a + 0.5) / samples, (b + 0.5) / samples) for b in range(samples) for a in range(samples)]
    return sorted(grid, key=lambda o: o != (0.5, 0.5))


def _poses(preset: Preset, survey: Survey, origin: np.ndarray, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Every view's c2w (V, 3, 4) in normalised units and the intrinsics (4,), float32 as write_image stores them:
    rays made from them are exactly the loader's rays."""
    centres = torch.as_tensor((survey.positions - origin) / scale)
    c2ws = torch.cat([torch.as_tensor(survey.rotations), centres.unsqueeze(-1)], 2).float()
    return c2ws, torch.tensor([survey.focal, survey.focal, preset.W / 2, preset.H / 2])


def _shoot(city: City, preset: Preset, survey: Survey, origin: np.ndarray, scale: float, views: Sequence[int],
           offset: tuple[float, float], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear colour (N, 3) and hit distance (N,) in metres of the rays through the point `offset` (column, row
    in [0, 1)) of every pixel of `views`, row-major, view after view. `city` is on `device`."""
    c2ws, intrinsics = _poses(preset, survey, origin, scale)
    pixels = torch.arange(preset.W * preset.H, device=device)
    cols = (pixels % preset.W).float() + offset[0]
    rows = torch.div(pixels, preset.W, rounding_mode="floor").float() + offset[1]
    rays = [rays_from_pixels(c2ws[i].to(device), intrinsics.to(device), cols, rows, 0.0) for i in views]
    o = torch.cat([r[0] for r in rays]).double() * scale + torch.as_tensor(origin, device=device)  # metres
    return _render(city, o.float(), torch.cat([r[1] for r in rays]), device)


def render_pixels(city: City, preset: Preset, survey: Survey, origin: np.ndarray, scale: float,
                  views: Sequence[int], samples: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear colour (N, 3) of every pixel of `views`, the mean of a `samples` x `samples` grid of rays over its
    square (odd `samples`; 1: the ray through its centre), and the hit distance (N,) in metres of the centre's
    ray. `city` is on `device`."""
    offsets = subpixel_grid(samples)
    rgb, t = _shoot(city, preset, survey, origin, scale, views, offsets[0], device)
    for offset in offsets[1:]:
        rgb = rgb + _shoot(city, preset, survey, origin, scale, views, offset, device)[0]
    return rgb / len(offsets), t


def _render_views(output: Path, preset: Preset, city: City, survey: Survey, origin: np.ndarray, scale: float,
                  write_depth: bool, device: torch.device, progress: bool) -> None:
    """Render every view (with `preset.pixel_samples` > 1, a pixel is the mean of a grid of rays over its square
    in linear light, as a sensor integrates); write image, metadata and depth on worker threads (PNG encoding
    costs more than rendering), one batch of views behind the renderer."""
    W, H = preset.W, preset.H
    c2ws, intrinsics = _poses(preset, survey, origin, scale)
    gains = survey.gains(device)
    per_batch = max(1, _budgets(device)[0] // (W * H))
    bar = tqdm(total=len(survey.names), desc="rendering", unit="view", disable=not progress)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        writing: list[Future] = []
        for start in range(0, len(survey.names), per_batch):
            views = range(start, min(len(survey.names), start + per_batch))
            rgb, t = render_pixels(city, preset, survey, origin, scale, views, preset.pixel_samples, device)
            gain = gains[start:start + len(views), None, None]  # (V, 1, 1, 3)
            images = camera_response(rgb.view(len(views), H, W, 3), gain).mul(255).round().byte().cpu().numpy()
            depths = (t / scale).view(len(views), H, W).cpu().numpy()
            for job in writing:  # holds at most one batch of views in memory besides this one
                job.result()
                bar.update()
            writing = [pool.submit(_write_view, output, survey.names[i], survey.splits[i], images[k],
                                   depths[k] if write_depth else None, intrinsics, c2ws[i])
                       for k, i in enumerate(views)]
        for job in writing:
            job.result()
            bar.update()
    bar.close()


def _overview(output: Path, preset: Preset, city: City, survey: Survey, device: torch.device) -> None:
    """A top-down orthographic render of the ground square (rows along z, columns along y), with the flight
    path, each camera (red: train, yellow: val) and a stroke along its heading."""
    size, half = preset.overview_size, city.ground_half
    px = 2 * half / size  # metres per pixel
    coords = (torch.arange(size, device=device) + 0.5) * px - half
    z, y = torch.meshgrid(coords, coords, indexing="ij")
    o = torch.stack([torch.full_like(y, -city.max_height - 10), y, z], -1).view(-1, 3)
    d = torch.tensor([1.0, 0.0, 0.0], device=device).expand_as(o)
    rgb, _ = _render(city.to(device), o, d, device)
    image = camera_response(rgb, torch.ones(3, device=device)).mul(255).round().byte()
    image = np.ascontiguousarray(image.view(size, size, 3).cpu().numpy()[:, :, ::-1])  # BGR for OpenCV

    def pixel(yz: np.ndarray) -> tuple[int, int]:
        return int(round((yz[0] + half) / px)), int(round((yz[1] + half) / px))

    path = np.array([pixel(p[1:]) for p in survey.positions], np.int32)
    cv2.polylines(image, [path], False, (255, 255, 255), 1, cv2.LINE_AA)
    stroke = 0.04 * size * px  # metres
    for position, rotation, split in zip(survey.positions, survey.rotations, survey.splits, strict=True):
        heading = -rotation[1:, 2] / np.linalg.norm(rotation[1:, 2])  # forward = -back, horizontal part
        colour = (0, 0, 255) if split == "train" else (0, 255, 255)
        cv2.line(image, pixel(position[1:]), pixel(position[1:] + stroke * heading), colour, 1, cv2.LINE_AA)
        cv2.circle(image, pixel(position[1:]), max(2, size // 200), colour, -1, cv2.LINE_AA)
    write_bgr(output / "overview.png", image)


def plan_scene(preset: Preset, seed: int) -> tuple[City, Survey, np.ndarray, float]:
    """The city, its survey and the normalisation (origin in metres, metres per unit) that `seed` draws."""
    rng = np.random.default_rng(seed)
    city = build_city(preset, rng)
    survey = plan_survey(city, preset, rng)
    return city, survey, *normalisation(city, survey, preset)


def generate_city(output: Path | str, preset: str = "tiny", seed: int = 0, device: str | None = None,
                  write_depth: bool = True, progress: bool = True) -> dict:
    """Generate the synthetic city `preset` with `seed` into `output` and return its summary (also written to
    `output/scene.json`). The same preset and seed give byte-identical files on the same device type (but for
    the path in config.yaml). A folder that a previous generation wrote is replaced; anyone else's dataset is
    refused with a UserError."""
    if preset not in PRESETS:
        raise UserError(f"unknown synthetic preset '{preset}' (choose from {', '.join(PRESETS)})")
    if device is not None:
        check_device(device)
    output = Path(output).absolute()
    _prepare(output)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    city, survey, origin, scale = plan_scene(PRESETS[preset], seed)
    summary = _summary(preset, seed, city, survey, origin, scale)
    atomic_write(output / "scene.json", (json.dumps(summary, indent=1) + "\n").encode())  # first: marks the folder ours
    with _one_cpu_thread(dev):
        _render_views(output, PRESETS[preset], city.to(dev), survey, origin, scale, write_depth, dev, progress)
        _overview(output, PRESETS[preset], city, survey, dev)
    atomic_write(output / "config.yaml", (
        f"# The synthetic city '{preset}' (seed {seed}), written by mega_nerf.synthetic.generate_city\n"
        f"dataset_path: {json.dumps(str(output))}\n"
        f"ray_altitude_range: {json.dumps(summary['ray_altitude_range'])}\n"
        "val_scale_factor: 1  # small images, evaluated at full scale (Mega-NeRF's default is 4)\n").encode())
    write_coordinates(output, torch.as_tensor(origin), scale)  # last: a killed run leaves no loadable dataset
    return summary
