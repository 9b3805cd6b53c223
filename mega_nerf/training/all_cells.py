"""Training every cell of a partition, across the ranks of a `torch.distributed.run` job (or in one process).

The cells are ordered largest first (rays per cell) and form one queue shared by every rank
(mega_nerf.distributed.claim): a rank takes the next cell, trains it to its end on its own device with the
Trainer, then takes the next, so each GPU trains one cell at a time and the longest cells start first (the
job then ends soon after the sum of the cell times over the ranks, when there are a few times more cells than
ranks). A cell's run resumes from its latest checkpoint, so restarting the job (by hand, or by torchrun's
--max_restarts) continues the unfinished cells and passes over the trained ones; a cell counts as trained only
once the Trainer has written its final checkpoint (atomically, with everything needed to resume).

A cell that fails with a user error (a non-finite loss, a bad mask) or runs out of GPU memory is reported and
its rank goes on to the next cell; any other error stops the job (mega_nerf.distributed posts it to every rank).
A cell another run is training (its folders locked: a second job on the same prefixes, a SLURM array's next task)
is passed over, and taken again once that run lets it go, after the rank's other cells: it is then trained on from
where that run left it, or found trained (its final checkpoint read by name: no data is prepared for it). So jobs
sharing a prefix share its cells. A holder on another host or container cannot be checked from here: when its
cell's folders have not changed for --timeout_minutes, the cell fails with a line saying which lock to delete.
Every rank waits for the others at the end (as long as their heartbeat goes on); then rank 0 prints every cell's
outcome and, when some failed, one error line naming them and why.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from mega_nerf.distributed import (
    DistInfo,
    PeerFailure,
    broadcast_object,
    check_failures,
    claim,
    distributed_job,
    heartbeat,
    share,
    shared,
)
from mega_nerf.errors import STOP_SIGNALS, Interrupted, UserError
from mega_nerf.lock import Held, checkable, delete_hint, is_free, locked
from mega_nerf.partition.cells import load_params
from mega_nerf.partition.maskfile import MEGA_NERF_SUFFIX, SUFFIX, read_mask
from mega_nerf.training import checkpoint as ckpt
from mega_nerf.training.config import TrainConfig
from mega_nerf.training.trainer import Trainer

CellStepHook = Callable[[int, int], None]  # (cell, step) after every optimiser step
ReadyHook = Callable[[TrainConfig], None]  # a cell's config, once its data and checkpoints are verified
FAILURE_POLL_SECONDS = 1.0  # how often a training rank looks whether another rank has failed
HELD_POLL_SECONDS = 10.0  # how often a rank looks whether the runs holding cells have let them go


@dataclass(frozen=True)
class CellsConfig:
    """One run of `mega-nerf-train-cells` (built in cli/train_cells)."""

    train: TrainConfig  # every cell's run; its exp_name, chunk_paths and cluster_mask_path are set per cell
    mask_path: str  # the partition: params.pt, partition.json, <k>/ mask folders
    exp_prefix: str  # cell k's experiment directory is <exp_prefix><k>
    chunk_prefixes: tuple[str, ...] = ()  # cell k's chunks go to <prefix><k> for each prefix (data_mode disk)
    timeout_minutes: float = 10
    device: str | None = None  # the user's --device; None: each rank's own (`train.device` is always resolved)


@dataclass(frozen=True)
class CellOutcome:
    """What became of one cell in this run."""

    cell: int
    rank: int
    trained: bool
    detail: str  # the final checkpoint and how it was reached, or why the cell failed
    seconds: float
    held: Held | None = None  # another run holds the cell's folders: take it again once that run lets it go


def cell_config(config: CellsConfig, cell: int, device: torch.device) -> TrainConfig:
    """Cell `cell`'s training run: train.py's options with this cell's directories, on `device` unless the
    user chose one."""
    return dataclasses.replace(
        config.train, exp_name=f"{config.exp_prefix}{cell}",
        chunk_paths=tuple(f"{prefix}{cell}" for prefix in config.chunk_prefixes),
        cluster_mask_path=str(Path(config.mask_path) / str(cell)), device=config.device or str(device))


def cell_sizes(mask_path: Path) -> list[int]:
    """Rays per cell: partition.json's counts (written by the partition), or counted from the mask files where
    there is none (Mega-NeRF's published masks)."""
    num_cells = load_params(mask_path).num_cells
    report = mask_path / "partition.json"
    if report.is_file():
        counts = json.loads(report.read_text()).get("rays_per_cell")
        if isinstance(counts, list) and len(counts) == num_cells:
            return [int(c) for c in counts]
    sizes = []
    for k in range(num_cells):
        if not (mask_path / str(k)).is_dir():
            raise UserError(f"--mask_path: {mask_path / str(k)} is not a directory (cell {k}'s masks)")
        files = [p for p in sorted((mask_path / str(k)).iterdir()) if p.suffix in (SUFFIX, MEGA_NERF_SUFFIX)]
        sizes.append(sum(int(read_mask(p).sum()) for p in files))
    return sizes


def largest_first(sizes: list[int]) -> list[int]:
    """Cell indices by falling size (ties by index): the order cells are handed out in."""
    return sorted(range(len(sizes)), key=lambda k: (-sizes[k], k))


def _latest_step(exp_dir: Path) -> int | None:
    latest = ckpt.latest_checkpoint(exp_dir)
    return None if latest is None else int(latest.stem)


def train_cell(config: TrainConfig, cell: int, info: DistInfo, on_step: CellStepHook | None,
               on_ready: ReadyHook | None = None) -> CellOutcome:
    """Train (or resume, or pass over) one cell, its outputs locked. A user error or running out of GPU memory is
    the cell's failure, returned (another run holding its outputs: `held` set); any other exception, or another
    rank's failure, propagates. `on_ready` gets the cell's config once its data and checkpoints are verified."""
    start = time.perf_counter()
    last_poll = [time.monotonic()]

    def step_hook(step: int) -> None:
        if time.monotonic() - last_poll[0] > FAILURE_POLL_SECONDS:
            check_failures(info)
            last_poll[0] = time.monotonic()
        if on_step is not None:
            on_step(cell, step)
    try:
        # The cell's own outputs are locked by the rank training it (another job, or train.py, on the same cell:
        # Held, and train_cells takes the cell again later)
        with locked({"--exp_prefix": [config.exp_name], "--chunk_prefix": list(config.chunk_paths)},
                    main_rank_only=False):
            before = _latest_step(Path(config.exp_name))  # read under the lock: no other run moves it now
            if before is not None and before >= config.train_iterations:  # finished: prepare no data for it
                final = ckpt.checkpoint_path(Path(config.exp_name), before)
                return CellOutcome(cell, info.rank, True, f"already trained: {final}", time.perf_counter() - start)
            ready = None if on_ready is None else functools.partial(on_ready, config)
            trainer = Trainer(config, on_step=step_hook, on_ready=ready, same_render=True)
            final = trainer.run()
    except PeerFailure:
        raise
    except Held as e:
        return CellOutcome(cell, info.rank, False, str(e), time.perf_counter() - start, held=e)
    except (UserError, torch.cuda.OutOfMemoryError) as e:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return CellOutcome(cell, info.rank, False, reason, time.perf_counter() - start)
    if trainer.stopped_by is not None:  # in the cell's last step: the cell is done, and no other is begun
        raise Interrupted(f"{STOP_SIGNALS[trainer.stopped_by]} during cell {cell}'s last step, which finished "
                          f"({final}); the same command trains the cells left", trainer.stopped_by)
    step = int(final.stem)
    if step == 0:
        how = "no rays, an empty checkpoint"
    else:
        how = f"resumed at step {before}, trained to step {step}" if before else f"trained to step {step}"
    return CellOutcome(cell, info.rank, True, f"{how}: {final}", time.perf_counter() - start)


def _reported(outcome: CellOutcome, info: DistInfo) -> CellOutcome:
    print(f"rank {info.rank}: cell {outcome.cell}: {'ok' if outcome.trained else 'FAILED'}: {outcome.detail}",
          flush=True)
    return outcome


def _held_cells(held: list[tuple[int, TrainConfig, Held]], info: DistInfo, timeout_s: float,
                on_step: CellStepHook | None, on_ready: ReadyHook | None) -> list[CellOutcome]:
    """The outcomes of cells other runs held, each trained (or found trained) once its holder lets it go, in
    whatever order they are let go. A holder that cannot be checked from here (another host or container) and whose
    cell's folders have not changed for `timeout_s` fails its cell with a line naming the lock to delete."""
    outcomes: list[CellOutcome] = []
    waiting = {cell: (run, news, time.monotonic(), _last_change(run)) for cell, run, news in held}
    while waiting:
        check_failures(info)
        for cell, (run, news, since, change) in list(waiting.items()):
            if is_free(news.lock):
                outcome = train_cell(run, cell, info, on_step, on_ready)
                if outcome.held is None:
                    outcomes.append(_reported(outcome, info))
                    del waiting[cell]
                    continue
                news, since, change = outcome.held, time.monotonic(), _last_change(run)
            elif (now := _last_change(run)) != change:
                since, change = time.monotonic(), now
            elif not checkable(news.holder) and time.monotonic() - since > timeout_s:
                pid, host, _ = news.holder
                outcomes.append(_reported(CellOutcome(
                    cell, info.rank, False, f"the run holding it (pid {pid} on {host}) changed none of its files for "
                    f"{timeout_s / 60:g} minutes (--timeout_minutes); {delete_hint(news.lock)} and run again", 0.0),
                    info))
                del waiting[cell]
                continue
            waiting[cell] = (run, news, since, change)
        if waiting:
            time.sleep(HELD_POLL_SECONDS)
    return outcomes


def _last_change(run: TrainConfig) -> int:
    """The newest modification time (ns) among a cell's files: its log and checkpoints, its chunks as they are
    written; 0 for none."""
    newest = 0
    for folder in [Path(run.exp_name), Path(run.exp_name) / "checkpoints", *map(Path, run.chunk_paths)]:
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    with contextlib.suppress(OSError):  # removed meanwhile (an old checkpoint pruned)
                        newest = max(newest, entry.stat().st_mtime_ns)
        except OSError:  # not made yet
            pass
    return newest


def summary(outcomes: list[CellOutcome], num_cells: int) -> str:
    """One line per cell, in cell order."""
    lines = []
    for o in sorted(outcomes, key=lambda o: o.cell):
        state = "ok" if o.trained else "FAILED"
        lines.append(f"cell {o.cell}: {state} (rank {o.rank}, {o.seconds:.0f} s): {o.detail}")
    return "\n".join([f"{sum(o.trained for o in outcomes)} of {num_cells} cells trained", *lines])


def train_cells(config: CellsConfig, on_step: CellStepHook | None = None, on_ready: ReadyHook | None = None
                ) -> list[CellOutcome] | None:
    """Train every cell, each rank taking the next largest untaken cell until none is left. Returns every
    cell's outcome on rank 0 (after printing them), None on the others; UserError on rank 0 (one line, naming
    the cells and why) when some cell failed. `on_ready`: as train_cell's (the command saves each cell's
    options with it)."""
    with distributed_job(config.timeout_minutes) as info, heartbeat(info):
        order = broadcast_object(largest_first(cell_sizes(Path(config.mask_path))) if info.is_main else None, info)
        progress = config.train.progress and info.local_rank == 0  # one progress bar per node's terminal
        outcomes, held = [], []
        while (position := claim(info, "cells")) < len(order):
            check_failures(info)
            cell = order[position]
            run = dataclasses.replace(cell_config(config, cell, info.device), progress=progress)
            print(f"rank {info.rank}: cell {cell} ({position + 1} of {len(order)}, largest first) on {info.device}",
                  flush=True)
            outcome = train_cell(run, cell, info, on_step, on_ready)
            if outcome.held is not None:
                held.append((cell, run, outcome.held))
                pid, host, _ = outcome.held.holder
                gone = "" if checkable(outcome.held.holder) else f"; {delete_hint(outcome.held.lock)}"
                print(f"rank {info.rank}: cell {cell}: another run is training it (pid {pid} on {host}); taken again "
                      f"once that run lets it go{gone}", flush=True)
                continue
            outcomes.append(_reported(outcome, info))
        outcomes += _held_cells(held, info, config.timeout_minutes * 60, on_step, on_ready)
        share(outcomes, info, "outcomes")
        # Every rank stays until the last cell is done: the first node's agent hosts the store the others use.
        everything = [o for rank in shared(info, "outcomes", patient=True) for o in rank]
        if not info.is_main:
            return None
        print(summary(everything, len(order)))
        failed = [o for o in everything if not o.trained]
        if failed:
            raise UserError(f"{len(failed)} of {len(order)} cells failed (a rerun retries them only): "
                            + "; ".join(f"cell {o.cell}: {o.detail}" for o in sorted(failed, key=lambda o: o.cell)))
        return everything
