"""Ranks, sharding and coordination for jobs launched with `torch.distributed.run` (or run as one process).

The jobs here (partition, evaluation, training every cell) share no tensors between ranks: they split the work
and exchange small Python objects. They do so through the key-value store that torchrun's agent hosts (a
TCPStore on the first node), not through a process group: no communicator to set up per GPU, and a rank that
waits can look for another rank's failure while it waits. A rank that fails posts its error in the store
(`distributed_job`); every wait polls for it and ends its own rank with that error, one line, within a fraction
of a second, on one node as across nodes. A rank that dies without a word (killed, its node lost) is waited for
at most `timeout_minutes`. (torchrun also stops a node's other workers when one of them exits with an error;
mega-nerf-launch, which hosts the store itself on one machine, after a grace period.)
Waits that may last as long as the others work (the end of training every cell) are patient: they wait for
ranks whose heartbeat (a background thread, `heartbeat`) goes on, and name the rank whose heartbeat stops. Every
rank then leaves together, which also keeps the first node's agent, and with it the store, alive until the end.

Every helper works unlaunched too: without `RANK` in the environment the process is rank 0 of 1, waits return
at once and the work queue counts locally.
"""
from __future__ import annotations

import datetime
import os
import pickle
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar

import torch
import torch.distributed as dist

from mega_nerf.errors import UserError

T = TypeVar("T")
FAILED = "failed"  # the store key holding the first failing rank's error, as FAILURE
FAILURE = "rank {rank} failed: {what}"
POLL_SECONDS = 0.02  # a wait looks at the store this often (a look is one round trip, ~0.1 ms)
PATIENT_POLL_SECONDS = 1.0  # a patient wait (possibly hours, every rank) looks less often
HEARTBEAT_SECONDS = 5.0  # a rank's heartbeat thread bumps its counter this often


class PeerFailure(UserError):
    """Another rank failed or went silent: this rank stops with that news, which is not its own failure to post."""


@dataclass
class DistInfo:
    """Where this process stands in the job, and the job's store (None when it runs alone)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    store: dist.Store | None = None
    timeout_s: float = 600.0
    prefix: str = ""  # of this attempt's keys in torchrun's store
    ops: int = 0  # barriers and gathers so far: every rank makes them in the same order, so the count names them
    local_counters: dict[str, int] = field(default_factory=dict)  # claim's counters when running alone
    local_shared: dict[str, object] = field(default_factory=dict)  # share's objects when running alone

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.store is not None


def _env_int(name: str) -> int:
    try:
        return int(os.environ[name])
    except ValueError:
        raise UserError(f"environment variable {name}={os.environ[name]!r} is not an integer") from None


def _pick_device(local_rank: int) -> torch.device:
    """Local rank r uses GPU r modulo the GPUs visible (more ranks than GPUs share them); the CPU without CUDA."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device("cuda", local_rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def attempt_prefix(restart: str) -> str:
    """The store prefix of the jobs' keys in one torchrun attempt (TORCHELASTIC_RESTART_COUNT)."""
    return f"mega_nerf/{restart}/"


def failed_rank(store: dist.Store, restart: str = "0") -> int | None:
    """The rank whose failure was posted first (post_failure) in the launcher's `store` in that attempt, or None."""
    keys = dist.PrefixStore(attempt_prefix(restart), store)
    if not keys.check([FAILED]):
        return None
    return int(keys.get(FAILED).decode().split(" ", 2)[1])  # FAILURE: "rank {rank} failed: ..."


