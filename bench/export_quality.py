"""How close an exported point cloud lies to a synthetic city's true surfaces: export the merged container as
`scripts/export_ply.py` does (its defaults), then, for each --min_views K, count the points over the city within
each tolerance of the ground truth (the city's depth maps: generate it with write_depth=True).

    python bench/export_quality.py --container_path merged.pt --dataset_path city-data [--tolerances_m 2.4 5 10]
        [--min_views 0 3 5 10]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_results  # noqa: E402

from mega_nerf.cli.export import export_parser  # noqa: E402
from mega_nerf.data.dataset import load_coordinates, load_dataset  # noqa: E402
from mega_nerf.export import count_views, export_box, export_points  # noqa: E402
from mega_nerf.merging.container import load_container  # noqa: E402
from mega_nerf.rays import Cameras  # noqa: E402
from mega_nerf.synthetic.surface import surface_distances  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--container_path", type=Path, required=True)
    p.add_argument("--dataset_path", type=Path, required=True)
    p.add_argument("--tolerances_m", type=float, nargs="+", default=[2.4, 5.0, 10.0], help="metres")
    p.add_argument("--min_views", type=int, nargs="+", default=[0, 3, 5, 10])
    p.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    args = p.parse_args()
    defaults = export_parser().parse_args(["--container_path", "-", "--output", "-"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    container, info = load_container(args.container_path, device)
    box_min, box_max = export_box(container, info.altitude_range)
    xyz = export_points(container, box_min, box_max, defaults.resolution, defaults.density_threshold,
                        defaults.layers, defaults.appearance, defaults.chunk)[0]
    views = count_views(torch.from_numpy(xyz).to(device), Cameras.from_dataset(load_dataset(args.dataset_path)),
                        info.far).cpu().numpy()
    over_city = (np.abs(xyz[:, 1]) < 0.95) & (np.abs(xyz[:, 2]) < 0.95)  # the ground ends at |y|, |z| = 1
    scale = load_coordinates(args.dataset_path).pose_scale_factor
    distance = surface_distances(xyz[over_city].astype(np.float64), args.dataset_path) * scale  # metres
    rows = []
    for k in args.min_views:
        kept = distance[views[over_city] >= k]
        rows.append(f"| {k} | {int((views >= k).sum()):,} | {len(kept):,} | "
                    + " | ".join(f"{100 * np.mean(kept <= t):.1f}%" for t in args.tolerances_m) + " |")
    table = ("| --min_views | points | over the city | " + " | ".join(f"within {t:g} m" for t in args.tolerances_m)
             + " |\n" + "|---" * (3 + len(args.tolerances_m)) + "|\n" + "\n".join(rows))
    append_results(args.results, "Exported point cloud vs the true surfaces", "python " + " ".join(sys.argv), table)


if __name__ == "__main__":
    main()
