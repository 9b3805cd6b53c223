"""User-facing errors: one clear line naming the bad file or option, never a traceback; and how a command's
process ends."""
from __future__ import annotations

import atexit
import contextlib
import errno
import hashlib
import importlib
import os
import select
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, NoReturn

from mega_nerf.allocator import c_library
from mega_nerf.cuda_context import Pick, make_context_early

if TYPE_CHECKING:
    import torch

# mega-nerf-launch gives its ranks a folder, named by this variable, where each line they write to stderr through
# `write_line` leaves an empty file named by its hash: N ranks that stop alike (on one bad option, one Ctrl-C, one
# rank's failure) print their line once.
SHARED_LINES = "MEGA_NERF_LAUNCH_LINES"

# Whether a command's end skips Python's teardown (end_process). A process that runs commands in-process, as the
# test suite does (tests/conftest.py), turns it off: there a command's end must be a SystemExit, not the process's.
QUICK_EXIT = True


class UserError(Exception):
    """Bad input from the user (a file, an option); printed as one line by `run_cli`."""


class UnreadableFile(UserError):
    """A file that cannot be read as what it should be (truncated, damaged, of another format)."""


class Interrupted(Exception):
    """The user stopped a command (Ctrl-C), or the system asked it to end (SIGTERM: a batch scheduler's preemption
    or time limit, `kill`), and it stopped cleanly: one line from `run_cli`, exit code 128 + the signal's number
    (130, 143), as a shell reports a process the signal ended. Not a UserError, so that train_cells.py ends the job
    rather than going on to the next cell."""

    def __init__(self, message: str, signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.code = 128 + signum


# What the machine, not the program, is at fault for: a full disk or quota, a read-only file system; and, where the
# OS names the file, one that is missing, forbidden, or in the way of a folder
MACHINE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}
FILE_ERRNOS = {errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.ENOENT}


