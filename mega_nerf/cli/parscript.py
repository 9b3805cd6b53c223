"""`mega-nerf-parscript` (and `scripts/make_parscript.py`): a parscript job list that trains one
submodule per cell.

    python scripts/make_parscript.py --cells 8 --output parscripts/run_8.txt [--mask_path masks]
    CONFIG_FILE=... EXP_PREFIX=exp- DATASET_PATH=... CHUNK_PREFIX=scratch- MASK_PATH=masks \\
        python -m parscript.dispatcher parscripts/run_8.txt -g 8

The job lines read Mega-NeRF's environment variables (CONFIG_FILE, EXP_PREFIX, DATASET_PATH, CHUNK_PREFIX,
MASK_PATH), each quoted (a path may hold a space) and required: the dispatcher runs a line with sh, which ends it
before python starts when one is unset or empty, with one line naming it (`sh: 1: EXP_PREFIX: set EXP_PREFIX to
...`). TRAIN_ARGS, unquoted and optional, holds any further training options. Each dispatcher worker takes the next
line when its GPU is free; with --mask_path the lines go largest cell first (as train_cells hands cells out), so
that the longest runs start first and no GPU is left alone with a large cell at the end. The dispatcher keeps its
counters beside the list (`run_8-start.txt`, `run_8-finish.txt`); `-r` resets them.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

from mega_nerf.cli.options import HelpFormatter
from mega_nerf.data.dataset import check_file_not_in_dataset
from mega_nerf.errors import UserError
from mega_nerf.io import atomic_write, check_output
from mega_nerf.training.all_cells import cell_sizes, largest_first

# A job line, cell {k}. The messages hold no quote character: bash would take one inside "${...}" as the start of
# a quoted string.
JOB = ('python mega_nerf/train.py'
       ' --config_file "${{CONFIG_FILE:?set CONFIG_FILE to the config file of every cell}}"'
       ' --exp_name "${{EXP_PREFIX:?set EXP_PREFIX to the prefix of the experiment folders}}{k}"'
       ' --dataset_path "${{DATASET_PATH:?set DATASET_PATH to the dataset folder}}"'
       ' --chunk_paths "${{CHUNK_PREFIX:?set CHUNK_PREFIX to the prefix of the chunk folders}}{k}"'
       ' --cluster_mask_path "${{MASK_PATH:?set MASK_PATH to the folder of the partition masks}}/{k}"'
       ' $TRAIN_ARGS')
# The lines of earlier versions, unquoted: a list of them may be replaced too.
OLD_JOB = ("python mega_nerf/train.py --config_file $CONFIG_FILE --exp_name ${{EXP_PREFIX}}{k} "
           "--dataset_path $DATASET_PATH --chunk_paths ${{CHUNK_PREFIX}}{k} --cluster_mask_path $MASK_PATH/{k} "
           "$TRAIN_ARGS")
JOB_LINES = tuple(re.compile(re.escape(job.format(k="\0")).replace("\0", r"\d+")) for job in (JOB, OLD_JOB))
# No grid anyone trains has more cells: 10,000 is a 100 x 100 grid, whose partition already needs 5.6 GB for one
# ray (partition.cells.EXACT_PAIR_TENSORS (K, K) float64 tensors) and means 10,000 models to train; 100,000,000
# cells would be a 47 GB list (about 470 bytes a line).
MAX_CELLS = 10_000


def is_job_list(path: Path) -> bool:
    """Whether `path` is a readable, non-empty text file whose every line is one of our job lines, all of one
    format (what `main` writes, or wrote before its variables were quoted); read line by line, stopping at the
    first that is not."""
    try:
        with open(path, encoding="utf-8") as f:
            first = f.readline().rstrip("\n")
            kind = next((job for job in JOB_LINES if job.fullmatch(first)), None)
            if kind is None:  # not a job line of ours, or an empty file
                return False
            return all(kind.fullmatch(line.rstrip("\n")) for line in f)
    except (OSError, UnicodeDecodeError):  # unreadable or not text: not known to be one
        return False


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--cells", type=int, required=True, help="number of cells (grid_dim X * Y)")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--mask_path", type=Path, default=None,
                        help="the partition's mask directory: order the jobs largest cell first (default: by cell)")
    args = parser.parse_args(argv)
    if not 1 <= args.cells <= MAX_CELLS:
        raise UserError(f"--cells must be between 1 and {MAX_CELLS:,} (a 100 x 100 grid), got {args.cells:,}")
    check_output(args.output, "--output", {"--mask_path": [args.mask_path]}, "a job list of this command's",
                 is_job_list)
    check_file_not_in_dataset(args.output, "--output")
    order = list(range(args.cells))
    if args.mask_path is not None:
        sizes = cell_sizes(args.mask_path)
        if len(sizes) != args.cells:
            raise UserError(f"--mask_path: {args.mask_path} holds {len(sizes)} cells, not --cells {args.cells}")
        order = largest_first(sizes)
    atomic_write(args.output, "".join(JOB.format(k=k) + "\n" for k in order).encode())
    print(f"wrote {args.cells} jobs to {args.output}" + (f", cells {order} (largest first)" if args.mask_path else ""))
