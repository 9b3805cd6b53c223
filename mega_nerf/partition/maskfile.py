"""Cluster mask files: one boolean H x W mask per image per cell, `<masks>/<k>/<stem>.mask`.

Our format (`.mask`), little-endian:
    bytes 0..7    magic b"MNMASK01"
    bytes 8..11   H (uint32)
    bytes 12..15  W (uint32)
    bytes 16..    zlib-compressed bits of the row-major mask, 8 pixels a byte, first pixel in the lowest bit
                  (numpy.packbits(..., bitorder="little"); the last byte is padded with zeros)
Files are written atomically (io.atomic_write: a temp file named after the process in the same folder, then
os.replace), so a killed run never leaves a half-written mask. Each file is fsynced before its rename; the
folder's fsync, which makes the renames survive a crash of the machine, is the writer's, once for all its masks
(`sync_mask_folders`): a mask lost that way is only missing, and a resumed run writes it again. Readers also
accept Mega-NeRF's published format: `<stem>.pt`, a zip archive holding one member `<stem>.pt`, a torch-saved
bool (H, W) tensor.
"""
from __future__ import annotations

import io
import os
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from mega_nerf.errors import UserError
from mega_nerf.io import TEMP_SUFFIX, TORCH_LOAD_ERRORS, atomic_write, sync_folder

MAGIC = b"MNMASK01"
HEADER = struct.Struct("<8sII")
SUFFIX = ".mask"
MEGA_NERF_SUFFIX = ".pt"
# zlib's fastest level: survey256's 1,024 masks encoded in 0.061 s against level 6's 0.128 s on an H200 machine's
# CPU, 0.57 MB against 0.42 MB in all (bench/RESULTS.md, twenty-sixth session). Any level reads back the same.
ZLIB_LEVEL = 1


def encode_mask(mask: torch.Tensor) -> bytes:
    """(H, W) bool -> the bytes of a `.mask` file."""
    H, W = mask.shape
    bits = np.packbits(mask.cpu().numpy().reshape(-1), bitorder="little")
    return HEADER.pack(MAGIC, H, W) + zlib.compress(bits.tobytes(), ZLIB_LEVEL)


def decode_mask(data: bytes) -> torch.Tensor:
    """The bytes of a `.mask` file -> (H, W) bool; ValueError when they are not one."""
    if len(data) < HEADER.size:
        raise ValueError("shorter than the header")
    magic, H, W = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ValueError("not a mask file (bad magic)")
    bits = np.frombuffer(zlib.decompress(data[HEADER.size:]), np.uint8)
    if bits.size != (H * W + 7) // 8:
        raise ValueError(f"{bits.size} bytes of bits for a {H}x{W} mask")
    return torch.from_numpy(np.unpackbits(bits, count=H * W, bitorder="little").astype(bool).reshape(H, W))


def write_mask(path: Path, mask: torch.Tensor) -> None:
    """Write (H, W) bool `mask` to `path` atomically (the temp file is named after this process); the folder is
    left to `sync_mask_folders`."""
    atomic_write(path, encode_mask(mask), sync_parent=False)


def sync_mask_folders(output: Path, num_cells: int) -> None:
    """fsync every cell's folder once its masks are written (write_mask)."""
    for k in range(num_cells):
        sync_folder(output / str(k))


def remove_stale_temp_files(mask_dir: Path) -> None:
    """Delete temp files a killed run left behind in one cell's folder (older runs hid them behind a dot)."""
    for p in mask_dir.glob(f"*{TEMP_SUFFIX}"):
        p.unlink(missing_ok=True)


def _read_mega_nerf(path: Path) -> torch.Tensor:
    with zipfile.ZipFile(path) as zf:
        member = zf.read(path.name)  # KeyError when the archive lacks '<stem>.pt'
    mask = torch.load(io.BytesIO(member), map_location="cpu", weights_only=True)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 2:
        raise ValueError("the archive's tensor is not a 2D bool mask")
    return mask


def read_mask(path: Path) -> torch.Tensor:
    """(H, W) bool from a `.mask` file or Mega-NeRF's zipped `.pt`; UserError naming the file otherwise."""
    try:
        if path.suffix == MEGA_NERF_SUFFIX:
            return _read_mega_nerf(path)
        return decode_mask(path.read_bytes())
    except (*TORCH_LOAD_ERRORS, zipfile.BadZipFile, zlib.error) as e:  # what the two readers raise on bad bytes
        raise UserError(f"{path}: unreadable mask ({type(e).__name__}: {e})") from None


def find_mask(mask_dir: Path, name: str) -> Path | None:
    """The mask file of image `name` in one cell's folder (ours first, then Mega-NeRF's), or None."""
    for suffix in (SUFFIX, MEGA_NERF_SUFFIX):
        path = mask_dir / f"{name}{suffix}"
        if path.is_file():
            return path
    return None


def mask_shape(path: Path) -> tuple[int, int]:
    """(H, W) of a mask file; reads only the header of our format."""
    if path.suffix == SUFFIX:
        with open(path, "rb") as f:
            head = f.read(HEADER.size)
        if len(head) == HEADER.size and head[:len(MAGIC)] == MAGIC:
            return HEADER.unpack(head)[1:]
    return tuple(read_mask(path).shape)  # type: ignore[return-value]


def load_mask(mask_dir: str | os.PathLike, name: str, H: int, W: int) -> torch.Tensor:
    """Image `name`'s (H, W) bool mask for one cell (`mask_dir` = `<masks>/<k>`), in either format.

    UserError naming the file when it is missing, unreadable, or of another size (a mask folder made from
    another dataset or at another scale).
    """
    mask_dir = Path(mask_dir)
    path = find_mask(mask_dir, name)
    if path is None:
        raise UserError(f"{mask_dir / (name + SUFFIX)}: mask missing (nor is there a Mega-NeRF '{name}.pt')")
    mask = read_mask(path)
    if tuple(mask.shape) != (H, W):
        raise UserError(f"{path}: mask is {mask.shape[1]}x{mask.shape[0]} but image '{name}' is {W}x{H} "
                        "(masks made from another dataset or scale?)")
    return mask


def missing_masks(output: Path, sizes: dict[str, tuple[int, int]], num_cells: int) -> list[str]:
    """Every (cell, image) whose mask is absent or of the wrong size, as readable strings."""
    problems = []
    for k in range(num_cells):
        for name, (H, W) in sizes.items():
            path = find_mask(output / str(k), name)
            if path is None:
                problems.append(f"{output / str(k) / (name + SUFFIX)} missing")
            elif mask_shape(path) != (H, W):
                problems.append(f"{path} is not {W}x{H}")
    return problems
