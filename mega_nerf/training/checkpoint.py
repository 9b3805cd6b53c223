"""Checkpoints: complete (model, optimiser, step, RNG, data position) and atomic (io.save_torch_atomic).

Everything is stored as tensors and plain types, so every file loads with torch.load(weights_only=True).
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, BinaryIO

import torch

from mega_nerf.data.dataset import MEGA_NERF
from mega_nerf.errors import UnreadableFile, UserError
from mega_nerf.io import load_torch

VERSION = 1
# What a checkpoint saved before each of these keys existed means by leaving it out: load_checkpoint fills them in
ADDED_KEYS = {"eval_protocol": MEGA_NERF, "val_embeddings_only": False}
REQUIRED_KEYS = ("step", "field_config", "model")  # what every checkpoint has held since version 1
RESUME_KEYS = ("dataset", "cell", "render", "optimizer", "stream", "rng")  # what a resume reads besides


def checkpoint_path(exp_dir: Path, step: int) -> Path:
    return exp_dir / "checkpoints" / f"{step:08d}.pt"


def checkpoint_files(exp_dir: Path) -> list[Path]:
    """The run's checkpoints in step order: only names checkpoint_path writes (8 digits or more), so a copy the
    user made beside them (00002000_keep.pt) is neither resumed from nor deleted."""
    folder = exp_dir / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.glob("*.pt") if re.fullmatch(r"[0-9]{8,}\.pt", p.name)), key=lambda p: int(p.stem))


def latest_checkpoint(exp_dir: Path) -> Path | None:
    found = checkpoint_files(exp_dir)
    return found[-1] if found else None


def load_latest_checkpoint(exp_dir: Path, device: torch.device | str = "cpu") -> tuple[Path, dict[str, Any]] | None:
    """The latest checkpoint's path and contents, None where there is none. A run still training may write a
    newer one and prune this one (--keep_checkpoints) between the listing and the opening: the file is opened
    before it is read (an open file outlives its deletion), and one that has gone is looked for again. A name
    listed again that still cannot be opened (a broken link), or any other failure to open, is a one-line error."""
    gone = None
    while (path := latest_checkpoint(exp_dir)) is not None:
        try:
            file = path.open("rb")
        except OSError as e:
            if isinstance(e, FileNotFoundError) and path != gone:
                gone = path
                continue
            raise UserError(f"{path}: unreadable checkpoint ({e.strerror or type(e).__name__})") from None
        with file:
            return path, load_checkpoint(path, device, file)
    return None


def load_run_checkpoint(path: Path, device: torch.device | str = "cpu", file: BinaryIO | None = None
                        ) -> dict[str, Any]:
    """`load_checkpoint` of a run's own `checkpoints/NNNNNNNN.pt`: where it is damaged (a copy cut short, a bad
    disk; our writes are atomic), the one-line error names the older checkpoints beside it, which may be whole."""
    try:
        return load_checkpoint(path, device, file)
    except UnreadableFile as e:
        older = [p.name for p in checkpoint_files(path.parent.parent) if p != path]
        if not older:
            raise
        raise UserError(f"{e}; older checkpoints beside it: {', '.join(older[-3:])} (move {path.name} away to "
                        f"resume from {older[-1]})") from None


def prune_checkpoints(exp_dir: Path, keep: int, written: Path) -> None:
    """Delete all but `keep` checkpoints (0: keep every one): the one just `written`, whole, and the latest others
    (an empty cell's step 0 sorts first, and a run resumed from any kept one is unchanged)."""
    if keep > 0:
        others = [p for p in checkpoint_files(exp_dir) if p != written]
        for path in others[:max(len(others) - (keep - 1), 0)]:
            path.unlink(missing_ok=True)


def comparable_field_config(state: dict[str, Any], asked: dict[str, Any], samples: int) -> dict[str, Any]:
    """The checkpoint's field config as it is compared with `asked` (a run's at `samples`, or another
    checkpoint's): the occupancy threshold is 0.01 * samples / segment, so where it differs only as --samples
    does, asked's is put in (the same field; the render settings report the samples)."""
    saved, now = state["field_config"].get("occupancy_threshold"), asked.get("occupancy_threshold")
    if saved is not None and now is not None and math.isclose(saved / state["render"]["samples"], now / samples,
                                                              rel_tol=1e-9):
        return {**state["field_config"], "occupancy_threshold": now}
    return state["field_config"]


def load_checkpoint(path: Path, device: torch.device | str = "cpu", file: BinaryIO | None = None) -> dict[str, Any]:
    """Load a checkpoint of ours (from `file` where it is open already), with a one-line error for a truncated
    file or another version; keys added since version 1 are filled in where an older one left them out
    (ADDED_KEYS)."""
    state = load_torch(path, "checkpoint", device, file)
    if isinstance(state, dict) and state.get("kind") == "container":
        raise UserError(f"{path}: a merged container, not a training checkpoint (a run's checkpoints are its "
                        "checkpoints/NNNNNNNN.pt)")
    if not isinstance(state, dict) or state.get("version") != VERSION or any(k not in state for k in REQUIRED_KEYS):
        raise UserError(f"{path}: not a checkpoint of this version (expected version {VERSION})")
    return {**ADDED_KEYS, **state}


def rng_state(generator: torch.Generator) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state(), "generator": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, torch.Tensor], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"].cpu())
    generator.set_state(state["generator"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())
