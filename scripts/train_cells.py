"""`mega-nerf-train-cells` (mega_nerf/cli/train_cells.py): train every cell of a partition, on one GPU or across
the GPUs of several machines under torch.distributed.run."""
from mega_nerf.cuda_context import TRAIN_CELLS
from mega_nerf.errors import run_command

if __name__ == "__main__":
    run_command("mega_nerf.cli.train_cells", cuda_context=TRAIN_CELLS)
