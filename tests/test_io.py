"""Atomic writes (a failed write leaves the old file and no temp file, whatever byte the disk fills at), free-space
checks, operating-system errors as one line, atomic folders, images encoded in memory, torch files whose bytes do
not depend on their name, and one-line errors for unreadable torch files."""
from __future__ import annotations

import errno
import os
import re
import shutil
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import OTHER_HOST, dead_pid

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
    with pytest.raises(UserError, match=r"frame\.png: could not write \(no space left on device; \d+ bytes needed, "
                                        r"[\d,]+ free\)$"):
        io.write_png(path, np.zeros((4, 6, 3), np.uint8))
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["frame.png"]


def test_a_failing_writer_removes_its_temp_file(tmp_path: Path) -> None:
    with pytest.raises(ZeroDivisionError), io.atomic_open(tmp_path / "x.npy") as f:
        f.write(b"partial")
        _ = 1 / 0
    assert os.listdir(tmp_path) == []


def test_temp_files_are_named_after_the_process_and_host(tmp_path: Path) -> None:
    assert io.temp_path(tmp_path / "0.mask").name == f"0.mask.{os.getpid()}-{io.HOST}{io.TEMP_SUFFIX}"
    assert re.fullmatch(r"[0-9a-f]{8}", io.HOST)


def test_old_temp_files_of_other_hosts_are_reported(tmp_path: Path) -> None:
    """Another host's (or container's) temp files are never removed here; those untouched for an hour are named in
    one note, with their bytes; fresh ones (a write under way), this host's and other files' are not."""
    hour_ago = time.time() - io.FOREIGN_TEMP_SECONDS - 60
    for name, size, old in [(f"store.rgb.7-{OTHER_HOST}.tmp", 1000, True),
                            (f"store.rgb.8-{OTHER_HOST}.tmp", 500, False), (f"ckpt.pt.9-{OTHER_HOST}.tmp", 20, True),
                            (f"store.rgb.7-{io.HOST}.tmp", 5, True), ("store.rgb", 7, True)]:
        (tmp_path / name).write_bytes(b"x" * size)
        if old:
            os.utime(tmp_path / name, (hour_ago, hour_ago))
    assert io.remove_temp_files_of(tmp_path / "store.rgb") == (
        f"note: {tmp_path} holds 1 temp file(s) of runs on other hosts or containers, untouched for over 1 h (1,000 "
        f"bytes; e.g. store.rgb.7-{OTHER_HOST}.tmp): delete them once no run writes there")
    assert io.remove_temp_files(tmp_path) == (
        f"note: {tmp_path} holds 2 temp file(s) of runs on other hosts or containers, untouched for over 1 h (1,020 "
        f"bytes; e.g. ckpt.pt.9-{OTHER_HOST}.tmp): delete them once no run writes there")
    assert io.remove_temp_files_of(tmp_path / "other") is None and io.remove_temp_files(tmp_path / "missing") is None
    foreign = {f"store.rgb.7-{OTHER_HOST}.tmp", f"store.rgb.8-{OTHER_HOST}.tmp", f"ckpt.pt.9-{OTHER_HOST}.tmp"}
    assert foreign <= set(os.listdir(tmp_path))  # never removed here


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


