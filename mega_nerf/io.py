"""Files written whole or not at all, with one-line errors; images encoded in memory; torch files read with
one-line errors.

Every file the package writes goes through `atomic_path` (or `atomic_open`, `atomic_write` built on it): the bytes
go to a temp file beside the target, `<name>.<pid>-<host>.tmp` (unique per process and host, so ranks writing side
by side never share one; a writer that picks its format by suffix, OpenCV's VideoWriter, gets
`<name>.<pid>-<host>.tmp<suffix>`), are checked (it exists, is as long as what was written, and passes the caller's
own check), flushed to the disk (fsync), and the temp file is renamed over the target (os.replace, atomic on POSIX).
A killed run or a full disk thus leaves the old file or none under the target's name, never a truncated one; at
worst a stale temp file, which `remove_temp_files` deletes when the command that owns the folder runs again
(`remove_temp_files_of`: those of one file, in a folder others share), and names in a note those of other hosts left
untouched for an hour. Stale means left by a process of this host that has ended: a folder on a shared disk may hold
another host's live writes. A folder written as a whole (a converted dataset) goes through `atomic_folder` the same
way.

Before a large write the free space is checked (`check_free_space`), and every operating-system error of a
write becomes one `UserError` line naming the path, and for a full disk the bytes needed (`write_error`). An
output is refused before anything is written where it would destroy an input (`check_output`).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import re
import shutil
import socket
import struct
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import cv2
import numpy as np
import torch

from mega_nerf.errors import UnreadableFile, UserError

TEMP_SUFFIX = ".tmp"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"  # the first 8 bytes of every PNG file (PNG specification, 5.2)
# <name>.<pid>-<host>.tmp, or .tmp<suffix>; <host> is HOST's tag, absent in older runs' names (taken as this host's)
_TEMP_NAME = re.compile(r"\.(\d+)(?:-([0-9a-f]{8}))?\.tmp(\.\w+)?$")


def _host_tag() -> str:
    """This host in temp names: 8 hex digits of its name and, on Linux, of its process-ID namespace (containers on
    one machine may share its name, and each counts process IDs of its own)."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:  # not Linux, or no /proc
        namespace = ""
    return f"{zlib.crc32(f'{socket.gethostname()} {namespace}'.encode()):08x}"


HOST = _host_tag()
FOREIGN_TEMP_SECONDS = 3600  # another host's temp file untouched this long is reported (_sweep)
# What torch.load raises on a file that is not a torch file or is damaged (PyTorch 2.x, found by cutting and
# corrupting saved files): OSError (missing, unreadable), EOFError (empty), RuntimeError (a cut zip archive),
# pickle.UnpicklingError (foreign bytes, or objects weights_only refuses); damage inside the pickle itself
# surfaces as ValueError, LookupError, TypeError, AttributeError or struct.error.
TORCH_LOAD_ERRORS = (OSError, EOFError, RuntimeError, pickle.UnpicklingError, ValueError, LookupError, TypeError,
                     AttributeError, struct.error)
_REASONS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
            errno.EACCES: "permission denied", errno.EPERM: "permission denied", errno.EROFS: "read-only file system",
            errno.EISDIR: "it is a directory", errno.ENOTDIR: "a folder above it is a file",
            errno.EEXIST: "a folder above it is a file",  # from mkdir, the only call that raises it here and in lock.py
            errno.ENAMETOOLONG: "name too long"}
Check = Callable[[Path], "str | None"]  # a written temp file -> what is wrong with it, or None


def process_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (signal 0 checks without signalling)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    return True


def temp_path(path: Path, keep_suffix: bool = False) -> Path:
    """Where this process writes `path`'s new content before the rename (`keep_suffix` for writers that pick
    their format by the suffix)."""
    return path.with_name(f"{path.name}.{os.getpid()}-{HOST}{TEMP_SUFFIX}{path.suffix if keep_suffix else ''}")


