"""Files written whole or not at all, images encoded in memory, and torch files read with one-line errors.

Every file the package writes goes through `atomic_open`: the bytes go to a temp file beside the target,
`<name>.<pid>.tmp` (unique per process, so ranks writing side by side never share one), are flushed to the disk
(fsync), and the temp file is renamed over the target (os.replace, atomic on POSIX). A killed run or a full disk
thus leaves the old file or none under the target's name, never a truncated one; at worst a stale temp file,
which the stages that list their folders remove (partition.maskfile, data.chunks). A write the disk refuses is
one `UserError` line naming the file.
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import cv2
import numpy as np
import torch

from mega_nerf.errors import UserError

TEMP_SUFFIX = ".tmp"
# What torch.load raises on a file that is not a torch file or is damaged (PyTorch 2.x, found by cutting and
# corrupting saved files): OSError (missing, unreadable), EOFError (empty), RuntimeError (a cut zip archive),
# pickle.UnpicklingError (foreign bytes, or objects weights_only refuses); damage inside the pickle itself
# surfaces as ValueError, LookupError, TypeError, AttributeError or struct.error.
TORCH_LOAD_ERRORS = (OSError, EOFError, RuntimeError, pickle.UnpicklingError, ValueError, LookupError, TypeError,
                     AttributeError, struct.error)


def temp_path(path: Path) -> Path:
    """Where this process writes `path`'s new content before the rename."""
    return path.with_name(f"{path.name}.{os.getpid()}{TEMP_SUFFIX}")


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file whose content appears under `path` (folders created) only when the block completes
    (module docstring); the temp file is removed if the block fails. UserError when the disk refuses."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise UserError(f"{path}: could not write ({e.strerror or e})") from None
        raise


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (`atomic_open`)."""
    with atomic_open(path) as f:
        f.write(data)


def save_torch_atomic(obj: Any, path: str | os.PathLike) -> None:
    """torch.save `obj` to `path` atomically. Written through a file object, so the archive inside is named
    'archive' whatever the file's name: the bytes depend on `obj` only. Load with `load_torch`."""
    with atomic_open(path) as f:
        torch.save(obj, f)


def write_json(path: str | os.PathLike, data: Any) -> None:
    """`data` as indented JSON plus a newline, atomically; infinities are written as Infinity."""
    atomic_write(path, (json.dumps(data, indent=2) + "\n").encode())


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


def load_torch(path: str | os.PathLike, what: str, device: torch.device | str = "cpu") -> Any:
    """torch.load(weights_only=True) of `path` onto `device`; UserError '<path>: unreadable or truncated <what>'
    when it is not a readable torch file (TORCH_LOAD_ERRORS). The caller checks what the file holds."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except TORCH_LOAD_ERRORS as e:
        raise UserError(f"{path}: unreadable or truncated {what} ({type(e).__name__})") from None
