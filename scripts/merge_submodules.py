"""Merge trained submodules into one container file.

python scripts/merge_submodules.py --config_file CFG --ckpt_prefix exp- --centroid_path masks/params.pt \
    --output merged.pt [--allow_empty_cells]
"""
from __future__ import annotations

from mega_nerf.errors import run_cli
from mega_nerf.merging.merge import main

if __name__ == "__main__":
    run_cli(main)
