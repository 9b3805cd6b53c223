"""`mega-nerf-render` (mega_nerf/cli/render.py): render a camera path through a container."""
from mega_nerf.cli.render import main
from mega_nerf.errors import run_cli

if __name__ == "__main__":
    run_cli(main)
