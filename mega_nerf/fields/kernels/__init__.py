"""Triton kernels, each beside the plain PyTorch reference that defines what it computes (docs/DESIGN.md, Kernels).

`MEGA_NERF_NO_TRITON=1` in the environment turns every kernel off: `available()` then answers False and the
references run, to rule the kernels out when an image looks wrong or a run crashes on the GPU. The
variable is read once, when this package is imported (`ENABLED`). `references_only()` does the same for one block
of one thread (the trainer's warm-up).
"""
import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from mega_nerf.fields.kernels import installation_key

try:
    import triton
except ImportError:  # CPU-only installs: the references run
    triton = None

ENABLED = os.environ.get("MEGA_NERF_NO_TRITON", "") != "1"


_this_thread = threading.local()  # .references: this thread runs the references (references_only)


def available(x: torch.Tensor) -> bool:
    """Whether the kernels can run on `x`: Triton installed, `x` on a GPU, kernels not switched off (for the
    process, or for this thread by references_only)."""
    return ENABLED and triton is not None and x.is_cuda and not getattr(_this_thread, "references", False)


@contextlib.contextmanager
def references_only() -> Iterator[None]:
    """Within this block, on this thread alone, the references run instead of the kernels (the trainer's warm-up
    runs its first pass so while Triton's one-time work goes on: training.step.warm_up_in_background)."""
    before = getattr(_this_thread, "references", False)
    _this_thread.references = True
    try:
        yield
    finally:
        _this_thread.references = before


def prepare_in_background(folder: Path | None = None) -> threading.Thread | None:
    """Start, on a daemon thread, the one-time work that Triton does at a process's first kernel launch whatever
    the kernel: hashing its own installation into its cache key (memoised per process) and importing the compiler
    modules that specialisation asks for. With warm caches these were 0.36 s and 0.11 s of a 1.5 s first training
    step on an H200 machine (bench/RESULTS.md, twelfth session); begun before the dataset and the model are set
    up, they overlap that work (the hashing and its file reads release the GIL; the imports hold it).

    The hash is kept on disk under a fingerprint of the installation (`installation_key`, in `folder`, by default
    the user's cache): where a kept one matches, Triton is handed it here, before any launch, and the thread only
    imports; else the thread hashes and keeps the hash for the next process. None where the kernels are off or
    Triton is absent or lacks that key."""
    if not ENABLED:
        return None
    try:
        from triton.runtime.cache import triton_key
    except ImportError:
        try:  # where Triton 3.2 and older keep it
            from triton.compiler.compiler import triton_key
        except ImportError:
            return None
    path = installation_key.key_path(installation_key.default_folder() if folder is None else folder, triton)
    key = None if path is None else installation_key.kept_key(path)
    if key is not None:
        installation_key.hand_over(triton_key, key)
    thread = threading.Thread(target=_prepare, args=(None if key else triton_key, path), name="triton-prepare",
                              daemon=True)
    thread.start()
    return thread


def _prepare(triton_key: Callable[[], str] | None, path: Path | None) -> None:
    """Hash Triton's installation unless its key was handed over (`triton_key` None), keeping the hash at `path`
    where there is one; then import the compiler modules. Only a head start: any failure here is left for the
    first kernel launch to meet and report."""
    with contextlib.suppress(Exception):
        if triton_key is not None:
            key = triton_key()
            if path is not None:
                installation_key.keep_key(path, key)
        import triton.experimental.gluon  # noqa: F401
