"""Triton's installation key, remembered per machine.

Triton puts a hash of its own installation into every kernel's cache key (`triton_key`: on Triton 3.6 about
420 MB, mostly its 416 MB compiler library). It keeps the hash for the life of a process only, so every process
pays for it at its first kernel launch: 0.6 s alone on an H200 machine, 0.37 s of a fresh partition's membership
beside its other threads (bench/RESULTS.md, twenty-sixth and twenty-seventh sessions). The hash depends on those
files alone, so we keep it on disk under a fingerprint of the installation (every file's path, size and
modification time, about 2 ms to take for Triton's ~350 files) and give the kept hash to Triton while the
fingerprint holds. Reinstalling or editing Triton changes the fingerprint, and the next process hashes again.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from mega_nerf import io
from mega_nerf.errors import UserError

KeyFunction = Callable[[], str]


def default_folder() -> Path:
    """Where the kept keys live, beside the package's other per-user caches."""
    return Path.home() / ".cache" / "mega_nerf" / "triton-key"


def fingerprint(package: Path, version: str) -> str:
    """A digest of Triton's version, Python's, and every file under Triton's package folder: relative path, size
    and modification time in nanoseconds. It covers every file the installation hash reads, and more."""
    digest = hashlib.sha256(f"{version}\n{sys.version}\n".encode())
    for root, folders, files in os.walk(package):
        folders.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            info = os.stat(path)
            digest.update(f"{os.path.relpath(path, package)}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def key_path(folder: Path, triton: ModuleType) -> Path | None:
    """Where the key of the installation `triton` (the imported package) is kept, or None where it has no files
    to fingerprint."""
    source = getattr(triton, "__file__", None)
    version = getattr(triton, "__version__", None)
    if source is None or version is None:
        return None
    try:
        return folder / fingerprint(Path(source).parent, version)
    except OSError:  # a file vanished while we looked: no key kept this time
        return None


def kept_key(path: Path) -> str | None:
    """The key kept at `path`, or None (none kept, unreadable, or empty)."""
    try:
        key = path.read_text()
    except (OSError, UnicodeDecodeError):
        return None
    return key or None


def keep_key(path: Path, key: str) -> None:
    """Keep `key` at `path`, whole or not at all; quietly nothing where it cannot be written (a cache only: the
    next process hashes again)."""
    with contextlib.suppress(OSError, UserError):
        path.parent.mkdir(parents=True, exist_ok=True)
        io.atomic_write(path, key.encode())


def hand_over(original: KeyFunction, key: str) -> int:
    """Make every loaded module that holds Triton's `original` key function hold one that returns `key` instead
    (Triton's cache module looks it up there at each compile). Returns how many modules now hold it."""
    def remembered() -> str:
        return key
    remembered.__doc__ = "Triton's installation key, as kept on disk under its fingerprint (fields.kernels)."
    replaced = 0
    for module in list(sys.modules.values()):
        if module is not None and getattr(module, "triton_key", None) is original:
            module.triton_key = remembered
            replaced += 1
    return replaced
