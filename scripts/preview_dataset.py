"""`mega-nerf-preview` (mega_nerf/cli/preview.py): draw a dataset before training."""
from mega_nerf.cli.preview import main
from mega_nerf.errors import run_cli

if __name__ == "__main__":
    run_cli(main)
