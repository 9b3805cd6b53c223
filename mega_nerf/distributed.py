"""Process-group set-up and sharding for jobs launched with `torch.distributed.run` (or run as one process).

Every helper also works unlaunched: with no `RANK` in the environment there is no process group, the
process is rank 0 of 1, and barriers and gathers are no-ops. Timeouts are minutes, not Mega-NeRF's 24 hours,
so a dead rank ends the job quickly; torchrun itself stops the other workers when one fails.
"""
from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from mega_nerf.errors import UserError

T = TypeVar("T")


@dataclass
class DistInfo:
    """Where this process stands in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    timeout_minutes: float = 10  # how long a collective waits for the other ranks

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1 and dist.is_initialized()


def _env_int(name: str) -> int:
    try:
        return int(os.environ[name])
    except ValueError:
        raise UserError(f"environment variable {name}={os.environ[name]!r} is not an integer") from None


def init_distributed(timeout_minutes: float = 10) -> DistInfo:
    """Join the process group torchrun set up, or run alone when unlaunched.

    With CUDA, local rank r uses GPU r modulo the GPUs visible, so more processes than GPUs share them (useful
    when one process cannot keep a GPU busy); the backend is NCCL with one process per GPU, and gloo when GPUs are
    shared, since NCCL refuses two ranks on one device (the collectives here move only small objects). Without
    CUDA every rank runs on the CPU with gloo.
    """
    if timeout_minutes <= 0:
        raise UserError(f"the distributed timeout must be positive minutes, got {timeout_minutes}")
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo(0, 1, 0, torch.device("cuda" if cuda else "cpu"))
    rank, world_size = _env_int("RANK"), _env_int("WORLD_SIZE")
    local_rank = _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else rank
    backend = "gloo"
    if cuda:
        gpus = torch.cuda.device_count()
        # torchrun sets LOCAL_WORLD_SIZE; without it, one node is assumed, so that every rank picks the same backend
        local_world = _env_int("LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in os.environ else world_size
        device = torch.device("cuda", local_rank % gpus)
        torch.cuda.set_device(device)
        backend = "nccl" if local_world <= gpus else "gloo"
    else:
        device = torch.device("cpu")
    timeout = datetime.timedelta(minutes=timeout_minutes)
    dist.init_process_group(backend, timeout=timeout, rank=rank, world_size=world_size)
    return DistInfo(rank, world_size, local_rank, device, timeout_minutes)


def shard(items: list[T], info: DistInfo) -> list[T]:
    """This rank's share of `items`: every world_size-th item from position rank (strided, so that shares
    differ in length by at most one). Ranks beyond the item count get an empty list."""
    return items[info.rank::info.world_size]


def barrier(info: DistInfo) -> None:
    """Wait for every rank (no-op for a single process). With gloo the barrier is monitored: rank 0 learns
    which ranks did not arrive within the timeout, and every rank stops with one line naming them."""
    if not info.is_distributed:
        return
    try:
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[info.device.index])
        else:
            dist.monitored_barrier(timeout=datetime.timedelta(minutes=info.timeout_minutes), wait_all_ranks=True)
    except RuntimeError as e:
        raise UserError(_stalled(e, info, "a barrier")) from None


def _stalled(error: RuntimeError, info: DistInfo, where: str) -> str:
    """One line for a collective that failed because a rank stopped answering (or died)."""
    found = re.search(r"[Rr]anks? ([\d, ]+) failed to pass monitoredBarrier", str(error))
    who = f"rank {found.group(1).strip()}" if found else "another rank"
    first = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
    return (f"rank {info.rank}: {who} stopped answering at {where} within --timeout_minutes "
            f"{info.timeout_minutes:g} ({first})")


def gather_objects(obj: T, info: DistInfo) -> list[T] | None:
    """Every rank's picklable `obj`, in rank order, on rank 0; None on the other ranks."""
    if not info.is_distributed:
        return [obj]
    gathered: list[T] | None = [None] * info.world_size if info.is_main else None  # type: ignore[list-item]
    try:
        dist.gather_object(obj, gathered, dst=0)
    except RuntimeError as e:
        raise UserError(_stalled(e, info, "a gather")) from None
    return gathered


def cleanup(info: DistInfo) -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()
