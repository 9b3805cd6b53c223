"""`mega-nerf-export` (mega_nerf/cli/export.py): the merged model as a coloured point cloud."""
from mega_nerf.cli.export import main
from mega_nerf.errors import run_cli

if __name__ == "__main__":
    run_cli(main)
