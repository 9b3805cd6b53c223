"""Atomic writes (a failed write leaves the old file and no temp file), images encoded in memory, torch files
whose bytes do not depend on their name, and one-line errors for unreadable torch files."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from mega_nerf import io
from mega_nerf.errors import UserError


def test_atomic_write_creates_folders_and_leaves_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "file.bin"
    io.atomic_write(path, b"first")
    io.atomic_write(path, b"second")
    assert path.read_bytes() == b"second" and os.listdir(path.parent) == ["file.bin"]


def test_full_disk_keeps_the_old_file_and_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "frame.png"
    io.atomic_write(path, b"old")

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(UserError, match=r"frame\.png: could not write \(No space left on device\)$"):
        io.write_png(path, np.zeros((4, 6, 3), np.uint8))
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["frame.png"]


def test_a_failing_writer_removes_its_temp_file(tmp_path: Path) -> None:
    with pytest.raises(ZeroDivisionError), io.atomic_open(tmp_path / "x.npy") as f:
        f.write(b"partial")
        _ = 1 / 0
    assert os.listdir(tmp_path) == []


def test_temp_files_are_named_after_the_process(tmp_path: Path) -> None:
    assert io.temp_path(tmp_path / "0.mask").name == f"0.mask.{os.getpid()}{io.TEMP_SUFFIX}"


def test_png_round_trip_and_unencodable_suffix(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    io.write_png(tmp_path / "x.png", rgb)
    assert np.array_equal(cv2.imread(str(tmp_path / "x.png"))[:, :, ::-1], rgb)
    with pytest.raises(UserError, match=r"x\.nope: could not encode a 7x5 image as '\.nope'"):
        io.write_png(tmp_path / "x.nope", rgb)
    assert not (tmp_path / "x.nope").exists()


def test_torch_files_depend_on_their_content_only(tmp_path: Path) -> None:
    state = {"step": 3, "table": torch.arange(6.0)}
    io.save_torch_atomic(state, tmp_path / "a.pt")
    io.save_torch_atomic(state, tmp_path / "b.pt")
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()
    loaded = io.load_torch(tmp_path / "a.pt", "checkpoint")
    assert loaded["step"] == 3 and torch.equal(loaded["table"], state["table"])


@pytest.mark.parametrize("damage", ["empty", "foreign", "truncated", "missing"])
def test_unreadable_torch_file_is_one_line(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "c.pt"
    io.save_torch_atomic({"x": torch.ones(1000)}, path)
    data = path.read_bytes()
    if damage == "missing":
        path.unlink()
    else:
        path.write_bytes({"empty": b"", "foreign": b"not torch", "truncated": data[: len(data) // 2]}[damage])
    with pytest.raises(UserError, match=r"c\.pt: unreadable or truncated checkpoint \(\w+\)$") as error:
        io.load_torch(path, "checkpoint")
    assert "\n" not in str(error.value)
