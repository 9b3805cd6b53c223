"""Mega-NeRF's command name for `mega-nerf-merge` (mega_nerf/cli/merge.py): one container from the submodules."""
from mega_nerf.errors import run_command

if __name__ == "__main__":
    run_command("mega_nerf.cli.merge")