def _remove(entry: Path) -> None:
    shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)


def remove_temp_files(folder: Path) -> str | None:
    """Delete the temp files and folders in `folder` left by runs of this host that are dead (killed mid-write).
    Returns a note on those of other hosts or containers (`_sweep`), or None."""
    return _sweep(folder, lambda name: True)


def remove_temp_files_of(path: Path) -> str | None:
    """As remove_temp_files, for the temp files of `path` alone (a shared image store's, a merged container's in a
    folder of the user's: nothing else there is touched)."""
    return _sweep(path.parent, lambda name: name.startswith(f"{path.name}.")
                  and _TEMP_NAME.fullmatch(name[len(path.name):]) is not None)


def _sweep(folder: Path, chosen: Callable[[str], bool]) -> str | None:
    """Remove the `chosen` temp files in `folder` whose process, of this host, has ended. Those of other hosts or
    containers are never removed (their runs cannot be checked from here): a note names those untouched for
    FOREIGN_TEMP_SECONDS (a write touches its file as it goes), for the caller to print; None when there are none."""
    foreign, size = [], 0
    for entry in folder.iterdir() if folder.is_dir() else ():
        match = _TEMP_NAME.search(entry.name)
        if match is None or not chosen(entry.name):
            continue
        if match.group(2) in (None, HOST):  # this host's, or an older run's name (taken as this host's)
            if not process_alive(int(match.group(1))):
                _remove(entry)
            continue
        with contextlib.suppress(OSError):  # gone meanwhile
            stat = entry.stat()
            if time.time() - stat.st_mtime > FOREIGN_TEMP_SECONDS:
                foreign.append(entry.name)
                size += stat.st_size
    if not foreign:
        return None
    return (f"note: {folder} holds {len(foreign)} temp file(s) of runs on other hosts or containers, untouched for "
            f"over {FOREIGN_TEMP_SECONDS // 3600} h ({size:,} bytes; e.g. {min(foreign)}): delete them once no run "
            "writes there")


def free_bytes(path: Path) -> int:
    """Bytes free to this user on the disk that holds `path` (or would, for a path not made yet)."""
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def os_reason(error: OSError) -> str:
    """An operating-system error's reason in words (a file where a folder should be is said so)."""
    return _REASONS.get(error.errno or 0, error.strerror or str(error))


def write_error(path: str | os.PathLike, error: OSError, needed: int = 0) -> UserError:
    """The one line for an operating-system error writing `path`: the reason in words and, for a full disk,
    the bytes needed and free."""
    reason = os_reason(error)
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        reason += f"; {needed:,} bytes needed" if needed else ""
        reason += f", {free_bytes(Path(path).parent):,} free"
    return UserError(f"{path}: could not write ({reason})")


def check_free_space(path: str | os.PathLike, needed: int) -> None:
    """UserError before a write of `needed` bytes to `path` that its disk cannot hold."""
    free = free_bytes(Path(path).parent)
    if needed > free:
        raise UserError(f"{path}: not enough disk space ({needed:,} bytes needed, {free:,} free)")


