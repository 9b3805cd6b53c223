"""A stage (partition, eval or cells) run as its command runs it, with a test hook that fails part-way: used by
the tests (conftest.launch) and by bench/multi_gpu.py's failing-rank runs.

    python tests/stage_worker.py STAGE RANK KIND TRIGGER [the stage's options]

RANK: the rank that fails (-1: any); KIND: none, exit (dies as kill -9 would), user (a UserError) or crash (a
RuntimeError); TRIGGER: comma-separated, the last numbers the hook is called with (images done; or cell, step).
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable

from mega_nerf.errors import UserError, run_cli


def make_hook(rank: int, kind: str, trigger: list[int]) -> Callable[..., None] | None:
    """The hook the stage calls with its counts; it fails on `rank` once the counts end with `trigger`."""
    if kind == "none":
        return None

    def hook(*counts: int) -> None:
        if rank in (-1, int(os.environ["RANK"])) and list(counts[-len(trigger):]) == trigger:
            if kind == "exit":
                os._exit(3)  # as kill -9 would
            raise (UserError if kind == "user" else RuntimeError)("fails on purpose (test hook)")
    return hook


def main() -> None:
    stage, rank, kind, trigger, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5:]
    hook = make_hook(rank, kind, [int(n) for n in trigger.split(",")])
    if stage == "partition":
        from mega_nerf.cli.partition import mask_job, partition_parser
        from mega_nerf.partition.job import create_cluster_masks
        create_cluster_masks(mask_job(partition_parser().parse_args(argv)), on_image=hook)
    elif stage == "eval":
        from mega_nerf.cli.eval import config_from_argv
        from mega_nerf.evaluation.evaluate import evaluate
        evaluate(config_from_argv(argv), on_image=hook)
    else:
        from mega_nerf.cli.train_cells import main as train_cells
        train_cells(argv, on_step=hook)


if __name__ == "__main__":
    run_cli(main)
