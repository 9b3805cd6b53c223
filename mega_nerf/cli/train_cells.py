"""`mega-nerf-train-cells` (and `scripts/train_cells.py`): train every cell of a partition, one cell per rank at
a time, largest first, on one machine or many.

    python scripts/train_cells.py --config_file CFG --dataset_path D --mask_path M --exp_prefix exp- \\
        --chunk_prefix scratch- [train.py's options]
    python -m torch.distributed.run --standalone --nproc_per_node 8 scripts/train_cells.py ...   # one host
    python -m torch.distributed.run --nnodes 4 --nproc_per_node 8 --rdzv_backend c10d \\
        --rdzv_endpoint HOST:29400 --rdzv_id JOB scripts/train_cells.py ...                     # every host

Rerunning the same command resumes every unfinished cell from its checkpoints (mega_nerf.training.all_cells).
"""
from __future__ import annotations

from pathlib import Path

import configargparse

from mega_nerf.cli.merge import check_merge_output
from mega_nerf.cli.options import base_parser, record_options, require
from mega_nerf.cli.train import add_training_options, train_config
from mega_nerf.errors import UserError
from mega_nerf.lock import Held, locked
from mega_nerf.merging.merge import merge_submodules
from mega_nerf.training.all_cells import CellsConfig, CellStepHook, train_cells


def train_cells_parser() -> configargparse.ArgParser:
    p = base_parser("Train every cell of a partition (one submodule per cell) across the ranks of a "
                    "torch.distributed.run job, or in one process; rerun to resume.")
    p.add_argument("--mask_path", type=str, help="the partition's mask directory (params.pt, <k>/)")
    p.add_argument("--exp_prefix", type=str,
                   help="cell k's experiment directory is <prefix><k> (merge_submodules.py's --ckpt_prefix)")
    p.add_argument("--chunk_prefix", type=str, nargs="+", default=None,
                   help="cell k's ray chunks go to <prefix><k>, for each prefix given (may be node-local scratch)")
    p.add_argument("--timeout_minutes", type=float, default=10,
                   help="how long a rank waits for a silent rank before the job fails")
    p.add_argument("--merge_output", type=str, default=None,
                   help="once every cell is trained, merge them into this container file")
    add_training_options(p)
    return p


def cells_config(args: configargparse.Namespace) -> CellsConfig:
    """The options as a CellsConfig (one-line errors for missing or contradictory ones)."""
    require(args.mask_path, "mask_path")
    require(args.exp_prefix, "exp_prefix")
    if args.data_mode == "disk" and not args.chunk_prefix:
        raise UserError("missing option --chunk_prefix (or pass --data_mode memory)")
    if args.timeout_minutes <= 0:
        raise UserError(f"--timeout_minutes must be positive, got {args.timeout_minutes}")
    if not Path(args.mask_path).is_dir():
        raise UserError(f"--mask_path: {args.mask_path} is not a directory")
    masks = Path(args.mask_path).resolve()
    prefixes = [("--exp_prefix", args.exp_prefix)] + [("--chunk_prefix", c) for c in args.chunk_prefix or ()]
    for option, prefix in prefixes:
        if Path(f"{prefix}0").resolve().is_relative_to(masks):  # `<masks>/` made cell k's run folder its masks'
            raise UserError(f"{option} {prefix}: inside the partition's folder {args.mask_path}; give the cells' "
                            "runs a folder of their own")
    train = train_config(args, exp_name=args.exp_prefix)  # each cell's directories are set per cell
    return CellsConfig(train, args.mask_path, args.exp_prefix, tuple(args.chunk_prefix or ()), args.timeout_minutes,
                       args.device)


def main(argv: list[str] | None = None, on_step: CellStepHook | None = None) -> None:
    """The command; `on_step` (cell, step) is the trainer's test hook (tests/stage_worker.py)."""
    args = train_cells_parser().parse_args(argv)
    config = cells_config(args)

    def check_merge() -> None:
        check_merge_output(args.merge_output, "--merge_output", config.exp_prefix, config.mask_path, args.config_file,
                           args.dataset_path)
    if args.merge_output:
        check_merge()  # now, not after every cell has trained
    outcomes = train_cells(config, on_step, on_ready=lambda cell: record_options(cell, Path(cell.exp_name)))
    if outcomes is not None and args.merge_output:  # rank 0, every cell trained
        check_merge()  # again: the cells' files are there now
        try:
            with locked({"--merge_output": [args.merge_output]}, folders=False):
                merge_submodules(config.exp_prefix, Path(config.mask_path) / "params.pt", Path(args.merge_output),
                                 False, args.boundary_margin)
        except Held as e:  # another job on these prefixes, merging the same cells
            print(f"note: not merged here: {e}")
