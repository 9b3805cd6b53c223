"""Entry point: evaluate a merged container. `python mega_nerf/eval.py --config_file CFG --container_path C ...`

Distributed: `python -m torch.distributed.run --standalone --nproc_per_node N mega_nerf/eval.py ...`
"""
from mega_nerf.errors import run_cli
from mega_nerf.evaluation.evaluate import main

if __name__ == "__main__":
    run_cli(main)
