"""`mega-nerf-render` (mega_nerf/cli/render.py): render a camera path through a container."""
from mega_nerf.errors import run_command

if __name__ == "__main__":
    run_command("mega_nerf.cli.render")
