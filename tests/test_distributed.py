"""Distributed helpers: sharding covers every item once, a single process needs no launcher, and under
torch.distributed.run (gloo, CPU) gathers arrive in rank order and a failing rank ends the job quickly."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mega_nerf.distributed import DistInfo, barrier, cleanup, gather_objects, init_distributed, shard

ROOT = Path(__file__).resolve().parents[1]

WORKER = """
import sys, time
from mega_nerf.distributed import barrier, cleanup, gather_objects, init_distributed, shard
from mega_nerf.errors import run_cli
def main():
    info = init_distributed(timeout_minutes=float(sys.argv[1]))
    if sys.argv[2] == "fail" and info.rank == 1:
        raise RuntimeError("rank 1 fails on purpose")
    if sys.argv[2] == "stall" and info.rank == 1:
        time.sleep(300)
    barrier(info)
    gathered = gather_objects((info.rank, shard(list(range(7)), info)), info)
    if info.is_main:
        print("GATHERED", gathered)
    cleanup(info)
run_cli(main)
"""


@pytest.mark.parametrize("world_size, count", [(1, 5), (3, 10), (4, 2), (8, 0)])
def test_shard_covers_every_item_once(world_size: int, count: int) -> None:
    items = [f"image{i}" for i in range(count)]
    shares = [shard(items, DistInfo(r, world_size, r, torch.device("cpu"))) for r in range(world_size)]
    assert sorted(sum(shares, [])) == sorted(items)
    assert max(map(len, shares)) - min(map(len, shares)) <= 1  # idle ranks only when world > items


def test_single_process_without_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    info = init_distributed()
    assert (info.rank, info.world_size, info.is_main, info.is_distributed) == (0, 1, True, False)
    barrier(info)
    assert gather_objects({"a": 1}, info) == [{"a": 1}]
    cleanup(info)


def run_workers(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "PYTHONPATH": path, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                             "3", str(script), *args], env=env, capture_output=True, text=True, timeout=120)
    return result, time.monotonic() - start


def test_gather_under_torchrun_in_rank_order(tmp_path: Path) -> None:
    result, _ = run_workers(tmp_path, "1", "ok")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "GATHERED [(0, [0, 3, 6]), (1, [1, 4]), (2, [2, 5])]" in result.stdout


def test_a_failing_rank_ends_the_job(tmp_path: Path) -> None:
    """Ranks 0 and 2 wait at a barrier for rank 1, which raised: the job must end with an error well before
    the 10-minute timeout (torchrun tears the group down)."""
    result, seconds = run_workers(tmp_path, "10", "fail")
    assert result.returncode != 0
    assert "rank 1 fails on purpose" in result.stderr
    assert seconds < 60


def test_a_stalled_rank_is_named_in_one_line(tmp_path: Path) -> None:
    """Rank 1 stops answering (it sleeps): after the 3-second timeout rank 0 stops with one line naming it."""
    result, seconds = run_workers(tmp_path, "0.05", "stall")
    assert result.returncode != 0
    assert "error: rank 0: rank 1 stopped answering at a barrier within --timeout_minutes 0.05 (" in result.stderr
    assert seconds < 60
