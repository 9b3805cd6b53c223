"""Where a command's seconds go: a clock of consecutive named parts from the process start (or any other moment),
which add up to the time since by construction. The trainer times its start-up to the end of the first step
(tests/test_training.py holds that sum against a clock outside the process); partitioning times its whole run.
Torch-free, and it imports nothing of the package, so every layer may use it."""
from __future__ import annotations

import os
import time


def process_start() -> float | None:
    """When this process started (time.time() scale), from /proc: its start in clock ticks after boot against
    the uptime (10 ms resolution); None where /proc is missing."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))


class PartsClock:
    """Consecutive named parts, in seconds (a part named twice adds up)."""

    def __init__(self, start: float | None = None) -> None:
        self.start = time.time() if start is None else start
        self.last = self.start
        self.parts: dict[str, float] = {}
        self.notes: dict[str, str] = {}

    def mark(self, part: str, note: str | None = None) -> None:
        """The time since the previous mark was spent on `part` (`note`: e.g. 'written' or 'reused')."""
        now = time.time()
        self.parts[part] = self.parts.get(part, 0.0) + now - self.last
        self.last = now
        if note is not None:
            self.notes[part] = note

    def split(self, part: str, first: str, seconds: float) -> None:
        """Take `seconds` (at most all of it) out of `part` as a part `first` placed before it."""
        taken = min(max(seconds, 0.0), self.parts[part])
        parts = {}
        for name, value in self.parts.items():
            if name == part:
                parts[first] = taken
                value -= taken
            parts[name] = value
        self.parts = parts

    @property
    def total(self) -> float:
        return self.last - self.start

    def summary(self, title: str) -> str:
        """One line: `title` with the total in place of {total}, then each part with its note."""
        items = [f"{name} {seconds:.2f} s" + (f" ({self.notes[name]})" if name in self.notes else "")
                 for name, seconds in self.parts.items()]
        return title.format(total=f"{self.total:.2f} s") + ": " + ", ".join(items)
