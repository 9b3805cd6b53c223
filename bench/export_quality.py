"""How close an exported point cloud lies to a synthetic city's true surfaces: export the merged container
(`scripts/export_ply.py` defaults) and count the points over the city within a tolerance of the ground truth
(the city's depth maps: generate it with write_depth=True).

    python bench/export_quality.py --container_path merged.pt --dataset_path city-data [--tolerances_m 2.4 5 10]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from plyfile import PlyData

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_results  # noqa: E402

from mega_nerf.data.dataset import load_coordinates  # noqa: E402
from mega_nerf.export import main as export_main  # noqa: E402
from mega_nerf.synthetic.surface import near_surface_fractions  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--container_path", type=Path, required=True)
    p.add_argument("--dataset_path", type=Path, required=True)
    p.add_argument("--output", type=Path, default=Path("export_quality.ply"))
    p.add_argument("--tolerances_m", type=float, nargs="+", default=[2.4, 5.0, 10.0], help="metres")
    p.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    args = p.parse_args()
    export_main(["--container_path", str(args.container_path), "--output", str(args.output)])
    vertex = PlyData.read(str(args.output))["vertex"]
    xyz = np.stack([vertex["x"], vertex["y"], vertex["z"]], -1).astype(np.float64)
    over_city = xyz[(np.abs(xyz[:, 1]) < 0.95) & (np.abs(xyz[:, 2]) < 0.95)]  # the ground ends at |y|, |z| = 1
    scale = load_coordinates(args.dataset_path).pose_scale_factor
    within = near_surface_fractions(over_city, args.dataset_path, [t / scale for t in args.tolerances_m])
    table = ("| points | over the city | " + " | ".join(f"within {t:g} m" for t in args.tolerances_m) + " |\n"
             + "|---" * (2 + len(within)) + "|\n"
             f"| {len(xyz):,} | {len(over_city):,} | " + " | ".join(f"{100 * f:.1f}%" for f in within) + " |")
    append_results(args.results, "Exported point cloud vs the true surfaces", "python " + " ".join(sys.argv), table)


if __name__ == "__main__":
    main()
