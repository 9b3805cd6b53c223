"""`mega-nerf-colmap` (mega_nerf/cli/convert.py): a COLMAP model to Mega-NeRF's layout."""
from mega_nerf.cli.convert import colmap_main
from mega_nerf.errors import run_cli

if __name__ == "__main__":
    run_cli(colmap_main)
