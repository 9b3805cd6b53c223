"""`mega-nerf-launch`: start a command's ranks as torch.distributed.run (torchrun) does, with its options, and
end a failure in one line.

    mega-nerf-launch --standalone --nproc_per_node 2 scripts/create_cluster_masks.py --config_file ...
    mega-nerf-launch --nnodes 4 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \\
        scripts/train_cells.py ...

One machine (`--standalone --nproc_per_node N`, no other option, no torchrun PET_* variable): the ranks start at
once, each in a session of its own, and this process imports torch and hosts their key-value store while they
start, instead of first importing torch and running torchrun's rendezvous (on 2 H200s, 2 no-op ranks took 4.4 s
against torchrun's 8.5 s, bench/RESULTS.md, eleventh session). Anything else: torchrun
itself runs the launch. Either way, when a rank fails our commands print its error in one line (`error: ...`) and
end every rank; this ends with one more line naming the rank that failed first and its exit code, and exit code 1,
where torchrun prints its launcher's traceback and a block per rank.
"""
from __future__ import annotations

import argparse
import datetime
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from mega_nerf.errors import SHARED_LINES, UserError, run_cli

GRACE_S = 10.0  # after a rank fails, how long the others may take to stop on their own (they see its error)
KILL_S = 5.0  # then after SIGTERM, before SIGKILL
SHUTDOWN_S = 30.0  # after a signal to the launcher is forwarded, before SIGKILL (torchrun's default)
POLL_S = 0.05
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
ABOVE = "above"  # where a failing rank's own error is, when the ranks write to this console
Failure = tuple[int, int]  # (rank, exit code; negative: the signal that ended it)


def fast_parser() -> argparse.ArgumentParser:
    """The options of a one-machine launch; anything else goes to torchrun."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    p.add_argument("--standalone", action="store_true")
    p.add_argument("--nproc_per_node", "--nproc-per-node", default="")
    p.add_argument("script", nargs="?")
    return p


def split_command(argv: list[str]) -> tuple[list[str], list[str]]:
    """(launcher options, the script and its arguments), for the one-machine launch: the script is the first word
    that is neither an option nor --nproc_per_node's value. (torchrun's options without a value, such as -m, make
    this guess wrong; they are torchrun's to parse, and `one_machine` sends them there.)"""
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        i += 2 if argv[i] in ("--nproc_per_node", "--nproc-per-node") else 1
    return argv[:i], argv[i:]


def one_machine(argv: list[str]) -> tuple[int, list[str]] | None:
    """(ranks, command) when `argv` asks for a one-machine launch this process can run itself, else None."""
    if any(name.startswith("PET_") for name in os.environ):  # torchrun's options from the environment
        return None
    options, command = split_command(argv)
    try:
        args, unknown = fast_parser().parse_known_args(options + command[:1])
    except argparse.ArgumentError:
        return None
    if unknown or not command or not args.standalone or not args.nproc_per_node.isdecimal():
        return None
    n = int(args.nproc_per_node)
    return (n, command) if n >= 1 else None


def rank_env(rank: int, world_size: int, port: int, lines: str) -> dict[str, str]:
    """The environment torchrun gives a rank of a one-machine job whose store the launcher hosts (OMP_NUM_THREADS:
    one_thread_per_rank), and the folder `lines` where the ranks say each stderr line once (errors.write_line)."""
    return {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
           "LOCAL_WORLD_SIZE": str(world_size), "GROUP_RANK": "0", "GROUP_WORLD_SIZE": "1", "ROLE_NAME": "default",
           "ROLE_RANK": str(rank), "ROLE_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", SHARED_LINES: lines,
           "MASTER_PORT": str(port), "TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RESTART_COUNT": "0",
           "TORCHELASTIC_MAX_RESTARTS": "0", "TORCHELASTIC_RUN_ID": f"mega-nerf-{port}"}


