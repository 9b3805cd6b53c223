"""Shared fixtures: the tiny synthetic city and the tiny oblique survey, generated once per test session, a
launcher that runs a stage on several ranks with a test hook, and a full disk stub for the files mega_nerf.io
writes."""
from __future__ import annotations

import builtins
import datetime
import errno
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist

import mega_nerf.errors
import mega_nerf.io
from mega_nerf.synthetic import generate_city

# Commands run in this process end with a SystemExit the tests can catch, never by ending pytest (errors.end_process);
# those the tests start as subprocesses keep the quick exit.
mega_nerf.errors.QUICK_EXIT = False


# Another host's (or container's) tag in temp names and locks: one that is not this process's io.HOST
OTHER_HOST = "0badc0de" if mega_nerf.io.HOST != "0badc0de" else "0badc0df"


def dead_pid() -> int:
    """The process ID of a process that has ended: what a run killed mid-write leaves in its temp files and locks."""
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)


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
def street_city(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 'street_tiny' preset: eye-level views along the streets of a 2x2-block town in farmland and hills."""
    return _generate(tmp_path_factory, "street_tiny")


@pytest.fixture(scope="session")
def oblique_summary(oblique_city: Path) -> dict:
    """generate_city's summary of `oblique_city`, as saved in its scene.json."""
    return json.loads((oblique_city / "scene.json").read_text())


ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Ranks:
    """How the ranks of one launch ended: exit codes, stderr and stdout per rank (one entry for all ranks
    under torchrun, whose output is interleaved), and the launch's wall time."""

    codes: list[int]
    stderr: list[str]
    stdout: list[str]
    seconds: float

    def last_error_lines(self) -> list[str]:
        return [err.strip().splitlines()[-1] if err.strip() else "" for err in self.stderr]


def time_line(stdout: str, command: str, ranks: int) -> tuple[str, float, dict[str, float]]:
    """A command's line of where its time went (mega_nerf.clock.PartsClock.summary; rank 0's under several ranks):
    the line, its total and its parts in order, checked to add up to the total."""
    line = next(x for x in stdout.splitlines() if x.startswith(f"{command}: "))
    on = " on rank 0" if ranks > 1 else ""
    total, parts = re.fullmatch(rf"{command}: ([\d.]+) s{on}: (.*)", line).groups()
    seconds = {name: float(value) for name, value in re.findall(r"([a-z -]+) ([\d.]+) s(?: \([^)]*\))?(?:, |$)",
                                                                 parts)}
    assert sum(seconds.values()) == pytest.approx(float(total), abs=0.03)
    return line, float(total), seconds


def _worker_env() -> dict[str, str]:
    path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return {**os.environ, "PYTHONPATH": path, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


def launch_ranks(script: Path, args: list[object], nproc: int = 2, agent: bool = True,
                 launcher: str = "torch.distributed.run") -> Ranks:
    """Run `script args` on `nproc` ranks under `launcher` (torchrun, or mega_nerf.cli.launch), or (agent=False)
    as separate processes around a store this function hosts as torchrun's agent would, so that no launcher stops
    the other ranks when one fails (as on other nodes)."""
    args = [str(script), *map(str, args)]
    start = time.monotonic()
    if agent:
        r = subprocess.run([sys.executable, "-m", launcher, "--standalone", "--nproc_per_node",
                            str(nproc), *args], env=_worker_env(), cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
        return Ranks([r.returncode], [r.stderr], [r.stdout], time.monotonic() - start)
    store = dist.TCPStore("127.0.0.1", 0, 1, True, timeout=datetime.timedelta(seconds=60))
    env = {**_worker_env(), "WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port),
           "TORCHELASTIC_USE_AGENT_STORE": "True"}
    workers = [subprocess.Popen([sys.executable, *args], env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for rank in range(nproc)]
    outputs = [w.communicate(timeout=300) for w in workers]
    return Ranks([w.returncode for w in workers], [e for _, e in outputs], [o for o, _ in outputs],
                 time.monotonic() - start)


@pytest.fixture
def launch_script() -> Callable[..., Ranks]:
    """launch_ranks, for tests that bring their own worker script."""
    return launch_ranks


@pytest.fixture
def launch() -> Callable[..., Ranks]:
    """launch(stage, options, hook=(rank, kind, trigger), nproc=2, agent=True, launcher=torchrun): a stage
    (partition, eval, cells) run as its command runs it with tests/stage_worker.py's test hook, on ranks started by
    launch_ranks."""
    def run(stage: str, options: list[object], hook: tuple[int, str, str] = (-1, "none", "0"), nproc: int = 2,
            agent: bool = True, launcher: str = "torch.distributed.run") -> Ranks:
        return launch_ranks(ROOT / "tests" / "stage_worker.py", [stage, *hook, *options], nproc, agent, launcher)
    return run


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
