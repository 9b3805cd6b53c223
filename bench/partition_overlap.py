"""How many cells a ray lies in on a synthetic preset (the partition's overlap factor): as the exact rule gives it,
and with each ray's far bound at its true depth times `--slack`, which is what a partition that knew where rays stop
could reach. Sky rays (no depth) and the others are counted apart. Deterministic; the partition and the counts run
on one device (a GPU's kernel and the CPU's rule may differ on a ray that grazes a cell's edge).

    python bench/partition_overlap.py --preset street --size 100 75 --grid_dim 4 4 --work W

`--size` renders the preset's city, survey and lenses at fewer pixels (the overlap hardly depends on them); the
partition itself comes from create_cluster_masks.py, whose overlap factor the plain count must equal.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PARTITION, partition_args  # noqa: E402

from mega_nerf.bounds import box_exit, contracted_axes  # noqa: E402
from mega_nerf.data.dataset import load_dataset  # noqa: E402
from mega_nerf.partition.cells import CPU_DIST_CHUNK, exact_ray_membership, load_params  # noqa: E402
from mega_nerf.rays import image_rays, near_far  # noqa: E402
from mega_nerf.synthetic import PRESETS, generate_city  # noqa: E402


def ensure_scene(preset: str, size: tuple[int, int] | None, work: Path) -> Path:
    """The preset (at `size` pixels, as a preset of its own name) generated once under `work`, with depth."""
    name = preset if size is None else f"{preset}@{size[0]}x{size[1]}"
    if size is not None:
        PRESETS[name] = dataclasses.replace(PRESETS[preset], W=size[0], H=size[1])
    path = work / f"{name}-data"
    if not (path / "coordinates.pt").exists():
        generate_city(path, preset=name, write_depth=True, progress=False)
    return path


def overlaps(dataset: Path, masks: Path, slack: float, device: torch.device) -> dict[str, float]:
    """Cells per ray: every ray as partitioned, every ray with its far bound at its true depth x `slack`, and
    the latter for sky rays and the others apart; with the share of sky rays."""
    params = load_params(masks / "params.pt")
    lo, hi = params.foreground()  # create_cluster_masks.py always records one (older params.pt files lack it)
    box = (lo.to(device), hi.to(device), torch.tensor(contracted_axes(params.ray_altitude_range), device=device))
    centroids = params.centroids.to(device)
    rule = (centroids, params.boundary_margin, params.cluster_2d, CPU_DIST_CHUNK, box)
    plain = capped = sky = sky_cells = rays = 0
    for image in tqdm(load_dataset(dataset).images, desc="images", unit="image"):
        o, d = image_rays(image.c2w.to(device), image.intrinsics, image.W, image.H)
        near, far = near_far(o, d, params.near, params.far, params.ray_altitude_range)
        depth = torch.from_numpy(np.load(dataset / "depth" / image.split / f"{image.name}.npy")).to(far).flatten()
        counts = []
        for f in (far, torch.minimum(far, depth * slack).clamp_min(near)):
            split = torch.minimum(f, box_exit(o, d, lo.to(device), hi.to(device))).clamp_min(near)
            counts.append(exact_ray_membership(o, d, near, split, f, *rule).sum(1))
        open_sky = torch.isinf(depth)
        plain, capped = plain + int(counts[0].sum()), capped + int(counts[1].sum())
        sky, sky_cells, rays = sky + int(open_sky.sum()), sky_cells + int(counts[1][open_sky].sum()), rays + o.shape[0]
    return {"rays": rays, "sky_share": sky / rays, "plain": plain / rays, "capped": capped / rays,
            "capped_sky": sky_cells / max(sky, 1), "capped_others": (capped - sky_cells) / max(rays - sky, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="street", choices=sorted(PRESETS))
    p.add_argument("--size", type=int, nargs=2, metavar=("W", "H"),
                   help="render at these pixels (default: the preset's)")
    p.add_argument("--grid_dim", type=int, nargs=2, default=[2, 2])
    p.add_argument("--slack", type=float, default=1.1, help="far bound = true depth x this")
    p.add_argument("--work", type=Path, required=True)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dataset = ensure_scene(args.preset, args.size, args.work)
    masks = args.work / f"{dataset.name}-masks-{args.grid_dim[0]}x{args.grid_dim[1]}"
    if not (masks / "params.pt").exists():
        subprocess.run([sys.executable, str(PARTITION), *partition_args(dataset, masks, args.grid_dim)], check=True)
    result = overlaps(dataset, masks, args.slack, device)
    reported = json.loads((masks / "partition.json").read_text())["overlap_factor"]
    if abs(result["plain"] - reported) > 1e-9:
        raise SystemExit(f"the plain count {result['plain']:.6f} differs from the partition's {reported:.6f}")
    print(f"{dataset.name}, {args.grid_dim[0]}x{args.grid_dim[1]} cells: {result['rays']:,} rays, "
          f"{result['sky_share']:.1%} sky; cells per ray {result['plain']:.3f} as partitioned, "
          f"{result['capped']:.3f} with far at depth x{args.slack} (sky rays {result['capped_sky']:.3f}, "
          f"others {result['capped_others']:.3f})")


if __name__ == "__main__":
    main()
