"""glibc's allocator asked to keep large freed blocks, for the stages that run on the CPU: partition, training,
evaluation, path renders and export.

A CPU training pass allocates and frees about a gigabyte of temporaries (trainer.pass_budget). glibc serves every
block over 32 MiB with its own mmap and unmaps it when it is freed, so the operating system faults in and zeroes
every page again in the next pass. On the development machine a two-step run of the defaults (the tiny city,
tests/test_training.py's 4 GB test) spent 72 s of its 115 s in the kernel, with 9.3 M page faults; served from
the heap and kept (glibc's M_MMAP_MAX 0 and a high M_TRIM_THRESHOLD), the same run took 47 s, 15 s in the kernel,
at a 2.13 GB peak instead of 1.74 GB (0.5 M page faults). Evaluating the demo's merged container on the CPU took
15.2-16.5 s instead of 27.7 s, with the same metrics; four path frames 7.2-8.8 s instead of 11.2 s; exporting its
point cloud 82-88 s instead of 201 s (185 s of which had been system time); partitioning the demo scene 10.2-11.7 s
instead of 13.2 s.

The price is memory: a heap whose blocks vary in size fragments, and what it keeps is not given back. A review's
synthetic pattern of varying passes grew to 2-4x the default's peak. So a long run gives its free heap memory back
now and then (`give_back_freed`: the trainer does at each log line), keeping the reuse within those intervals. In
threads other than the main one glibc still maps blocks over 64 MiB one by one.
"""
from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's malloc.h
TRIM_THRESHOLD = 2 ** 31 - 1  # bytes free at the heap's top before it is given back: the largest mallopt takes


def c_library() -> ctypes.CDLL | None:
    """The process's C library where it can be glibc (Linux), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


def keep_freed_blocks(device: object = "cpu") -> bool:
    """Ask glibc to serve large blocks from its heap and keep freed memory for reuse (module docstring), when the
    stage's `device` (a torch.device or its name) is the CPU: on a GPU the host's temporaries are small. True when
    the C library took both settings; False, changing nothing, on a GPU or where it has no mallopt (not glibc)."""
    if str(device).split(":")[0] != "cpu":
        return False
    libc = c_library()
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1


def give_back_freed() -> None:
    """Return the heap's free memory to the operating system (glibc's malloc_trim), where there is such a call:
    what keep_freed_blocks kept is then faulted in again once, not every pass."""
    trim = getattr(c_library(), "malloc_trim", None)
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
        trim(0)
