"""Mega-NeRF's command: `python mega_nerf/train.py ...` = `mega-nerf-train` (mega_nerf/cli/train.py)."""
from mega_nerf.cuda_context import TRAIN
from mega_nerf.errors import run_command

if __name__ == "__main__":
    run_command("mega_nerf.cli.train", cuda_context=TRAIN)
