"""`mega-nerf-parscript` (and `scripts/make_parscript.py`): a parscript job list that trains one
submodule per cell.

    python scripts/make_parscript.py --cells 8 --output parscripts/run_8.txt
    CONFIG_FILE=... EXP_PREFIX=exp- DATASET_PATH=... CHUNK_PREFIX=scratch- MASK_PATH=masks \\
        python -m parscript.dispatcher parscripts/run_8.txt -g 8

The job lines read Mega-NeRF's environment variables (CONFIG_FILE, EXP_PREFIX, DATASET_PATH, CHUNK_PREFIX,
MASK_PATH) and TRAIN_ARGS for any further training options. The dispatcher keeps its counters beside the list
(`run_8-start.txt`, `run_8-finish.txt`); `-r` resets them.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from mega_nerf.errors import UserError, run_cli
from mega_nerf.io import atomic_write

JOB = ("python mega_nerf/train.py --config_file $CONFIG_FILE --exp_name ${{EXP_PREFIX}}{k} "
       "--dataset_path $DATASET_PATH --chunk_paths ${{CHUNK_PREFIX}}{k} --cluster_mask_path $MASK_PATH/{k} $TRAIN_ARGS")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, required=True, help="number of cells (grid_dim X * Y)")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.cells < 1:
        raise UserError(f"--cells must be positive, got {args.cells}")
    atomic_write(args.output, "".join(JOB.format(k=k) + "\n" for k in range(args.cells)).encode())
    print(f"wrote {args.cells} jobs to {args.output}")


def console() -> None:
    run_cli(main)