class Ranks:
    """N rank processes, each in a session of its own (signalled as a group, its children too), with the moment
    each ended recorded by a thread of its own, so that the first failure is the first in time."""

    def __init__(self, command: list[str], n: int, port: int, lines: str) -> None:
        python = os.environ.get("PYTHON_EXEC", sys.executable)
        self.processes = [subprocess.Popen([python, "-u", *command], env=rank_env(r, n, port, lines),
                                           start_new_session=True) for r in range(n)]
        self.ended: dict[int, float] = {}
        for r, process in enumerate(self.processes):
            threading.Thread(target=self._wait, args=(r, process), daemon=True).start()

    def _wait(self, rank: int, process: subprocess.Popen) -> None:
        process.wait()
        self.ended[rank] = time.monotonic()

    def running(self) -> bool:
        return len(self.ended) < len(self.processes)

    def signal(self, signum: int) -> None:
        for rank, process in enumerate(self.processes):
            if rank not in self.ended:
                try:
                    os.killpg(process.pid, signum)
                except ProcessLookupError:  # ended meanwhile
                    pass

    def first_failure(self, posted: int | None = None) -> Failure | None:
        """The rank that failed first: `posted` (the rank whose error the store holds, when it failed) or the
        first to end with an error."""
        failed = [(t, r) for r, t in self.ended.items() if self.processes[r].returncode != 0]
        if not failed:
            return None
        rank = posted if posted in {r for _, r in failed} else min(failed)[1]
        return rank, self.processes[rank].returncode

    def stop(self, term_at: float | None, kill_at: float) -> None:
        """Wait for every rank to end: SIGTERM once at `term_at` (None: none), SIGKILL once at `kill_at`
        (time.monotonic() times)."""
        while self.running():
            now = time.monotonic()
            if term_at is not None and now >= term_at:
                self.signal(signal.SIGTERM)
                term_at = None
            if now >= kill_at:
                self.signal(signal.SIGKILL)
                kill_at = float("inf")
            time.sleep(POLL_S)


def store_socket() -> socket.socket:
    """A listening socket on a free local port, made before the ranks start and handed to the store, so that no
    other process can take the port in between."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


def launch_here(n: int, command: list[str]) -> Failure | None:
    """Run `command` (a script and its arguments) as `n` ranks on this machine, hosting their store. Returns None
    when every rank succeeded, else the rank that failed first and its exit code. A signal to this process goes
    to every rank, which then end as the signal says; this process ends by the same signal."""
    sock = store_socket()
    received: list[int] = []
    started: list[Ranks] = []

    def forward(signum: int, _frame: object) -> None:
        received.append(signum)
        for ranks in started:
            ranks.signal(signum)
    for signum in FORWARDED:  # before the ranks start, so that none is left running by an early signal
        signal.signal(signum, forward)
    # The folder where the ranks say each stderr line once (errors.write_line), gone however the launch ends
    with tempfile.TemporaryDirectory(prefix="mega-nerf-launch-", ignore_cleanup_errors=True) as lines:
        ranks = Ranks(command, n, sock.getsockname()[1], lines)
        started.append(ranks)
        if received:
            ranks.signal(received[0])
        try:
            from torch.distributed import TCPStore  # while the ranks import torch themselves

            # Held until every rank has ended; the ranks bound their own waits (--timeout_minutes).
            store = TCPStore("127.0.0.1", sock.getsockname()[1], is_master=True, wait_for_workers=False,
                             master_listen_fd=sock.fileno(), timeout=datetime.timedelta(hours=1))
            while ranks.running() and not received and ranks.first_failure() is None:
                time.sleep(POLL_S)
            failed = ranks.first_failure()
            if received:  # forwarded already: the ranks stop as it says, or are killed as torchrun would
                ranks.stop(None, time.monotonic() + SHUTDOWN_S)
            elif failed is not None:
                term_at = ranks.ended[failed[0]] + GRACE_S
                ranks.stop(term_at, term_at + KILL_S)
        finally:
            ranks.stop(None, time.monotonic())  # on an error of this process: no rank left behind
            sock.close()
    if received:
        signal.signal(received[0], signal.SIG_DFL)
        os.kill(os.getpid(), received[0])
    # Our commands post the failing rank's error in the store; its peers end on it, maybe before it has exited.
    from mega_nerf.distributed import failed_rank

    return ranks.first_failure(failed_rank(store))


def one_thread_per_rank(n: int) -> None:
    """OMP_NUM_THREADS=1 for n > 1 ranks unless it is set, as torchrun does, with one line instead of its banner."""
    if "OMP_NUM_THREADS" not in os.environ and n > 1:
        os.environ["OMP_NUM_THREADS"] = "1"
        print("note: OMP_NUM_THREADS=1 in every rank, as torchrun sets it; set it to give a rank more CPU threads",
              file=sys.stderr)


def launch_torchrun(argv: list[str]) -> tuple[str, Failure | None, str]:
    """torchrun with `argv`, its agent's logging quietened: (its script, the first failing rank and exit code or
    None, where that rank's error went: stderr_destination)."""
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
    nprocs = checked_local_ranks(args)
    one_thread_per_rank(nprocs)
    if not args.log_dir:  # what torchrun would make, named here so that the last line can say where it is
        args.log_dir = tempfile.mkdtemp(prefix="torchelastic_")
    earlier = set(Path(args.log_dir).glob("*"))  # a --log_dir may hold other runs' folders
    try:
        run(args)  # names this run's folder under --log_dir <args.rdzv_id>_<random>
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        ours = [d for d in Path(args.log_dir).glob(f"{args.rdzv_id}_*") if d not in earlier]
        return args.training_script, (rank, failure.exitcode), stderr_destination(args, failure.local_rank, nprocs,
                                                                                   ours)
    return args.training_script, None, ABOVE