def sync_folder(folder: Path) -> None:
    """fsync a folder, so that a rename inside it survives a crash."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(tmp: Path, path: Path, check: Check | None, sync_parent: bool) -> None:
    """Check the written temp file, fsync it and rename it to `path` (and fsync its folder: `sync_parent`)."""
    if not tmp.is_file():
        raise UserError(f"{path}: the writer produced no file")
    problem = check(tmp) if check is not None else None
    if problem:
        raise UserError(f"{path}: {problem}")
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    if sync_parent:
        sync_folder(path.parent)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, size: int = 0, keep_suffix: bool = False,
                check: Check | None = None, sync_parent: bool = True) -> Iterator[Path]:
    """A temp path beside `path` (folders created) for the block to write; when the block completes, the file is
    checked (not empty, `check` passes), fsynced and renamed to `path` (module docstring). `size`: bytes about to
    be written, checked against the free space first. The temp file is removed if anything fails; an OS error
    is one UserError line (`write_error`). `sync_parent` False leaves the folder's fsync, which makes the rename
    itself survive a crash, to the caller: one `sync_folder` after many small files in one folder (a partition's
    masks: about 0.8 ms a file on an H200 machine's disk, bench/RESULTS.md, twenty-sixth session)."""
    path = Path(path)
    tmp = temp_path(path, keep_suffix)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if size:
            check_free_space(path, size)
        yield tmp
        _commit(tmp, path, check, sync_parent)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise write_error(path, e, size) from None
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, size: int = 0, sync_parent: bool = True) -> Iterator[BinaryIO]:
    """A binary file whose content appears under `path` only when the block completes (`atomic_path`); the
    length on disk is checked against what was written, so a short write never passes."""
    with atomic_path(path, size, sync_parent=sync_parent) as tmp, open(tmp, "wb") as f:
        yield f
        f.flush()
        written, on_disk = f.tell(), os.fstat(f.fileno()).st_size
        if on_disk != written:
            raise OSError(errno.ENOSPC, f"{on_disk} of {written} bytes written")


def atomic_write(path: str | os.PathLike, data: bytes, sync_parent: bool = True) -> None:
    """Write `data` to `path` atomically (`atomic_open`), its length checked against the free space first."""
    with atomic_open(path, len(data), sync_parent) as f:
        f.write(data)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """A temp folder beside `path` for the block to fill; renamed to `path` (which must be absent or an empty
    folder) when the block completes, removed if it fails. Temp folders of dead runs are removed first, so a
    killed run's rerun starts clean."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_temp_files(path.parent)
        tmp.mkdir()
        yield tmp
        os.replace(tmp, path)
        sync_folder(path.parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise write_error(path, e) from None
        raise


class _Recording:
    """A file that remembers the OS error its last write raised (torch.save hides it in a RuntimeError)."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.error = f, None

    def write(self, data: bytes) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors inside `obj` (nested dicts, lists, tuples): about a torch file's size."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def save_torch_atomic(obj: Any, path: str | os.PathLike) -> None:
    """torch.save `obj` to `path` atomically, its tensors' size checked against the free space first. Written
    through a file object, so the archive inside is named 'archive' whatever the file's name: the bytes depend
    on `obj` only. Load with `load_torch`."""
    with atomic_open(path, tensor_bytes(obj)) as f:
        recording = _Recording(f)
        try:
            torch.save(obj, recording)
        except RuntimeError:
            if recording.error is None:
                raise
            raise recording.error from None


def write_json(path: str | os.PathLike, data: Any) -> None:
    """`data` as indented JSON plus a newline, atomically; infinities are written as Infinity."""
    atomic_write(path, (json.dumps(data, indent=2) + "\n").encode())


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file's content; a missing or unreadable file is one UserError naming it."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: not found") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None


def write_bgr(path: str | os.PathLike, bgr: np.ndarray, params: Sequence[int] = ()) -> None:
    """(H, W, 3) uint8 in OpenCV's BGR order, encoded in memory in the format of the path's suffix with OpenCV's
    `params` (e.g. JPEG quality), then written atomically. UserError naming the file when it cannot be encoded."""
    path = Path(path)
    try:
        ok, data = cv2.imencode(path.suffix, np.ascontiguousarray(bgr), list(params))
    except cv2.error:  # OpenCV has no encoder for this suffix
        ok = False
    if not ok:
        raise UserError(f"{path}: could not encode a {bgr.shape[1]}x{bgr.shape[0]} image as '{path.suffix}'")
    atomic_write(path, data.tobytes())


def write_png(path: str | os.PathLike, rgb: np.ndarray) -> None:
    """(H, W, 3) uint8 RGB (a render, a panel) to a `.png` path, atomically (`write_bgr`)."""
    write_bgr(path, rgb[:, :, ::-1])


