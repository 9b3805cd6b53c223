"""Merge the submodules of a partition into one container file (format: `mega_nerf.merging.container`).

Submodule k is the latest checkpoint in `<ckpt_prefix><k>/checkpoints/`. Before anything is written, the
checkpoints are checked against each other (field kind and sizes, dataset fingerprint, render settings, scene
bounds) and against `params.pt` (number of cells, number of images, near/far/altitude range), so that a
container never mixes submodules of different runs. Every problem is one line naming the submodule. Whether
`params.pt` is the partition the submodules were trained on is checked first: the folder `<k>/` beside
`params.pt` must hold the masks whose fingerprint cell k's checkpoint records (data.chunks.masks_fingerprint, each
cell's masks read once), and the error names the masks folder the cell's run saved in its config.yaml. The command
(cli/merge.py) first refuses an --output that is one of these inputs or an existing file that is not a container
(`is_container`, `submodule_folders`).
"""
from __future__ import annotations

import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from mega_nerf.data.chunks import masks_fingerprint
from mega_nerf.errors import UserError
from mega_nerf.fields import config_differences, old_default_options
from mega_nerf.io import TORCH_LOAD_ERRORS, remove_temp_files_of
from mega_nerf.merging.container import KIND, inference_state, save_container
from mega_nerf.partition.cells import PartitionParams, load_params, params_file
from mega_nerf.training.checkpoint import comparable_field_config, load_latest_checkpoint


@dataclass
class Submodule:
    cell: int
    path: Path
    state: dict[str, Any]


def _close(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)


def _same_scene(a: dict[str, Any], b: dict[str, Any]) -> bool:
    ra, rb = a["altitude_range"], b["altitude_range"]
    if (ra is None) != (rb is None):
        return False
    ranges = ra is None or all(_close(x, y) for x, y in zip(ra, rb, strict=True))
    return _close(a["near"], b["near"]) and _close(a["far"], b["far"]) and ranges


def find_submodules(prefix: str, num_cells: int) -> list[Submodule | None]:
    """The latest checkpoint of every cell, None for a missing one (`require_all` refuses those)."""
    extra = Path(f"{prefix}{num_cells}")
    if extra.is_dir():
        raise UserError(f"{extra}: a submodule beyond the partition's {num_cells} cells "
                        "(checkpoints of another partition? check --ckpt_prefix and --centroid_path)")
    found: list[Submodule | None] = []
    for k in range(num_cells):
        latest = load_latest_checkpoint(Path(f"{prefix}{k}"))
        found.append(None if latest is None else Submodule(k, *latest))
    return found


def require_all(subs: list[Submodule | None], prefix: str) -> None:
    """One-line UserError naming the first cell without a checkpoint."""
    for k, s in enumerate(subs):
        if s is None:
            raise UserError(f"submodule {k}: no checkpoint in {Path(f'{prefix}{k}') / 'checkpoints'} "
                            "(train it, or pass --allow_empty_cells to merge without it)")


def check_partition(subs: list[Submodule | None], params_path: Path) -> None:
    """One-line UserError when `params_path` (a params.pt) is not the partition the submodules were trained on: a
    submodule whose masks' fingerprint differs from that of its cell's folder beside params.pt, whether it trained
    on masks elsewhere or on that folder before the partition was made again in it (each cell's masks are read
    once: about what one training run's start reads). Skipped for a checkpoint that records no masks (trained
    without them, or before they were recorded) or names another cell (check_submodules reports that), and where
    params.pt has no mask folders beside it (copied alone, or Mega-NeRF's)."""
    for s in subs:
        if s is None or not s.state.get("masks") or s.state["cell"] != str(s.cell):
            continue
        cell_dir = params_path.parent / str(s.cell)
        if not cell_dir.is_dir() or masks_fingerprint(cell_dir) == s.state["masks"]:
            continue
        trained = _trained_masks(s)
        # A relative path was relative to where the run started, not to here: only an absolute one is trusted.
        if trained is not None and trained.is_absolute() and trained.resolve() == cell_dir.resolve():
            raise UserError(f"{params_path}: its cells' masks changed since the submodules trained on them "
                            f"(submodule {s.cell}, {s.path}, and {cell_dir}: the partition was made again?); "
                            "train the cells again, or merge with the partition they were trained on")
        hint = "; give --centroid_path the params.pt of the masks it was trained with"
        if trained is not None and trained.is_absolute():
            hint = f"; it was trained with --cluster_mask_path {trained}: give --centroid_path {trained.parent}"
        elif trained is not None:
            hint += f" (--cluster_mask_path {trained}, relative to where it ran)"
        raise UserError(f"{params_path}: not the partition the submodules were trained on (submodule {s.cell}, "
                        f"{s.path}, was trained with other masks than {cell_dir}){hint}")


