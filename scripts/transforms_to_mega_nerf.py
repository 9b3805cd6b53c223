"""`mega-nerf-transforms` (mega_nerf/cli/convert.py): a transforms.json to Mega-NeRF's layout."""
from mega_nerf.cli.convert import transforms_main
from mega_nerf.errors import run_cli

if __name__ == "__main__":
    run_cli(transforms_main)
