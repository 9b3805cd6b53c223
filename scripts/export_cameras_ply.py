"""`mega-nerf-export-cameras` (mega_nerf/cli/preview.py): the training cameras as a PLY."""
from mega_nerf.cli.preview import cameras_main
from mega_nerf.errors import run_cli

if __name__ == "__main__":
    run_cli(cameras_main)