def _trained_masks(s: Submodule) -> Path | None:
    """The --cluster_mask_path that the submodule's run saved in its config.yaml (cli.options.record_options), or
    None where that file or option is missing."""
    try:
        saved = yaml.safe_load((s.path.parent.parent / "config.yaml").read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    trained = saved.get("cluster_mask_path") if isinstance(saved, dict) else None
    return Path(trained) if isinstance(trained, str) else None


def submodule_folders(prefix: str) -> list[Path]:
    """The experiment folders `<prefix><k>` that exist, any k: where the submodules' checkpoints are read."""
    head, tail = os.path.split(prefix)  # "X/exp-" -> X, exp-; "X/" -> X, ""
    parent = Path(head or ".")
    if not parent.is_dir():
        return []
    return sorted(p for p in parent.iterdir() if p.is_dir() and re.fullmatch(f"{re.escape(tail)}[0-9]+", p.name))


def is_container(path: Path) -> bool:
    """Whether `path` is a container file, of any version (a rerun may replace it). Its tensors are mapped, not
    read, so a large file costs only its pickle."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except TORCH_LOAD_ERRORS:  # a foreign or damaged file, or a torch file of the legacy format
        return False
    return isinstance(state, dict) and state.get("kind") == KIND


def check_submodules(subs: list[Submodule | None], params: PartitionParams, params_path: Path) -> None:
    """One-line UserError naming the first submodule that disagrees with the first one or with params.pt."""
    present = [s for s in subs if s is not None]
    if not present:
        raise UserError(f"no submodule of the {params.num_cells} cells has a checkpoint")
    ref = present[0]
    n_images = None if params.image_sizes is None else len(params.image_sizes)
    partition_scene = {"near": params.near, "far": params.far, "altitude_range": params.ray_altitude_range}
    for s in present:
        st, name = s.state, f"submodule {s.cell} ({s.path})"
        if st["cell"] is not None and st["cell"] != str(s.cell):
            raise UserError(f"{name}: trained on cell {st['cell']}, not cell {s.cell}")
        if st["dataset"] != ref.state["dataset"]:
            raise UserError(f"{name}: trained on another dataset than submodule {ref.cell}")
        config = comparable_field_config(st, ref.state["field_config"], ref.state["render"]["samples"])
        differences = config_differences(config, ref.state["field_config"])
        if differences:
            raise UserError(f"{name}: field differs from submodule {ref.cell}'s ({', '.join(differences)}: its "
                            f"value, then the other's){_old_defaults_hint(s, ref)}")
        if n_images is not None and config["n_images"] != n_images:
            raise UserError(f"{name}: trained on {config['n_images']} images, but {params_path} was made "
                            f"from {n_images}")
        if st["eval_protocol"] != ref.state["eval_protocol"]:
            raise UserError(f"{name}: trained under --eval_protocol {st['eval_protocol']}, submodule {ref.cell} under "
                            f"{ref.state['eval_protocol']}")
        if st["val_embeddings_only"] != ref.state["val_embeddings_only"]:
            with_it = ("with", "without") if st["val_embeddings_only"] else ("without", "with")
            raise UserError(f"{name}: trained {with_it[0]} --val_embeddings_only, submodule {ref.cell} {with_it[1]} "
                            "it")
        if st["render"] != ref.state["render"]:
            raise UserError(f"{name}: render settings {st['render']} differ from submodule {ref.cell}'s "
                            f"{ref.state['render']}{_old_defaults_hint(s, ref)}")
        if not _same_scene(st["scene"], partition_scene):
            raise UserError(f"{params_path}: near/far/altitude range {partition_scene} differ from {name}'s "
                            f"{st['scene']} (the params.pt of another partition, or cells trained with other "
                            "--near/--far/--ray_altitude_range?)")


def _old_defaults_hint(a: Submodule, b: Submodule) -> str:
    """Where one of two submodules was trained at defaults since changed (fields.CHANGED_DEFAULTS) and the other
    at today's: which one, and the options that train the others like it."""
    for old, new in ((a, b), (b, a)):
        options = old_default_options(old.state["field_config"], new.state["field_config"]) + \
            old_default_options(old.state["render"], new.state["render"])
        if options:
            return (f"; submodule {old.cell} was trained at older defaults: train every cell with "
                    f"{' '.join(options)}, or retrain it at today's")
    return ""


def container_state(subs: list[Submodule | None], params: PartitionParams, boundary_margin: float
                    ) -> dict[str, Any]:
    """The container file's contents (see mega_nerf.merging.container) from checked submodules."""
    ref = next(s for s in subs if s is not None).state
    entries: list[dict[str, Any] | None] = []
    for s in subs:
        if s is None or s.state["empty"]:
            entries.append(None)
        else:
            entries.append({"field_config": s.state["field_config"], "model": inference_state(s.state["model"]),
                            "step": int(s.state["step"])})
    return {"centroids": params.centroids.float().clone(), "boundary_margin": float(boundary_margin),
            "cluster_2d": bool(params.cluster_2d), "render": dict(ref["render"]), "scene": dict(ref["scene"]),
            "dataset": ref["dataset"], "n_images": int(ref["field_config"]["n_images"]),
            "eval_protocol": ref["eval_protocol"], "val_embeddings_only": ref["val_embeddings_only"],
            "submodules": entries}


def merge_submodules(prefix: str, params_path: Path, output: Path, allow_empty_cells: bool,
                     default_margin: float) -> dict[str, Any]:
    """Check and merge; write `output` atomically. Returns the container state written. The boundary margin
    is params.pt's (the one the masks were made with), or `default_margin` for a Mega-NeRF params.pt.
    `params_path`: params.pt or its mask folder."""
    params_path = params_file(params_path)
    params = load_params(params_path)
    margin = params.boundary_margin if params.boundary_margin is not None else default_margin
    if margin < 1:
        raise UserError(f"--boundary_margin must be at least 1, got {margin}")
    subs = find_submodules(prefix, params.num_cells)
    check_partition(subs, params_path)  # first: another partition's cells may be missing here too
    if not allow_empty_cells:
        require_all(subs, prefix)
    check_submodules(subs, params, params_path)
    state = container_state(subs, params, margin)
    if all(entry is None for entry in state["submodules"]):
        raise UserError(f"every submodule of {prefix}<k> is empty: nothing to merge")
    # a killed merge's temp (the whole container's size) goes, and nothing else of the folder
    if (note := remove_temp_files_of(output)) is not None:
        print(note, file=sys.stderr)
    save_container(output, state)
    report(subs, state, output)
    return state


def report(subs: list[Submodule | None], state: dict[str, Any], output: Path) -> None:
    """Print what went in: one line per cell, then the file's size."""
    for k, (s, entry) in enumerate(zip(subs, state["submodules"], strict=True)):
        if s is None:
            print(f"warning: cell {k}: no checkpoint, contributes nothing", file=sys.stderr)
        elif entry is None:
            print(f"cell {k}: {s.path} (empty cell: no rays, contributes nothing)")
        else:
            print(f"cell {k}: {s.path} (step {entry['step']})")
            planned = s.state.get("iterations")  # the run's planned steps; older checkpoints lack them
            if planned is not None and entry["step"] < planned:
                print(f"warning: cell {k} stopped at step {entry['step']} of {planned} (still training, or "
                      "interrupted: its rerun finishes it); merged as it is", file=sys.stderr)
    print(f"wrote {output}: {len(subs)} cells, {output.stat().st_size / 2 ** 20:.1f} MiB")

