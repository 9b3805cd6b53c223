"""Distributed helpers: sharding covers every item once, a single process needs no launcher, and under
torch.distributed.run (CPU) gathers arrive in rank order, every queue number goes to one rank, a failing rank's
error ends every rank at once, and a rank that dies silently is waited for only until the timeout."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

from mega_nerf.distributed import (
    DistInfo,
    barrier,
    broadcast_object,
    claim,
    gather_objects,
    init_distributed,
    shard,
    single_host,
)
from mega_nerf.errors import UserError

if TYPE_CHECKING:
    from conftest import Ranks

# argv: timeout minutes, then what rank 1 does: "ok", "fail" (raises a UserError), "die" (exits silently) or
# "stall" (stops answering, alive)
WORKER = """
import os, sys, time
from mega_nerf.distributed import barrier, broadcast_object, claim, distributed_job, gather_objects, shard
from mega_nerf.errors import UserError, run_cli

def main():
    with distributed_job(float(sys.argv[1])) as info:
        if info.rank == 1 and sys.argv[2] == "fail":
            raise UserError("rank 1 fails on purpose")
        if info.rank == 1 and sys.argv[2] == "die":
            os._exit(3)
        if info.rank == 1 and sys.argv[2] == "stall":
            time.sleep(300)
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

# argv: timeout minutes, then what rank 1 does before it shares: "die" (exits silently) or sleep that many seconds
PATIENT_WORKER = """
import os, sys, time
from mega_nerf.distributed import distributed_job, heartbeat, share, shared
from mega_nerf.errors import run_cli

def main():
    with distributed_job(float(sys.argv[1])) as info, heartbeat(info):
        if info.rank == 1 and sys.argv[2] == "die":
            os._exit(3)
        if info.rank == 1:
            time.sleep(float(sys.argv[2]))
        share(info.rank * 10, info, "done")
        print("SHARED", shared(info, "done", patient=True))

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


def run_workers(tmp_path: Path, launch_script: Callable[..., Ranks], *args: str, agent: bool = True) -> Ranks:
    """WORKER on 3 ranks: under torchrun, or (agent=False) with no launcher to stop the others (conftest)."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    return launch_script(script, list(args), 3, agent)


def test_gather_broadcast_and_queue_under_torchrun(tmp_path: Path, launch_script: Callable[..., Ranks]) -> None:
    result = run_workers(tmp_path, launch_script, "1", "ok")
    assert result.codes == [0], result.stderr[0][-3000:]
    assert "GATHERED [(0, [0, 3, 6]), (1, [1, 4]), (2, [2, 5])]" in result.stdout[0]
    assert f"CLAIMED {list(range(20))}" in result.stdout[0]  # every number to exactly one rank
    assert all(f"RANK {r} GOT from rank 0" in result.stdout[0] for r in range(3))


def test_a_failing_rank_ends_the_job_under_torchrun(tmp_path: Path, launch_script: Callable[..., Ranks]) -> None:
    """Ranks 0 and 2 wait at a barrier for rank 1, which raised: the job ends with rank 1's error well before
    the 10-minute timeout."""
    result = run_workers(tmp_path, launch_script, "10", "fail")
    assert result.codes != [0]
    assert "error: rank 1 fails on purpose" in result.stderr[0]
    assert result.seconds < 60


def test_a_failing_rank_reaches_ranks_torchrun_does_not_stop(tmp_path: Path,
                                                             launch_script: Callable[..., Ranks]) -> None:
    """Rank 1 raises; ranks 0 and 2, waiting with a 10-minute timeout, end at once with its error, one line."""
    result = run_workers(tmp_path, launch_script, "10", "fail", agent=False)
    assert result.codes == [2, 2, 2]
    assert result.last_error_lines() == ["error: rank 1 failed: rank 1 fails on purpose",
                                         "error: rank 1 fails on purpose",
                                         "error: rank 1 failed: rank 1 fails on purpose"]
    assert result.seconds < 30


