"""Shared fixtures: the tiny synthetic city and the tiny oblique survey, generated once per test session; a full
disk stub for the files mega_nerf.io writes."""
from __future__ import annotations

import builtins
import errno
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import mega_nerf.io
from mega_nerf.synthetic import generate_city


def _generate(tmp_path_factory: pytest.TempPathFactory, preset: str) -> Path:
    """A dataset of `preset`, seed 0, rendered on the CPU (with depth, config and overview)."""
    path = tmp_path_factory.mktemp("synthetic") / preset
    generate_city(path, preset, seed=0, device="cpu", progress=False)
    return path


@pytest.fixture(scope="session")
def tiny_city(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 'tiny' preset: a 2x2-block city flown over at 25 m."""
    return _generate(tmp_path_factory, "tiny")


@pytest.fixture(scope="session")
def tiny_city_summary(tiny_city: Path) -> dict:
    """generate_city's summary of `tiny_city`, as saved in its scene.json."""
    return json.loads((tiny_city / "scene.json").read_text())


@pytest.fixture(scope="session")
def oblique_city(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 'oblique_tiny' preset: a 2x2-block town seen through 80 degree lenses pitched 30-60 degrees down."""
    return _generate(tmp_path_factory, "oblique_tiny")


@pytest.fixture(scope="session")
def oblique_summary(oblique_city: Path) -> dict:
    """generate_city's summary of `oblique_city`, as saved in its scene.json."""
    return json.loads((oblique_city / "scene.json").read_text())


class FullDisk:
    """A disk stub for `mega_nerf.io`: every file it opens for writing shares `capacity` bytes; a write past it
    stores what still fits and raises ENOSPC, as a real full disk does."""

    def __init__(self, capacity: int) -> None:
        self.left = capacity

    def open(self, path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        f = builtins.open(path, mode, *args, **kwargs)
        return _FullFile(f, self) if "w" in mode or "a" in mode else f


class _FullFile:
    def __init__(self, f: Any, disk: FullDisk) -> None:
        self.f, self.disk = f, disk

    def write(self, data: Any) -> int:
        data = memoryview(data).cast("B")
        n = min(len(data), self.disk.left)
        self.f.write(data[:n])
        self.disk.left -= n
        if n < len(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return n

    def __getattr__(self, name: str) -> Any:
        return getattr(self.f, name)

    def __enter__(self) -> _FullFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.f.close()


@pytest.fixture
def full_disk(monkeypatch: pytest.MonkeyPatch) -> Callable[[int], None]:
    """Call with a byte count: from then on the files `mega_nerf.io` writes share that many bytes."""
    def fill(capacity: int) -> None:
        monkeypatch.setattr(mega_nerf.io, "open", FullDisk(capacity).open, raising=False)
    return fill
