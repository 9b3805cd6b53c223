"""`mega-nerf-preview` (mega_nerf/cli/preview.py): draw a dataset before training."""
from mega_nerf.errors import run_command

if __name__ == "__main__":
    run_command("mega_nerf.cli.preview")