def test_a_silent_death_is_waited_for_until_the_timeout(tmp_path: Path, launch_script: Callable[..., Ranks]) -> None:
    """Rank 1 exits without a word; ranks 0 and 2 give up at the 3 s timeout, naming rank 1."""
    result = run_workers(tmp_path, launch_script, "0.05", "die", agent=False)
    assert result.codes == [2, 3, 2]
    expected = ("error: waiting at barrier: no word from rank 1 within 0.05 minutes (--timeout_minutes); it died "
                "or is stuck, see its output")
    assert result.last_error_lines() == [expected, "", expected]
    assert 3 <= result.seconds < 30


def test_a_stalled_rank_is_named_in_one_line(tmp_path: Path, launch_script: Callable[..., Ranks]) -> None:
    """Rank 1 stops answering, alive (it sleeps): after the 3 s timeout the job ends with one line naming it."""
    result = run_workers(tmp_path, launch_script, "0.05", "stall")
    assert result.codes != [0]
    assert ("error: waiting at barrier: no word from rank 1 within 0.05 minutes (--timeout_minutes)"
            in result.stderr[0])
    assert result.seconds < 60


def test_a_patient_wait_outlasts_the_timeout_for_a_live_rank(tmp_path: Path,
                                                             launch_script: Callable[..., Ranks]) -> None:
    """Rank 1 works for 8 s, over twice the 3 s timeout, with its heartbeat going: the others wait for it."""
    script = tmp_path / "patient.py"
    script.write_text(PATIENT_WORKER)
    result = launch_script(script, ["0.05", "8"], 3, False)
    assert result.codes == [0, 0, 0], result.stderr
    assert all("SHARED [0, 10, 20]" in out for out in result.stdout)
    assert result.seconds >= 8


def test_a_patient_wait_names_a_rank_whose_heartbeat_stops(tmp_path: Path,
                                                           launch_script: Callable[..., Ranks]) -> None:
    script = tmp_path / "patient.py"
    script.write_text(PATIENT_WORKER)
    result = launch_script(script, ["0.05", "die"], 3, False)
    assert result.codes == [2, 3, 2]
    expected = ("error: waiting for every rank's done: no heartbeat from rank 1 within 0.05 minutes "
                "(--timeout_minutes); it died or is stuck, see its output")
    assert result.last_error_lines() == [expected, "", expected]
    assert result.seconds < 30


@pytest.mark.parametrize("lost", ["DistNetworkError", "DistStoreError"])
def test_a_lost_store_is_one_line(monkeypatch: pytest.MonkeyPatch, lost: str) -> None:
    """A rank whose launcher's store went away (torchrun killed with SIGKILL: every rank's next receive fails)
    ends with one PeerFailure line naming itself, not a C++ traceback; without a store the error is as it was."""
    import torch.distributed as dist

    from mega_nerf import distributed
    from mega_nerf.distributed import PeerFailure, distributed_job

    error = getattr(dist, lost)("Failed to recv, got 0 bytes. Connection was likely closed.\nException raised from "
                                "recvBytes at torch/csrc/distributed/c10d/Utils.hpp:679 (most recent call first):")
    launched = DistInfo(1, 2, 1, torch.device("cpu"), store=object())
    monkeypatch.setattr(distributed, "init_distributed", lambda timeout: launched)
    with pytest.raises(PeerFailure) as ended, distributed_job(1):
        raise error
    assert str(ended.value) == (f"rank 1 lost the job's store ({lost}: Failed to recv, got 0 bytes. Connection was "
                                "likely closed.): its launcher, or the host that held it, has ended")
    monkeypatch.setattr(distributed, "init_distributed", lambda timeout: DistInfo(0, 1, 0, torch.device("cpu")))
    with pytest.raises(type(error)), distributed_job(1):
        raise error


def test_single_host_is_every_rank_on_this_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """Alone, or torchrun's local world is the whole world; not when ranks run on other machines too."""
    cpu = torch.device("cpu")
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert single_host(DistInfo(0, 1, 0, cpu)) and not single_host(DistInfo(0, 4, 0, cpu))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert single_host(DistInfo(3, 4, 3, cpu))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert not single_host(DistInfo(1, 4, 1, cpu))
