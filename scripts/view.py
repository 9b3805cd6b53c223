"""`mega-nerf-view` (mega_nerf/cli/view.py): a merged container in the browser."""
from mega_nerf.errors import run_command

if __name__ == "__main__":
    run_command("mega_nerf.cli.view")