def checked_local_ranks(args: argparse.Namespace) -> int:
    """The ranks torchrun starts on this machine, once the options it would refuse with a traceback (or, for
    --nproc_per_node 0 or fewer, accept and then fail an assertion) are checked (UserError naming the option)."""
    from torch.distributed.elastic.multiprocessing.api import Std
    from torch.distributed.run import determine_local_world_size

    try:
        nprocs = determine_local_world_size(args.nproc_per_node)
    except ValueError as e:  # a word it does not take, or one whose devices this machine lacks ("gpu")
        if not str(e).startswith("Unsupported nproc_per_node value"):
            raise UserError(f"--nproc_per_node {args.nproc_per_node}: {e}") from None
        nprocs = 0
    if nprocs < 1:  # torchrun takes 0 or fewer, then fails an assertion as its agent starts
        raise UserError(f"--nproc_per_node {args.nproc_per_node}: expected a positive integer, or gpu, xpu, cpu "
                        "or auto (a rank per device)")
    for option, value in (("--redirects", args.redirects), ("--tee", args.tee)):
        try:
            Std.from_str(value)
        except ValueError:
            raise UserError(f"{option} {value}: expected 0, 1, 2 or 3 (none, stdout, stderr, both), or one per "
                            "local rank as in 0:3,1:0") from None
    if args.local_ranks_filter and not all(r.strip().isdigit() for r in args.local_ranks_filter.split(",")):
        raise UserError(f"--local_ranks_filter {args.local_ranks_filter}: expected local ranks, as in 0,1")
    return nprocs


def stderr_destination(args: argparse.Namespace, local_rank: int, nprocs: int, run_dirs: list[Path]) -> str:
    """Where torchrun (its default log layout) sent a local rank's stderr under its --redirects, --tee,
    --local_ranks_filter and --log_dir: ABOVE (this console), its stderr.log in this run's folders `run_dirs`
    (the last attempt's), or nowhere."""
    from torch.distributed.elastic.multiprocessing.api import Std, to_map

    if args.log_dir == os.devnull:  # torchrun then leaves every rank's output on the console
        return ABOVE
    tee = to_map(Std.from_str(args.tee), nprocs)[local_rank] & Std.ERR
    to_file = (to_map(Std.from_str(args.redirects), nprocs)[local_rank] & Std.ERR) or tee
    shown = not args.local_ranks_filter or local_rank in {int(r) for r in args.local_ranks_filter.split(",")}
    if shown and (tee or not to_file):
        return ABOVE
    if to_file:
        logs = [f for d in run_dirs for f in d.glob(f"attempt_*/{local_rank}/stderr.log")]
        last = max(logs, key=lambda f: int(f.parent.parent.name.removeprefix("attempt_")), default=None)
        return f"in {last or Path(args.log_dir, '*', 'attempt_*', str(local_rank), 'stderr.log')}"
    return "not kept (--local_ranks_filter)"


def main(argv: list[str] | None = None) -> None:
    """Launch as the options say; one line and exit code 1 when a rank failed."""
    argv = sys.argv[1:] if argv is None else argv
    here = one_machine(argv)
    if here is not None:
        n, command = here
        one_thread_per_rank(n)
        script, failure, where = command[0], launch_here(n, command), ABOVE
    else:
        script, failure, where = launch_torchrun(argv)
    if failure is not None:
        rank, code = failure
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        print(f"error: {script} failed: rank {rank} failed first, with {how} (its own error, if any, is {where})",
              file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    run_cli(main)
