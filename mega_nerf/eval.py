"""Mega-NeRF's command: `python mega_nerf/eval.py ...` = `mega-nerf-eval` (mega_nerf/cli/eval.py).

Distributed: `python -m torch.distributed.run --standalone --nproc_per_node N mega_nerf/eval.py ...`
"""
from mega_nerf.errors import run_command

if __name__ == "__main__":
    run_command("mega_nerf.cli.eval")
