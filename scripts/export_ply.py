"""Export a merged container as a coloured point cloud (PLY) of the surfaces seen from above.

    python scripts/export_ply.py --container_path merged.pt --output scene.ply [--resolution R] \
        [--max_points N] [--density_threshold T] [--real_units --dataset_path DATA]
"""
from __future__ import annotations

from mega_nerf.errors import run_cli
from mega_nerf.export import main

if __name__ == "__main__":
    run_cli(main)
