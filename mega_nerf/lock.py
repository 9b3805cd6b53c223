"""One run per output: a command that writes an output folder (or file) first takes its lock.

The lock is a file beside the output, `.<name>.lock`, holding `<pid> <host> <tag>` of the run that holds it (`tag`:
io.HOST, the host and its process-ID namespace; older locks lack it). It is created whole (written under a temp
name, then hard-linked to the lock's name, which fails if it exists), so a reader never sees a half-written one. A
second run on the same output stops at once with one line naming the holder (train_cells instead takes a held cell
again once it is free: training.all_cells). A lock whose process is dead on this host and in this container (a run
killed with -9) is stale and taken over; one from another host or container cannot be checked from here, so the
message says to delete it by hand if that run is gone.
"""
from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from mega_nerf.errors import UserError
from mega_nerf.io import HOST, os_reason, process_alive, temp_path

Holder = tuple[int, str, "str | None"]  # (pid, host name, io.HOST's tag or None in older locks)


class Held(UserError):
    """Another live run holds an output's lock (acquire's one line); `lock` is the lock's file, `holder` its
    Holder."""

    def __init__(self, message: str, lock: Path, holder: Holder) -> None:
        super().__init__(message)
        self.lock, self.holder = lock, holder


def checkable(holder: Holder) -> bool:
    """Whether the holder's process can be looked up from here: it runs on this host, in this container."""
    return holder[1] == socket.gethostname() and holder[2] in (None, HOST)


def _free(holder: Holder | None) -> bool:
    """Whether a lock naming `holder` (None: gone, or unreadable) can be taken: its run, checkable from here, has
    died."""
    return holder is None or (checkable(holder) and not process_alive(holder[0]))


def delete_hint(lock: Path) -> str:
    """What to do about `lock` when its holder cannot be checked from here (`checkable`)."""
    return f"if that run is gone, delete {lock}"


def is_free(lock: Path) -> bool:
    """Whether `lock` is gone or stale."""
    return _free(_read_holder(lock))


def lock_path(output: Path) -> Path:
    """The lock file of `output`: `.<name>.lock` beside it (inside it would change what the folder holds)."""
    return output.parent / f".{output.name}.lock"


def _read_holder(lock: Path) -> Holder | None:
    """The Holder written in `lock`, or None when it is gone or unreadable."""
    try:
        pid, host, *tag = lock.read_text().split()
        if len(tag) > 1:
            return None
        return int(pid), host, tag[0] if tag else None
    except (OSError, ValueError):
        return None


def _try_create(lock: Path, content: str) -> bool:
    """Create `lock` holding `content` atomically; False when it already exists."""
    tmp = temp_path(lock)
    tmp.write_text(content)
    try:
        os.link(tmp, lock)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def _remove_stale(lock: Path, seen: Holder | None) -> None:
    """Remove `lock` if it still names `seen`. Another run that found it stale too may have replaced it since it
    was read (train_cells' waiters poll the same locks): the lock is moved aside first, and one that names another
    holder is put back."""
    aside = lock.with_name(f"{temp_path(lock).name}.stale")
    try:
        os.rename(lock, aside)
    except FileNotFoundError:  # removed already
        return
    if _read_holder(aside) != seen:
        with contextlib.suppress(FileExistsError):  # a third run's lock, made meanwhile, stays
            os.link(aside, lock)
    aside.unlink(missing_ok=True)


def acquire(output: str | os.PathLike, what: str) -> Path:
    """Take `output`'s lock (folders above it created) or raise a one-line UserError naming the run holding
    it; `what` names the option for the message (e.g. '--exp_name'). Returns the lock file."""
    output = Path(output)
    lock = lock_path(output)
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a stale lock removed by a racing run is retried, not an error
            if _try_create(lock, f"{os.getpid()} {socket.gethostname()} {HOST}\n"):
                return lock
            holder = _read_holder(lock)
            if _free(holder):
                _remove_stale(lock, holder)  # its run is dead (or the lock is gone, or unreadable)
                continue
            other_pid, other_host, _ = holder
            extra = "" if checkable(holder) else f" ({delete_hint(lock)})"
            raise Held(f"{what} {output}: in use by another run (pid {other_pid} on {other_host}); wait for it to "
                       f"finish or use another {what}{extra}", lock, holder)
    except OSError as e:
        raise UserError(f"{lock}: cannot create the lock of {what} {output} ({os_reason(e)})") from None
    raise UserError(f"{lock}: could not take the lock of {what} {output}; retry")


def release(lock: Path) -> None:
    """Give a lock back if this process still holds it."""
    holder = _read_holder(lock)
    if holder is not None and holder[0] == os.getpid() and checkable(holder):
        lock.unlink(missing_ok=True)


@contextlib.contextmanager
def locked(outputs: dict[str, list[str | os.PathLike]], folders: bool = True,
           main_rank_only: bool = True) -> Iterator[None]:
    """Hold the locks of every output while the block runs: `outputs` maps an option name to its paths, which
    are folders (an existing file there is a one-line error) unless `folders` is False. Under
    torch.distributed.run only rank 0 takes them (the ranks of one job share their outputs), unless
    `main_rank_only` is False (outputs of one rank's own, as a cell trained by train_cells)."""
    taken: list[Path] = []
    for what, paths in outputs.items():
        for path in paths:
            if folders and Path(path).exists() and not Path(path).is_dir():
                raise UserError(f"{what} {path}: is a file, not a folder")
    try:
        if not main_rank_only or os.environ.get("RANK", "0") == "0":
            seen: set[Path] = set()
            for what, paths in outputs.items():
                for path in {Path(p).resolve() for p in paths} - seen:  # one lock per place, however spelled
                    seen.add(path)
                    taken.append(acquire(path, what))
        yield
    finally:
        for lock in reversed(taken):
            release(lock)
