"""`mega-nerf-parscript` (mega_nerf/cli/parscript.py): a parscript job list, one training per cell."""
from mega_nerf.errors import run_command

if __name__ == "__main__":
    run_command("mega_nerf.cli.parscript")
