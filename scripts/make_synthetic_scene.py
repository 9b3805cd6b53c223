#!/usr/bin/env python3
"""Generate the synthetic city as a Mega-NeRF dataset (with ground-truth depth, a config and an overview).

    python scripts/make_synthetic_scene.py --preset small --output out/small [--seed 0] [--no_depth] [--overwrite]
"""
from mega_nerf.errors import run_command

if __name__ == "__main__":
    run_command("mega_nerf.cli.synthetic")
