"""Distributed helpers: sharding covers every item once, a single process needs no launcher, and under
torch.distributed.run (CPU) gathers arrive in rank order, every queue number goes to one rank, a failing rank's
error ends every rank at once, and a rank that dies silently is waited for only until the timeout."""
from __future__ import annotations

import datetime
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from mega_nerf.distributed import (
    DistInfo,
    barrier,
    broadcast_object,
    claim,
    gather_objects,
    init_distributed,
    shard,
)
from mega_nerf.errors import UserError

ROOT = Path(__file__).resolve().parents[1]

# argv: timeout minutes, then what rank 1 does: "ok", "fail" (raises a UserError) or "die" (exits silently)
WORKER = """
import os, sys
from mega_nerf.distributed import barrier, broadcast_object, claim, distributed_job, gather_objects, shard
from mega_nerf.errors import UserError, run_cli

def main():
    with distributed_job(float(sys.argv[1])) as info:
        if info.rank == 1 and sys.argv[2] == "fail":
            raise UserError("rank 1 fails on purpose")
        if info.rank == 1 and sys.argv[2] == "die":
            os._exit(3)
        barrier(info)
        taken = []
        while (n := claim(info, "q")) < 20:
            taken.append(n)
        gathered = gather_objects((info.rank, shard(list(range(7)), info), taken), info)
        message = broadcast_object("from rank 0" if info.is_main else None, info)
        print(f"RANK {info.rank} GOT {message}")
        if info.is_main:
            print("GATHERED", [g[:2] for g in gathered])
            print("CLAIMED", sorted(n for g in gathered for n in g[2]))

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
    assert broadcast_object("x", info) == "x"
    assert [claim(info, "q") for _ in range(3)] == [0, 1, 2]


def test_a_rank_not_launched_by_torchrun_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    with pytest.raises(UserError, match="torch.distributed.run"):
        init_distributed()


def worker_env() -> dict[str, str]:
    path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return {**os.environ, "PYTHONPATH": path, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


def run_workers(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                             "3", str(script), *args], env=worker_env(), capture_output=True, text=True, timeout=120)
    return result, time.monotonic() - start


def test_gather_broadcast_and_queue_under_torchrun(tmp_path: Path) -> None:
    result, _ = run_workers(tmp_path, "1", "ok")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "GATHERED [(0, [0, 3, 6]), (1, [1, 4]), (2, [2, 5])]" in result.stdout
    assert f"CLAIMED {list(range(20))}" in result.stdout  # every number to exactly one rank
    assert all(f"RANK {r} GOT from rank 0" in result.stdout for r in range(3))


def test_a_failing_rank_ends_every_rank_with_its_error(tmp_path: Path) -> None:
    """Ranks 0 and 2 wait at a barrier for rank 1, which raised: the job ends with rank 1's error well before
    the 10-minute timeout."""
    result, seconds = run_workers(tmp_path, "10", "fail")
    assert result.returncode != 0
    assert "error: rank 1 fails on purpose" in result.stderr
    assert seconds < 60


def run_as_across_nodes(tmp_path: Path, timeout_minutes: str, rank1: str) -> tuple[list[int], list[str], float]:
    """Three workers launched without torchrun's agent stopping the others when one fails (as on other nodes):
    this test hosts the job's store as the agent would. Returns exit codes, last stderr lines and seconds."""
    store = dist.TCPStore("127.0.0.1", 0, 1, True, timeout=datetime.timedelta(seconds=30))
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**worker_env(), "WORLD_SIZE": "3", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port),
           "TORCHELASTIC_USE_AGENT_STORE": "True"}
    start = time.monotonic()
    workers = [subprocess.Popen([sys.executable, str(script), timeout_minutes, rank1], env={**env, "RANK": str(r)},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(3)]
    errors = [w.communicate(timeout=60)[1].strip() for w in workers]
    return [w.returncode for w in workers], [e.splitlines()[-1] if e else "" for e in errors], \
        time.monotonic() - start


def test_a_failing_rank_reaches_ranks_torchrun_does_not_stop(tmp_path: Path) -> None:
    """Rank 1 raises; ranks 0 and 2, waiting with a 10-minute timeout, end at once with its error, one line."""
    codes, last, seconds = run_as_across_nodes(tmp_path, "10", "fail")
    assert codes == [2, 2, 2]
    assert last == ["error: rank 1 failed: rank 1 fails on purpose", "error: rank 1 fails on purpose",
                    "error: rank 1 failed: rank 1 fails on purpose"]
    assert seconds < 30


def test_a_silent_death_is_waited_for_until_the_timeout(tmp_path: Path) -> None:
    """Rank 1 exits without a word; ranks 0 and 2 give up at the 3 s timeout, naming rank 1."""
    codes, last, seconds = run_as_across_nodes(tmp_path, "0.05", "die")
    assert codes == [2, 3, 2]
    expected = ("error: waiting at barrier: no word from rank 1 within 0.05 minutes (--timeout_minutes); it died "
                "or is stuck, see its output")
    assert last == [expected, "", expected]
    assert 3 <= seconds < 30