WRITERS = {
    "png": lambda path: io.write_png(path, np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)),
    "torch": lambda path: io.save_torch_atomic({"w": torch.arange(300.0)}, path),
    "bytes": lambda path: io.atomic_write(path, bytes(range(256)) * 4),
}


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_a_disk_full_at_any_byte_leaves_the_old_file_or_none(tmp_path: Path, full_disk, kind: str) -> None:
    """The stub fills the disk after `capacity` bytes; whatever the byte, the final name holds the old
    content (or nothing, for a new file), no temp file stays, and the error is one line naming the file."""
    WRITERS[kind](tmp_path / "whole.png")
    size = (tmp_path / "whole.png").stat().st_size
    for capacity in range(0, size, max(1, size // 17)):
        full_disk(capacity)
        for name, old in (("new", None), ("old", b"old content")):
            path = tmp_path / f"{name}{capacity}.png"
            if old is not None:
                path.write_bytes(old)
            with pytest.raises(UserError) as error:
                WRITERS[kind](path)
            assert str(error.value).startswith(f"{path}: could not write (no space left on device")
            assert "\n" not in str(error.value)
            assert (path.read_bytes() == old) if old is not None else not path.exists()
        assert sorted(p.name for p in tmp_path.iterdir() if ".tmp" in p.name) == []


def test_free_space_is_checked_before_a_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = shutil.disk_usage
    monkeypatch.setattr(io.shutil, "disk_usage", lambda path: real(path)._replace(free=1000))
    with pytest.raises(UserError, match=r"big\.pt: not enough disk space \(4,000 bytes needed, 1,000 free\)$"):
        io.save_torch_atomic({"w": torch.zeros(1000)}, tmp_path / "big.pt")
    assert os.listdir(tmp_path) == []
    io.atomic_write(tmp_path / "small", b"x" * 999)


def test_os_errors_are_one_line_in_words(tmp_path: Path) -> None:
    (tmp_path / "folder").mkdir()
    with pytest.raises(UserError, match=r"folder: could not write \(it is a directory\)$"):
        io.atomic_write(tmp_path / "folder", b"data")
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(UserError, match=r"file/x\.png: could not write \(a folder above it is a file\)$"):
        io.atomic_write(tmp_path / "file" / "x.png", b"data")
    assert sorted(os.listdir(tmp_path)) == ["file", "folder"] and os.listdir(tmp_path / "folder") == []


def test_a_short_write_never_passes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file system that says a write went through but stored less (the length on disk is checked)."""
    real_fstat = os.fstat
    monkeypatch.setattr(io.os, "fstat", lambda fd: os.stat_result((*real_fstat(fd)[:6], 3, *real_fstat(fd)[7:])))
    with pytest.raises(UserError, match=r"x\.bin: could not write \(no space left on device; 10 bytes needed"):
        io.atomic_write(tmp_path / "x.bin", b"0123456789")
    assert os.listdir(tmp_path) == []


def test_atomic_folder_appears_whole_or_not_at_all(tmp_path: Path) -> None:
    with pytest.raises(ZeroDivisionError), io.atomic_folder(tmp_path / "out") as folder:
        (folder / "half").write_bytes(b"x")
        _ = 1 / 0
    assert os.listdir(tmp_path) == []
    dead = dead_pid()
    stale = tmp_path / f"out.{dead}.tmp"  # a killed run's folder: its process is gone
    stale.mkdir()
    with io.atomic_folder(tmp_path / "out") as folder:
        (folder / "whole").write_bytes(b"x")
    assert os.listdir(tmp_path) == ["out"] and os.listdir(tmp_path / "out") == ["whole"]


def test_free_memory_is_a_cuda_devices_own_else_the_hosts(monkeypatch: pytest.MonkeyPatch) -> None:
    """The one helper behind the render's and the export's memory checks (camera_path.check_frame_size,
    export.check_export_memory): CUDA's free memory for a CUDA device (stubbed: no GPU here), available_memory
    for any other, each named as the checks' messages name it."""
    monkeypatch.setattr(io, "available_memory", lambda: 3)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (5, 8))
    assert io.free_memory(torch.device("cpu")) == ("memory", 3)
    assert io.free_memory(torch.device("cuda", 1)) == ("GPU memory", 5)


def test_memory_shortfall_adds_the_pools_on_a_cpu_and_splits_them_on_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """memory_shortfall (behind the render's, the export's and the partition's checks): on a CPU the host's and
    the work's bytes share one pool; on a CUDA device (stubbed) each is held against its own, the host's first."""
    monkeypatch.setattr(io, "available_memory", lambda: 10)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (5, 8))
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert io.memory_shortfall(cpu, 6, 4) is None
    assert io.memory_shortfall(cpu, 6, 5) == ("memory", 11, 10)
    assert io.memory_shortfall(cuda, 10, 5) is None
    assert io.memory_shortfall(cuda, 10, 6) == ("GPU memory", 6, 5)
    assert io.memory_shortfall(cuda, 11, 6) == ("memory", 11, 10)
    monkeypatch.setattr(io, "available_memory", lambda: None)  # a system that does not say: no refusal
    assert io.memory_shortfall(cpu, 10 ** 15, 10 ** 15) is None


def test_stale_temp_files_of_dead_runs_only_are_removed(tmp_path: Path) -> None:
    """Dead processes' temp files of this host go (and older runs' names, without a host); a live process's, and
    another host's (a shared disk: its process cannot be checked from here), stay."""
    dead = dead_pid()
    names = [f"a.png.{dead}-{io.HOST}.tmp", f"video.mp4.{dead}-{io.HOST}.tmp.mp4", f"old.png.{dead}.tmp",
             f"b.png.{os.getpid()}-{io.HOST}.tmp", f"c.png.{dead}-{OTHER_HOST}.tmp", "c.png"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    io.remove_temp_files(tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted(names[3:])


def test_a_files_own_stale_temp_files_only_are_removed(tmp_path: Path) -> None:
    """remove_temp_files_of leaves the folder's other files alone, stale temp files of other names included."""
    dead = dead_pid()
    target = tmp_path / "merged.pt"
    names = [f"merged.pt.{dead}-{io.HOST}.tmp", f"merged.pt.{dead}.tmp", f"merged.pt.{os.getpid()}-{io.HOST}.tmp",
             f"merged.pt.bak.{dead}-{io.HOST}.tmp", f"other.pt.{dead}-{io.HOST}.tmp", "merged.pt.notes"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    io.remove_temp_files_of(target)
    assert sorted(os.listdir(tmp_path)) == sorted(names[2:])
    io.remove_temp_files_of(tmp_path / "missing" / "x.pt")  # no folder: nothing to do
