"""Entry point: train one submodule. `python mega_nerf/train.py --config_file CFG --exp_name E ...`"""
from mega_nerf.errors import run_cli
from mega_nerf.training.trainer import main

if __name__ == "__main__":
    run_cli(main)
