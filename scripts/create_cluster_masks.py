"""Mega-NeRF's command name for `mega-nerf-partition` (mega_nerf/cli/partition.py): one mask per image per cell.

One process:   python scripts/create_cluster_masks.py --config_file CFG --dataset_path D --output M --grid_dim 2 2
Several GPUs:  python -m torch.distributed.run --standalone --nproc_per_node 8 scripts/create_cluster_masks.py ...
"""
from mega_nerf.cuda_context import PARTITION
from mega_nerf.errors import run_command

if __name__ == "__main__":
    run_command("mega_nerf.cli.partition", cuda_context=PARTITION)
