"""`mega-nerf-launch`: torch.distributed.run (torchrun) with its options, whose failure reads as one line.

    mega-nerf-launch --standalone --nproc_per_node 2 scripts/create_cluster_masks.py --config_file ...
    mega-nerf-launch --nnodes 4 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \\
        scripts/train_cells.py ...

When a rank fails, our commands print its error in one line (`error: ...`) and end every rank. torchrun then adds
its launcher's traceback and a block per rank; here that becomes one line naming the first failing rank and its
exit code, and the exit code is 1. Everything else is torchrun's own (the ranks, the rendezvous, the environment).
"""
from __future__ import annotations

import logging
import os
import sys

from mega_nerf.cli.options import HelpFormatter


def main(argv: list[str] | None = None) -> None:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import determine_local_world_size, get_args_parser, run

    parser = get_args_parser()
    parser.description, parser.formatter_class = __doc__, HelpFormatter  # ours: what it adds, and the defaults
    args = parser.parse_args(argv)
    # The elastic agent logs every rank it stops and each failure at WARNING and ERROR; the line below says it.
    # torchrun's banner about OMP_NUM_THREADS becomes one line too.
    for name in list(logging.Logger.manager.loggerDict):
        if name.startswith(("torch.distributed.elastic", "torch.distributed.run")):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    if "OMP_NUM_THREADS" not in os.environ and determine_local_world_size(args.nproc_per_node) > 1:
        print("note: OMP_NUM_THREADS=1 in every rank, as torchrun sets it; set it to give a rank more CPU threads",
              file=sys.stderr)
    try:
        run(args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        how = f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
        print(f"error: {e.name} failed: rank {rank} ended first, with {how} (its own error, if any, is above)",
              file=sys.stderr)
        sys.exit(1)


def console() -> None:
    main()


if __name__ == "__main__":
    main()
