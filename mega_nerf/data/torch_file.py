"""A fast reader of small torch.save files of plain values (numbers, strings, lists, dicts and CPU tensors), beside
its reference, torch.load(weights_only=True) (io.load_torch).

A dataset's metadata is one such file per image, and every command reads them all: torch.load takes about 0.6 ms
a file, most of it in its Python unpickler and its checks, against about 0.1 ms here (C's unpickler, the tensors
rebuilt directly), 0.1-0.15 s of every start-up on a 256-image dataset and about a second on Mega-NeRF's
2,000-image ones. Only what such files hold is read here: the archive's pickle may name no function but the
tensor rebuild and the storage types below (as weights_only's allow-list, narrower), its tensors must be plain
(no gradient, no hooks) and little-endian; anything else, and every damaged file, goes to the reference, which
reads it or names what is wrong.
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import sys
import zipfile
from typing import Any

import torch

from mega_nerf.io import TORCH_LOAD_ERRORS, load_torch

STORAGES = {"FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
            "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
            "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
            "BoolStorage": torch.bool}


class _Unsupported(Exception):
    """Something the fast path leaves to the reference."""


def _rebuild_tensor(storage: torch.Tensor, offset: int, size: tuple[int, ...], stride: tuple[int, ...],
                    requires_grad: bool, hooks: dict, metadata: object = None) -> torch.Tensor:
    """torch._utils._rebuild_tensor_v2 for a plain tensor: a view of its storage (a 1-D tensor here)."""
    if requires_grad or hooks or metadata:
        raise _Unsupported
    return storage.as_strided(size, stride, offset)


class _Unpickler(pickle.Unpickler):
    """The archive's pickle, its storages read from the archive as 1-D tensors."""

    def __init__(self, archive: zipfile.ZipFile, prefix: str) -> None:
        super().__init__(io.BytesIO(archive.read(f"{prefix}data.pkl")))
        self.archive, self.prefix = archive, prefix

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in STORAGES:
            return STORAGES[name]
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        raise _Unsupported

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and pid[3] == "cpu"
                and isinstance(pid[1], torch.dtype)):
            raise _Unsupported
        _, dtype, key, _, numel = pid
        data = self.archive.read(f"{self.prefix}data/{key}")
        if len(data) != numel * dtype.itemsize:
            raise _Unsupported
        return torch.frombuffer(bytearray(data), dtype=dtype) if data else torch.empty(0, dtype=dtype)


def _load_fast(path: str | os.PathLike) -> Any:
    with zipfile.ZipFile(path) as archive:
        pickles = [name for name in archive.namelist() if name.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise _Unsupported
        prefix = pickles[0][:-len("data.pkl")]
        if archive.read(f"{prefix}byteorder").decode() != sys.byteorder:
            raise _Unsupported
        return _Unpickler(archive, prefix).load()


def load_plain(path: str | os.PathLike, what: str) -> Any:
    """What torch.load(weights_only=True) reads from `path` onto the CPU, read fast where the file holds only
    plain values (module docstring); io.load_torch otherwise, and its one-line UserError for a damaged file."""
    try:
        return _load_fast(path)
    except (_Unsupported, zipfile.BadZipFile, *TORCH_LOAD_ERRORS):
        return load_torch(path, what)
