"""`mega-nerf-export-cameras` (mega_nerf/cli/preview.py): the training cameras as a PLY."""
from mega_nerf.errors import run_command

if __name__ == "__main__":
    run_command("mega_nerf.cli.preview", "cameras_main")
