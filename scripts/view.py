"""`mega-nerf-view` (mega_nerf/cli/view.py): a merged container in the browser."""
from mega_nerf.cli.view import main
from mega_nerf.errors import run_cli

if __name__ == "__main__":
    run_cli(main)