def init_distributed(timeout_minutes: float = 10) -> DistInfo:
    """Join the job torchrun launched (its store, under a prefix of this attempt), or run alone when unlaunched."""
    if timeout_minutes <= 0:
        raise UserError(f"the distributed timeout must be positive minutes, got {timeout_minutes}")
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo(0, 1, 0, _pick_device(0), timeout_s=timeout_minutes * 60)
    rank, world_size = _env_int("RANK"), _env_int("WORLD_SIZE")
    local_rank = _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else rank
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        # Without torchrun's agent, rank 0 would host the store and could not leave before the others.
        raise UserError("RANK is set but the job was not launched by torchrun: run it under "
                        "python -m torch.distributed.run or mega-nerf-launch (see README.md, GPUs and clusters)")
    timeout = datetime.timedelta(minutes=timeout_minutes)
    store, _, _ = next(dist.rendezvous("env://", rank, world_size, timeout=timeout))
    # torchrun keeps its store across restarts (--max_restarts): keys of an earlier attempt must not be seen
    prefix = attempt_prefix(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    return DistInfo(rank, world_size, local_rank, _pick_device(local_rank), dist.PrefixStore(prefix, store),
                    timeout_minutes * 60, prefix)


def single_host(info: DistInfo) -> bool:
    """Whether every rank of the job runs on this machine (alone, or torchrun's LOCAL_WORLD_SIZE is the world)."""
    return info.world_size == 1 or os.environ.get("LOCAL_WORLD_SIZE") == str(info.world_size)


def ranks_here(info: DistInfo) -> int:
    """How many of the job's ranks run on this machine, sharing its memory: torchrun's (and mega-nerf-launch's)
    LOCAL_WORLD_SIZE; 1 when alone or not said."""
    if info.world_size == 1:
        return 1
    try:
        return max(1, min(info.world_size, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    except ValueError:
        return 1


def shard(items: list[T], info: DistInfo) -> list[T]:
    """This rank's share of `items`: every world_size-th item from position rank (strided, so that shares
    differ in length by at most one). Ranks beyond the item count get an empty list."""
    return items[info.rank::info.world_size]


def check_failures(info: DistInfo) -> None:
    """PeerFailure (one line: which rank, what) when another rank has failed; call it between units of work."""
    if info.store is not None and info.store.check([FAILED]):
        raise PeerFailure(info.store.get(FAILED).decode())


def post_failure(info: DistInfo, error: BaseException) -> None:
    """Tell the other ranks why this one stops (the first failure posted is kept)."""
    if info.store is None or isinstance(error, PeerFailure):
        return
    what = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if not isinstance(error, UserError):
        what = f"{type(error).__name__}: {what}"
    try:
        info.store.compare_set(FAILED, "", FAILURE.format(rank=info.rank, what=what))
    except dist.DistError:
        pass  # the store is gone (its node with it): the others will time out instead


def _wait(info: DistInfo, keys: list[str], what: str, patient: bool = False) -> None:
    """Until every key exists (keys[r]: rank r's), polling for failures. A one-line PeerFailure names the ranks
    still missing after the timeout, or (patient) a missing rank whose heartbeat stopped for the timeout."""
    assert info.store is not None
    start = time.monotonic()
    beats: dict[int, tuple[int, float]] = {}  # rank -> (heartbeat count, when it was last seen to change)
    while not info.store.check(keys):
        check_failures(info)
        now, missing = time.monotonic(), []
        if patient:
            for r in (r for r, key in enumerate(keys) if not info.store.check([key])):
                count = info.store.add(f"beat.{r}", 0)
                if beats.get(r, (None, now))[0] != count:
                    beats[r] = (count, now)
                if now - beats[r][1] > info.timeout_s:
                    missing.append(r)
        elif now - start > info.timeout_s:
            missing = [r for r, key in enumerate(keys) if not info.store.check([key])]
        if missing:
            ranks, silence = ", ".join(map(str, missing)), "heartbeat" if patient else "word"
            raise PeerFailure(f"{what}: no {silence} from rank {ranks} within {info.timeout_s / 60:g} minutes "
                              "(--timeout_minutes); it died or is stuck, see its output")
        time.sleep(PATIENT_POLL_SECONDS if patient else POLL_SECONDS)


@contextmanager
def heartbeat(info: DistInfo) -> Iterator[None]:
    """While the block runs, a background thread bumps this rank's heartbeat counter every HEARTBEAT_SECONDS
    (or a quarter of the timeout, if shorter; through its own connection to the store), so that patient waits
    can tell a slow rank from a dead one."""
    if info.store is None:
        yield
        return
    client = dist.TCPStore(os.environ["MASTER_ADDR"], _env_int("MASTER_PORT"), is_master=False,
                           timeout=datetime.timedelta(seconds=info.timeout_s))
    store, stop = dist.PrefixStore(info.prefix, client), threading.Event()

    def beat() -> None:
        while not stop.wait(min(HEARTBEAT_SECONDS, info.timeout_s / 4)):
            try:
                store.add(f"beat.{info.rank}", 1)
            except dist.DistError:
                return  # the store is gone: the job is ending
    thread = threading.Thread(target=beat, name="heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _next_op(info: DistInfo, name: str) -> str:
    info.ops += 1
    return f"{name}#{info.ops}"


def barrier(info: DistInfo, name: str = "barrier") -> None:
    """Wait for every rank (no-op for a single process). Every rank must make the same calls in the same order."""
    if info.store is None:
        return
    op = _next_op(info, name)
    info.store.set(f"{op}/{info.rank}", b"1")
    _wait(info, [f"{op}/{r}" for r in range(info.world_size)], f"waiting at {name}")


def share(obj: object, info: DistInfo, name: str) -> None:
    """Publish this rank's picklable `obj` under `name`, for `shared` (one object per rank and name)."""
    if info.store is None:
        info.local_shared[name] = obj
    else:
        info.store.set(f"{name}/{info.rank}", pickle.dumps(obj))


def shared(info: DistInfo, name: str, patient: bool = False) -> list:
    """Every rank's object shared under `name`, in rank order, once every rank has shared it (waits until then:
    at most the timeout, or, patient, as long as the ranks still working keep their heartbeat)."""
    if info.store is None:
        return [info.local_shared[name]]
    keys = [f"{name}/{r}" for r in range(info.world_size)]
    _wait(info, keys, f"waiting for every rank's {name.partition('#')[0]}", patient)
    return [pickle.loads(info.store.get(key)) for key in keys]


def gather_objects(obj: T, info: DistInfo, name: str = "gather") -> list[T] | None:
    """Every rank's picklable `obj`, in rank order, on rank 0; None on the other ranks, which do not wait."""
    op = _next_op(info, name)
    share(obj, info, op)
    return shared(info, op) if info.is_main else None


def broadcast_object(obj: T | None, info: DistInfo, name: str = "broadcast") -> T:
    """Rank 0's picklable `obj` on every rank (the others pass None)."""
    if info.store is None:
        return obj  # type: ignore[return-value]
    op = _next_op(info, name)
    if info.is_main:
        info.store.set(op, pickle.dumps(obj))
        return obj  # type: ignore[return-value]
    _wait(info, [op], f"waiting for rank 0's {name}")
    return pickle.loads(info.store.get(op))


def claim(info: DistInfo, queue: str) -> int:
    """The next number of a counter shared by every rank (0, 1, 2, ...): each number goes to exactly one rank,
    so ranks take items of a list in turn, each as soon as it is free."""
    if info.store is None:
        info.local_counters[queue] = info.local_counters.get(queue, -1) + 1
        return info.local_counters[queue]
    return info.store.add(f"queue.{queue}", 1) - 1


@contextmanager
def distributed_job(timeout_minutes: float) -> Iterator[DistInfo]:
    """The job's DistInfo; an exception leaving the block is posted for the other ranks, then raised. Losing the
    launcher's store (it was killed, or the host that held it went down) is one PeerFailure line, not the C++
    traceback of a failed receive on every rank."""
    info = init_distributed(timeout_minutes)
    try:
        yield info
    except (dist.DistNetworkError, dist.DistStoreError) as e:
        if info.store is None:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise PeerFailure(f"rank {info.rank} lost the job's store ({type(e).__name__}: {first}): its launcher, or "
                          "the host that held it, has ended") from None
    except BaseException as e:
        post_failure(info, e)
        raise
