"""User-facing errors: one clear line naming the bad file or option, never a traceback; and how a command's
process ends."""
from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
from collections.abc import Callable
from typing import NoReturn

from mega_nerf.allocator import c_library

# Whether a command's end skips Python's teardown (end_process). A process that runs commands in-process, as the
# test suite does (tests/conftest.py), turns it off: there a command's end must be a SystemExit, not the process's.
QUICK_EXIT = True


class UserError(Exception):
    """Bad input from the user (a file, an option); printed as one line by `run_cli`."""


def run_cli(main: Callable[[], object]) -> NoReturn:
    """Run a command's entry point and end its process (`end_process`): exit code 0, or 2 with `error: <message>`
    on stderr for a `UserError`. Anything else (a traceback, argparse's exit) leaves as Python has it."""
    try:
        main()
    except UserError as e:
        # One write: under `python -u` (every rank under mega-nerf-launch) print() writes the newline apart, and
        # two ranks' lines could interleave on a shared console.
        sys.stderr.write(f"error: {e}\n")
        end_process(2)
    end_process(0)


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