def begins_with(path: Path, magic: bytes) -> bool:
    """Whether `path` is a readable file whose first bytes are `magic` (a format's signature)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(magic)) == magic
    except OSError:  # unreadable: not known to be one
        return False


def is_png(path: Path) -> bool:
    """Whether `path` begins with the PNG signature (what `write_png` writes)."""
    return begins_with(path, PNG_SIGNATURE)


def load_torch(path: str | os.PathLike, what: str, device: torch.device | str = "cpu",
               file: BinaryIO | None = None) -> Any:
    """torch.load(weights_only=True) of `path` (read from `file` where the caller has it open) onto `device`;
    UserError '<path>: unreadable or truncated <what>' when it is not a readable torch file (TORCH_LOAD_ERRORS).
    The caller checks what the file holds."""
    try:
        return torch.load(path if file is None else file, map_location=device, weights_only=True)
    except TORCH_LOAD_ERRORS as e:
        raise UnreadableFile(f"{path}: unreadable or truncated {what} ({type(e).__name__})") from None


def available_memory() -> int | None:
    """Bytes of memory this machine can give a process now (Linux's MemAvailable, else its free pages), or None
    where the system does not say."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # in kB
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # no such call or name here
        return None


def free_memory(device: torch.device) -> tuple[str, int | None]:
    """Where tensors on `device` live, in words ('GPU memory' for a CUDA device, else 'memory': the host's), and
    the bytes free there now (CUDA's free memory, else available_memory; None where the system does not say)."""
    if device.type == "cuda":
        return "GPU memory", torch.cuda.mem_get_info(device)[0]
    return "memory", available_memory()


def memory_shortfall(device: torch.device, host: int, work: int) -> tuple[str, int, int] | None:
    """(where, needed, free) for the first pool whose free memory (free_memory) is short of what a job needs:
    `host` bytes on the host and `work` on `device` (one pool on a CPU, where the two add up); None when both
    fit or the system does not say."""
    pools = [(torch.device("cpu"), host + (work if device.type == "cpu" else 0))]
    if device.type == "cuda":
        pools.append((device, work))
    for pool, needed in pools:
        where, free = free_memory(pool)
        if free is not None and needed > free:
            return where, needed, free
    return None


def check_output(output: str | os.PathLike, option: str, inputs: Mapping[str, Sequence[str | os.PathLike | None]],
                 kind: str, is_kind: Callable[[Path], bool]) -> None:
    """Refuse, in one UserError line and before anything is written, an `output` (given as `option`) whose write
    would destroy something (atomic writes replace whatever has the name): one of the command's `inputs` (option
    -> the files and folders it names, None where not given), a folder, or an existing file that `is_kind`
    rejects (`kind` says what the command writes, e.g. 'a PLY file'). Such a file inside an input folder (the
    dataset) is named as an input rather than offered for removal. A new file, or an earlier output of the same
    kind (a rerun), passes. A file in a dataset's folder or its splits is the caller's to refuse
    (data.dataset.check_file_not_in_dataset: the dataset's layout is a layer above this module)."""
    target = Path(output).resolve()
    named = [(name, Path(path)) for name, paths in inputs.items() for path in paths if path is not None]
    for name, path in named:
        if target == path.resolve():
            raise UserError(f"{option} {output} is one of this command's inputs ({name}); choose another path")
    if target.is_dir():
        raise UserError(f"{option} {output} is a folder; choose a file path")
    if target.exists() and not is_kind(target):
        for name, path in named:
            if path.is_dir() and target.is_relative_to(path.resolve()):
                raise UserError(f"{option} {output} lies inside {path}, one of this command's inputs ({name}); "
                                "choose another path")
        raise UserError(f"{option} {output}: exists and is not {kind}; remove it or choose another path")
