"""`mega-nerf-parscript` (and `scripts/make_parscript.py`): a parscript job list that trains one
submodule per cell.

    python scripts/make_parscript.py --cells 8 --output parscripts/run_8.txt [--mask_path masks]
    CONFIG_FILE=... EXP_PREFIX=exp- DATASET_PATH=... CHUNK_PREFIX=scratch- MASK_PATH=masks \\
        python -m parscript.dispatcher parscripts/run_8.txt -g 8

The job lines read Mega-NeRF's environment variables (CONFIG_FILE, EXP_PREFIX, DATASET_PATH, CHUNK_PREFIX,
MASK_PATH) and TRAIN_ARGS for any further training options. Each dispatcher worker takes the next line when its
GPU is free; with --mask_path the lines go largest cell first (as train_cells hands cells out), so that the
longest runs start first and no GPU is left alone with a large cell at the end. The dispatcher keeps its counters
beside the list (`run_8-start.txt`, `run_8-finish.txt`); `-r` resets them.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from mega_nerf.cli.options import HelpFormatter
from mega_nerf.errors import UserError, run_cli
from mega_nerf.io import atomic_write
from mega_nerf.training.all_cells import cell_sizes, largest_first

JOB = ("python mega_nerf/train.py --config_file $CONFIG_FILE --exp_name ${{EXP_PREFIX}}{k} "
       "--dataset_path $DATASET_PATH --chunk_paths ${{CHUNK_PREFIX}}{k} --cluster_mask_path $MASK_PATH/{k} $TRAIN_ARGS")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--cells", type=int, required=True, help="number of cells (grid_dim X * Y)")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--mask_path", type=Path, default=None,
                        help="the partition's mask directory: order the jobs largest cell first (default: by cell)")
    args = parser.parse_args(argv)
    if args.cells < 1:
        raise UserError(f"--cells must be positive, got {args.cells}")
    order = list(range(args.cells))
    if args.mask_path is not None:
        sizes = cell_sizes(args.mask_path)
        if len(sizes) != args.cells:
            raise UserError(f"--mask_path: {args.mask_path} holds {len(sizes)} cells, not --cells {args.cells}")
        order = largest_first(sizes)
    atomic_write(args.output, "".join(JOB.format(k=k) + "\n" for k in order).encode())
    print(f"wrote {args.cells} jobs to {args.output}" + (f", cells {order} (largest first)" if args.mask_path else ""))


def console() -> None:
    run_cli(main)
