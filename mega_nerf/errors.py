"""User-facing errors: one clear line naming the bad file or option, never a traceback."""
from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class UserError(Exception):
    """Bad input from the user (a file, an option); printed as one line by `run_cli`."""


def run_cli(main: Callable[[], T]) -> T:
    """Run an entry point, turning a `UserError` into `error: <message>` on stderr and exit code 2."""
    try:
        return main()
    except UserError as e:
        # One write: under `python -u` (every rank under mega-nerf-launch) print() writes the newline apart, and
        # two ranks' lines could interleave on a shared console.
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)
