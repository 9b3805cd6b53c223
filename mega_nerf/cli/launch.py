"""`mega-nerf-launch`: start a command's ranks as torch.distributed.run (torchrun) does, with its options, and
end a failure in one line.

    mega-nerf-launch --standalone --nproc_per_node 2 scripts/create_cluster_masks.py --config_file ...
    mega-nerf-launch --nnodes 4 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \\
        scripts/train_cells.py ...

One machine (only `--standalone` and `--nproc_per_node N` given): the ranks start at once, and this process
imports torch and hosts their key-value store while they start, instead of first importing torch and running
torchrun's rendezvous (on an H200 machine torchrun's 2 ranks started 5.3 s later than one plain process). Any
other option: torchrun itself runs the launch. Either way, when a rank fails our commands print its error in one
line (`error: ...`) and end every rank; this ends with one more line naming the first failing rank and its exit
code, and exit code 1, where torchrun prints its launcher's traceback and a block per rank.
"""
from __future__ import annotations

import argparse
import datetime
import os
import signal
import socket
import subprocess
import sys
import time

from mega_nerf.errors import UserError, run_cli

GRACE_S = 10.0  # after a rank fails, how long the others may take to stop on their own (they see its error)
KILL_S = 5.0  # then after SIGTERM, before SIGKILL
POLL_S = 0.05
STORE_TIMEOUT_MIN = 30.0  # the store server's own timeout; the ranks bound their waits with --timeout_minutes


def fast_parser() -> argparse.ArgumentParser:
    """The options of a one-machine launch; anything else goes to torchrun."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument("--standalone", action="store_true")
    p.add_argument("--nproc_per_node", "--nproc-per-node", default="")
    p.add_argument("script", nargs="?")
    return p


def split_command(argv: list[str]) -> tuple[list[str], list[str]]:
    """(launcher options, the script and its arguments): the script is the first word that is not an option or
    an option's value (every launcher option but --standalone takes one value)."""
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        i += 1 if argv[i] == "--standalone" or "=" in argv[i] else 2
    return argv[:i], argv[i:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    """The environment torchrun gives a rank of a one-machine job whose store the launcher hosts."""
    env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
           "LOCAL_WORLD_SIZE": str(world_size), "GROUP_RANK": "0", "ROLE_RANK": str(rank),
           "ROLE_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RESTART_COUNT": "0",
           "TORCHELASTIC_MAX_RESTARTS": "0", "TORCHELASTIC_RUN_ID": f"mega-nerf-{port}"}
    env.setdefault("OMP_NUM_THREADS", "1")  # as torchrun: N ranks must not each take every core
    return env


def launch_here(nproc: int, command: list[str]) -> tuple[int, int] | None:
    """Run `command` (a script and its arguments) as `nproc` ranks on this machine, hosting their store. Returns
    None when every rank succeeded, else (the first failing rank, its exit code; negative: a signal)."""
    port = free_port()
    ranks = [subprocess.Popen([sys.executable, *command], env=rank_env(r, nproc, port)) for r in range(nproc)]
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for process in ranks:
            if process.poll() is None:
                process.send_signal(signum)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, forward)
    from torch.distributed import TCPStore  # while the ranks import torch themselves

    try:
        store = TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False,  # noqa: F841 (held to the end)
                         timeout=datetime.timedelta(minutes=STORE_TIMEOUT_MIN))
    except RuntimeError as e:  # the port was taken in the meantime
        forward(signal.SIGTERM, None)
        raise UserError(f"could not host the ranks' store on port {port}: {e}; run it again") from None
    first, failed_at = None, None
    while None in [process.poll() for process in ranks]:  # every rank polled: a list, not a short-cut any()
        if first is None:
            first = next(((r, p.returncode) for r, p in enumerate(ranks) if p.returncode not in (None, 0)), None)
            failed_at = time.monotonic() if first is not None else None
        if failed_at is not None and not stopping and time.monotonic() - failed_at > GRACE_S:
            forward(signal.SIGTERM, None)
        if failed_at is not None and time.monotonic() - failed_at > GRACE_S + KILL_S:
            for process in ranks:
                if process.poll() is None:
                    process.kill()
        time.sleep(POLL_S)
    if first is None:
        first = next(((r, p.returncode) for r, p in enumerate(ranks) if p.returncode != 0), None)
    return first


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    options, command = split_command(argv)
    fast, unknown = fast_parser().parse_known_args(options + command[:1])
    if command and not unknown and fast.nproc_per_node.isdigit() and int(fast.nproc_per_node) >= 1:
        if "OMP_NUM_THREADS" not in os.environ and int(fast.nproc_per_node) > 1:
            print("note: OMP_NUM_THREADS=1 in every rank, as torchrun sets it; set it to give a rank more CPU "
                  "threads", file=sys.stderr)
        failure = launch_here(int(fast.nproc_per_node), command)
    else:
        failure = launch_torchrun(argv)
    if failure is not None:
        rank, code = failure
        how = f"signal {-code}" if code < 0 else f"exit code {code}"
        print(f"error: {command[0] if command else 'the command'} failed: rank {rank} ended first, with {how} "
              "(its own error, if any, is above)", file=sys.stderr)
        sys.exit(1)


def launch_torchrun(argv: list[str]) -> tuple[int, int] | None:
    """torchrun with `argv`, its logging quietened; (first failing rank, exit code) or None."""
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    from mega_nerf.cli.options import HelpFormatter

    parser = get_args_parser()
    parser.description, parser.formatter_class = __doc__, HelpFormatter  # ours: what it adds, and the defaults
    args = parser.parse_args(argv)
    # The elastic agent logs every rank it stops and each failure at WARNING and ERROR; main's line says it.
    for name in list(logging.Logger.manager.loggerDict):
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        run(args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        return rank, failure.exitcode
    return None


def console() -> None:
    run_cli(main)


if __name__ == "__main__":
    console()
