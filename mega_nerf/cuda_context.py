"""The CUDA driver's primary context, made on a thread while a command still imports torch.

A process's first CUDA call makes the device's primary context (0.23-0.32 s on an H200 machine, bench/RESULTS.md,
twenty-sixth session), and PyTorch makes it only once the command asks for the GPU, after 1.2-2 s of imports. Made
here through the driver API (ctypes releases the GIL for each call, so the imports go on beside it), the context is
ready by then and PyTorch's runtime binds it: the runtime and the driver share one primary context per device.

No torch here: this module runs before torch is imported (errors.run_command).
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

CUDA_SUCCESS = 0


@dataclass(frozen=True)
class Pick:
    """How a command picks its GPU: by rank (distributed's pick: the local rank modulo the GPUs visible) or the
    first visible (torch's current device: a lone run), and whether a --device option may name another."""

    by_rank: bool
    device_option: bool


PARTITION = Pick(by_rank=True, device_option=False)
TRAIN = Pick(by_rank=False, device_option=True)
TRAIN_CELLS = Pick(by_rank=True, device_option=True)


def local_rank() -> int | None:
    """The local rank distributed.init_distributed will find (0 when the job runs alone); None for a variable that
    is not an integer (init_distributed reports it)."""
    env = os.environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return 0
    try:
        return int(env.get("LOCAL_RANK", env["RANK"]))
    except ValueError:
        return None


def job_gpu(argv: Sequence[str], pick: Pick) -> tuple[int, bool] | None:
    """The GPU a command given the words `argv` will run on, read before they are parsed, and whether it is named
    (else the ordinal is to be taken modulo the GPUs visible): the last `--device cuda:N` (argparse takes an
    unambiguous prefix of the option's name), else `pick`. None where the words alone cannot tell it for sure:
    another device named (cpu), a config file that mentions a device (or could hide the word in an escape) or
    cannot be read, a rank that is not an integer. The option parser reports bad words."""
    named: str | None = None
    for i, word in enumerate(argv if pick.device_option else ()):
        name, equals, value = word.partition("=")
        value = value if equals else argv[i + 1] if i + 1 < len(argv) else ""
        if len(name) >= len("--dev") and "--device".startswith(name):
            named = value
        elif len(name) >= len("--c") and ("--config_file".startswith(name) or "--config".startswith(name)):
            try:
                text = Path(value).read_text(errors="replace")
            except OSError:
                return None
            if "device" in text or "\\" in text:
                return None
    if named is None or named == "cuda":
        rank = local_rank() if pick.by_rank else 0
        return None if rank is None else (rank, False)
    index = re.fullmatch(r"cuda:(0|[1-9][0-9]*)", named)
    return None if index is None else (int(index.group(1)), True)


def torch_has_cuda() -> bool:
    """Whether the installed torch is a CUDA build (its CUDA library is there), found without importing it."""
    spec = importlib.util.find_spec("torch")
    return spec is not None and spec.origin is not None and any(
        (Path(spec.origin).parent / "lib").glob("libtorch_cuda.*"))


def make_context_early(argv: Sequence[str], pick: Pick) -> threading.Thread | None:
    """Start, on a daemon thread, the primary context of the GPU a command given the words `argv` will use
    (`job_gpu`; a GPU named but not visible gets none). None where there is no CUDA driver, torch is a CPU build,
    or the words do not tell the GPU for sure; any other failure (no device, CUDA_VISIBLE_DEVICES empty) leaves the
    thread with nothing done, for PyTorch to meet and report. (A driver too old for torch's CUDA still gets its
    context, which then idles while the job runs on the CPU.) CUDA_MODULE_LOADING is set as PyTorch sets it before
    its own first CUDA call (LAZY unless given): the driver reads it once, here."""
    gpu = job_gpu(argv, pick)
    if gpu is None or not torch_has_cuda():
        return None
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    os.environ.setdefault("CUDA_MODULE_LOADING", "LAZY")
    thread = threading.Thread(target=_retain_primary_context, args=(driver, gpu), name="cuda-context", daemon=True)
    thread.start()
    return thread


def _retain_primary_context(driver: ctypes.CDLL, gpu: tuple[int, bool]) -> None:
    ordinal, named = gpu
    count, device, context = ctypes.c_int(), ctypes.c_int(), ctypes.c_void_p()
    if (driver.cuInit(0) != CUDA_SUCCESS or driver.cuDeviceGetCount(ctypes.byref(count)) != CUDA_SUCCESS
            or count.value < 1 or (named and ordinal >= count.value)
            or driver.cuDeviceGet(ctypes.byref(device), ordinal % count.value) != CUDA_SUCCESS):
        return
    driver.cuDevicePrimaryCtxRetain(ctypes.byref(context), device)  # kept for the process's life, as PyTorch keeps it
