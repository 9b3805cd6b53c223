"""`mega-nerf-transforms` (mega_nerf/cli/convert.py): a transforms.json to Mega-NeRF's layout."""
from mega_nerf.errors import run_command

if __name__ == "__main__":
    run_command("mega_nerf.cli.convert", "transforms_main")
