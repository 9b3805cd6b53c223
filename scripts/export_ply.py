"""`mega-nerf-export` (mega_nerf/cli/export.py): the merged model as a coloured point cloud."""
from mega_nerf.errors import run_command

if __name__ == "__main__":
    run_command("mega_nerf.cli.export")