def write_line(line: str) -> None:
    """`line` and a newline on stderr in one write (under `python -u`, every rank under mega-nerf-launch, print()
    writes the newline apart, and two ranks' lines could interleave on a shared console); not when another rank of
    this launch has written the same line (SHARED_LINES)."""
    folder = os.environ.get(SHARED_LINES)
    if folder:
        name = hashlib.sha1(line.encode(errors="surrogatepass")).hexdigest()  # a path's undecodable bytes too
        try:
            os.close(os.open(os.path.join(folder, name), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        except OSError:  # the folder has gone with its launcher: say it
            pass
    sys.stderr.write(f"{line}\n")


def run_cli(main: Callable[[], object]) -> NoReturn:
    """Run a command's entry point and end its process (`end_process`): exit code 0; 2 with `error: <message>`
    on stderr for a `UserError`, or for an OSError of the machine's (MACHINE_ERRNOS: a full disk, a read-only
    file system; FILE_ERRNOS where the OS names the file), with its file where the OS names it; 130 with one line
    for Ctrl-C (143 for a SIGTERM a command stopped at: `Interrupted`); 141, silently, when stdout's reader has
    gone (a SIGPIPE's code). Anything else (a traceback, argparse's exit) leaves as Python has it."""
    try:
        main()
    except UserError as e:
        write_line(f"error: {e}")
        end_process(2)
    except BrokenPipeError:  # before OSError, of which it is one
        if not _stdout_reader_gone():
            raise
        # End as a process killed by SIGPIPE would, without a traceback, with stdout on /dev/null so that the
        # final flush does not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        end_process(128 + signal.SIGPIPE)
    except OSError as e:
        if not (e.errno in MACHINE_ERRNOS or (e.errno in FILE_ERRNOS and e.filename is not None)):
            raise
        where = f"{e.filename}: " if e.filename is not None else ""
        write_line(f"error: {where}{e.strerror or e}")
        end_process(2)
    except Interrupted as e:
        write_line(f"error: {e}")
        end_process(e.code)
    except KeyboardInterrupt:
        write_line("error: interrupted")
        end_process(130)
    end_process(0)


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reader has left (`| head`; the broken pipe may instead be one the command
    writes to itself): the pipe's write end then polls as an error."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(event & select.POLLERR for _, event in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll on this system, no stdout, a closed one
        return False


def run_command(module: str, function: str = "main", cuda_context: Pick | None = None) -> NoReturn:
    """`run_cli` of `module.function`, imported here: a command's imports (torch's take 1-2 s) come before run_cli
    can catch Ctrl-C, which there raised KeyboardInterrupt from deep inside an import, a traceback. Until they are
    done, Ctrl-C ends the process with run_cli's line and exit code 130 (nothing has been written yet); a Ctrl-C
    ignored (SIG_IGN: a background job) stays ignored, and off the main thread (where no handler can be set)
    nothing changes. Python's own handler is back once the imports end, however they end. `cuda_context`: the
    command runs on one GPU, picked as `cuda_context` says (cuda_context.PARTITION, TRAIN, TRAIN_CELLS); that
    GPU's context is made meanwhile (cuda_context.make_context_early)."""
    if cuda_context is not None:
        make_context_early(sys.argv[1:], cuda_context)
    guard = (threading.current_thread() is threading.main_thread()
             and signal.getsignal(signal.SIGINT) is signal.default_int_handler)
    if guard:
        signal.signal(signal.SIGINT, _interrupted_while_starting)
    try:
        main = getattr(importlib.import_module(module), function)
    finally:
        if guard:
            signal.signal(signal.SIGINT, signal.default_int_handler)
    run_cli(main)


def _interrupted_while_starting(signum: int, frame: object) -> None:
    write_line("error: interrupted")
    os._exit(130)


def parse_device(name: str) -> torch.device:
    """--device as a torch device; a one-line UserError for a name torch does not know."""
    import torch  # here: mega-nerf-launch imports this module and must start without torch

    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"--device: unknown device '{name}' (e.g. cuda, cuda:1, cpu)") from None


def check_device(name: str) -> torch.device:
    """--device as a torch device this machine has; a one-line UserError for a name torch does not know or a GPU
    this machine lacks (torch's own errors for these come deep in the first allocation, as tracebacks)."""
    import torch

    device = parse_device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: this machine's torch sees no CUDA GPU (use --device cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return device


class StopRequest:
    """What `stop_on_signal` yields: the signal that asked a loop to stop (SIGINT or SIGTERM), None until one does."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def is_set(self) -> bool:
        return self.signum is not None


STOP_SIGNALS = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated (SIGTERM)"}


@contextlib.contextmanager
def stop_on_signal() -> Iterator[StopRequest]:
    """Within it, the first Ctrl-C (SIGINT) or SIGTERM only sets the request it yields, so that a loop can stop at
    the end of a whole step and save it. After it, Ctrl-C acts at once, as usual; SIGTERM stays a request, for it
    comes more than once (a batch scheduler sends it to every process of a job at its time limit, tens of seconds
    before it kills, and torchrun's agent or mega-nerf-launch forwards its own to each rank). Only on the main
    thread, where Python runs signal handlers (elsewhere the request is never set), and a signal ignored (SIG_IGN:
    Ctrl-C to a job started in the background by a script) stays ignored."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    caught = [signum for signum, handler in previous.items() if handler is not signal.SIG_IGN]

    def request(signum: int, frame: object) -> None:
        if stop.signum is not None:
            return  # a SIGTERM again
        stop.signum = signum
        sys.stderr.write(f"\n{STOP_SIGNALS[signum]}: stopping after this step to save it (Ctrl-C "
                         f"{'again ' if signum == signal.SIGINT else ''}stops at once)\n")
        if signal.SIGINT in caught:
            signal.signal(signal.SIGINT, _handler(previous[signal.SIGINT], signal.SIGINT))

    for signum in caught:
        signal.signal(signum, request)
    try:
        yield stop
    finally:
        for signum in caught:
            signal.signal(signum, _handler(previous[signum], signum))


def _handler(handler: object, signum: int) -> object:
    """A handler getsignal returned, as signal.signal takes it: None (set outside Python) is the default's."""
    if handler is not None:
        return handler
    return signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL


def end_process(code: int) -> NoReturn:
    """Exit as Python would, less the teardown of every object and C++'s static destructors, which take about
    0.5 s in any process that imported torch (measured on 2 CPU cores and on an H200 machine: bench/RESULTS.md,
    sixteenth session). First what Python's exit does before that teardown: wait for the other non-daemon threads
    and stop idle thread pools (threading's shutdown), then run the exit handlers (logging's; atexit's), then flush
    the standard streams, Python's and the C library's. A plain sys.exit where QUICK_EXIT is off, off the main
    thread (threading's shutdown would wait for the caller itself), or where this Python lacks that hook."""
    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is None or not QUICK_EXIT or threading.current_thread() is not threading.main_thread():
        sys.exit(code)
    shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(AttributeError, OSError, ValueError):  # none, closed, a closed pipe: nothing to say
            stream.flush()
    libc_flush = getattr(c_library(), "fflush", None)
    if libc_flush is not None:  # what C extensions printed through stdio, which os._exit would drop
        libc_flush(None)
    os._exit(code)

