"""Mega-NeRF's command: `python mega_nerf/eval.py ...` = `mega-nerf-eval` (mega_nerf/cli/eval.py).

Distributed: `python -m torch.distributed.run --standalone --nproc_per_node N mega_nerf/eval.py ...`
"""
from mega_nerf.cli.eval import main
from mega_nerf.errors import run_cli

if __name__ == "__main__":
    run_cli(main)
