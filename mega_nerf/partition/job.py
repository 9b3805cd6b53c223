"""The partition job: compute a dataset's cells (partition.cells), write every image's mask for every cell
(in partition.maskfile's format), on one process or under torch.distributed.run, then report and draw the cells.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

from mega_nerf.allocator import keep_freed_blocks
from mega_nerf.clock import PartsClock
from mega_nerf.data.dataset import Dataset, ImageMetadata
from mega_nerf.distributed import DistInfo, barrier, check_failures, distributed_job, gather_objects, ranks_here, shard
from mega_nerf.errors import UserError
from mega_nerf.fields import kernels
from mega_nerf.io import memory_shortfall, remove_temp_files, write_bgr, write_json
from mega_nerf.ordered import OrderedQueue
from mega_nerf.partition.cells import (
    EXACT,
    PartitionParams,
    cell_membership,
    centroid_distances,
    default_chunks,
    image_membership,
    load_params,
    membership_bytes,
)
from mega_nerf.partition.maskfile import (
    MEGA_NERF_SUFFIX,
    SUFFIX,
    find_mask,
    load_mask,
    mask_shape,
    missing_masks,
    remove_stale_temp_files,
    sync_mask_folders,
    write_mask,
)

ImageHook = Callable[[int], None]
# Threads compressing and writing masks. zlib and fsync release the GIL, but each thread takes it back between
# them, and every such handover stalls the main thread that launches the GPU's work: on survey256 the masks took
# 1.67 s with 8 threads, 1.30-1.35 s with 3, 1.37-1.41 s with 2 (writes then lag), against 1.04 s of membership
# alone (bench/RESULTS.md, thirteenth session; a local disk).
WRITERS = 3
# Masks computed but not yet written, at most (queue_limit): those of WRITE_QUEUE of the job's largest images, and
# WRITE_QUEUE_BYTES (a 20 MP image over 8 x 8 cells is 1.3 GB of masks), but one image for each writer
WRITE_QUEUE = 16
WRITE_QUEUE_BYTES = 1 << 30


@dataclass
class MaskJob:
    """One run of scripts/create_cluster_masks.py, validated."""

    dataset: Dataset
    params: PartitionParams
    output: Path
    resume: bool
    ray_chunk: int | None  # None: a default for the device (_write_masks)
    dist_chunk: int | None
    timeout_minutes: float
    progress: bool


def create_cluster_masks(job: MaskJob, on_image: ImageHook | None = None, clock: PartsClock | None = None
                         ) -> dict | None:
    """Write every train and val image's mask for every cell, each rank on its share of the images still to
    do, then check that every mask exists (each rank its share). Rank 0 writes params.pt first and the report
    last, prints where the run's time went (`clock`: its parts so far, e.g. the command's start-up) and returns
    the report. Sharding what is left (not all images) keeps ranks in step when resuming, so no rank waits at a
    barrier for longer than about one image takes."""
    clock = PartsClock() if clock is None else clock
    with distributed_job(job.timeout_minutes) as info:
        keep_freed_blocks(info.device)  # each chunk's temporaries, reused (allocator.py)
        if info.device.type == "cuda" and job.params.ray_samples == EXACT:
            kernels.prepare_in_background()  # the exact rule's kernel: Triton's one-time work overlaps the output's
        _prepare_output(job, info)
        clock.mark("ranks and output")
        damaged: list[Path] = []
        done = [m for m in job.dataset.images if job.resume and _complete(job, m, damaged)]
        if job.resume and info.is_main:
            print(f"{job.output}: resuming, {len(done)} of {len(job.dataset.images)} images already have their masks")
        if damaged and info.is_main:
            print(f"note: {len(damaged)} masks unreadable (e.g. {damaged[0]}): their images are computed again")
        done_names = {m.name for m in done}
        todo = [m for m in job.dataset.images if m.name not in done_names]
        barrier(info)  # every rank has listed what is done before any rank writes
        counts, rays, membership, waited = _write_masks(job, shard(todo, info), info, on_image)
        sync_mask_folders(job.output, job.params.num_cells)
        clock.mark("masks", f"membership {membership:.2f} s on {info.device.type}, waiting for writes "
                            f"{waited:.2f} s")
        for image in shard(done, info):
            counts += _read_masks(job, image).flatten(0, 1).sum(0)
            rays += image.H * image.W
        barrier(info)
        sizes = dict(shard(sorted(job.params.image_sizes.items()), info))
        problems = missing_masks(job.output, sizes, job.params.num_cells)
        gathered = gather_objects((counts.tolist(), rays, problems), info)
        if gathered is None:
            return None
        problems = [p for _, _, rank_problems in gathered for p in rank_problems]
        if problems:
            raise UserError(f"{job.output}: {len(problems)} masks missing or wrong after the run, "
                            f"e.g. {problems[0]}")
        report = write_report(job, [sum(c[k] for c, _, _ in gathered) for k in range(job.params.num_cells)],
                              sum(r for _, r, _ in gathered))
        clock.mark("checks and report")
        print(clock.summary("partition: {total} on rank 0" if info.world_size > 1 else "partition: {total}"))
        return report


def _prepare_output(job: MaskJob, info: DistInfo) -> None:
    """Refuse an existing output (unless resuming one made with the same settings); rank 0 makes the cell
    folders and writes params.pt while the others wait."""
    params_file = job.output / "params.pt"
    if job.output.exists() and not job.output.is_dir():
        raise UserError(f"{job.output}: exists and is not a directory")
    if job.output.exists() and not job.resume and any(job.output.iterdir()):
        raise UserError(f"{job.output}: already exists (pass --resume to finish it, or choose another "
                        "--output)")
    if job.resume and params_file.is_file():
        old = load_params(params_file)
        old.check_dataset(job.dataset, params_file)
        changed = old.differences(job.params)
        if changed:
            raise UserError(f"{params_file}: made with other settings ("
                            + ", ".join(_setting(name, old, job.params) for name in changed)
                            + "); choose another --output")
    elif job.resume and job.output.is_dir() and any(path.suffix in (SUFFIX, MEGA_NERF_SUFFIX)
                                                    for path in job.output.glob("[0-9]*/*")):
        # params.pt is written before any mask: these masks' settings are unknown, and would be kept as this run's
        raise UserError(f"{job.output}: holds masks but no params.pt, so their settings are unknown; choose another "
                        "--output (or delete this folder)")
    check_memory(job, info.device, ranks_here(info))
    barrier(info)  # every rank has looked before rank 0 creates anything
    if info.is_main:
        remove_temp_files(job.output)  # params.pt's or the report's, of a killed run
        for k in range(job.params.num_cells):
            (job.output / str(k)).mkdir(parents=True, exist_ok=True)
            remove_stale_temp_files(job.output / str(k))
        if not params_file.is_file():
            job.params.save(params_file)
    barrier(info)


def _setting(name: str, old: PartitionParams, new: PartitionParams) -> str:
    """One differing setting in words: its value there and now (tensors by name only)."""
    there, here = getattr(old, name), getattr(new, name)
    if isinstance(there, torch.Tensor) or isinstance(here, torch.Tensor):
        return name
    return f"{name} {there} there, {here} now"


def check_memory(job: MaskJob, device: torch.device, ranks: int = 1) -> None:
    """One UserError line naming --grid_dim when the largest image's membership would not fit in the memory free
    now (cells.membership_bytes: at 300 x 300 cells the exact rule's reference asks for 65 GB a tensor), before
    anything is written. `ranks` of the job run on this machine, each as large in its memory (and, on a CPU, in
    the memory their work takes too; each GPU is its rank's)."""
    default_ray, default_dist = default_chunks(device)
    pixels = max(m.H * m.W for m in job.dataset.images)
    host, work = membership_bytes(job.params, pixels, device, job.ray_chunk or default_ray,
                                  job.dist_chunk or default_dist)
    host += pending_bytes(pixels * job.params.num_cells)
    on_host = ranks if device.type == "cpu" else 1
    if (short := memory_shortfall(device, host * ranks, work * on_host)) is not None:
        where, needed, free = short
        X, Y = job.params.grid_dim
        each = f" (in each of the {ranks} ranks on this machine)" if ranks > 1 and where == "memory" else ""
        raise UserError(f"--grid_dim {X} {Y}: its {X * Y:,} cells need about {needed / 1e9:,.1f} GB of {where} "
                        f"for an image's masks and those waiting to be written{each}, {free / 1e9:,.1f} GB free; "
                        "choose a smaller grid")


def queue_limit(image_bytes: int) -> int:
    """The write queue's bound in bytes of masks, for images of at most `image_bytes` each (_write_masks): as many
    as WRITE_QUEUE and WRITE_QUEUE_BYTES allow, but one image for each writer however large (an image's masks are
    one writer's work)."""
    return max(1, WRITERS * image_bytes, min(WRITE_QUEUE * image_bytes, WRITE_QUEUE_BYTES))


def pending_bytes(image_bytes: int) -> int:
    """Host bytes of masks waiting beside the newest image's (which membership_bytes counts), for images of
    `image_bytes`: the write queue's bound and each writer's copy of the image it writes."""
    return queue_limit(image_bytes) + WRITERS * image_bytes


def _complete(job: MaskJob, image: ImageMetadata, damaged: list[Path]) -> bool:
    """Whether an earlier run wrote every cell's mask of `image` (UserError if one has another size: masks of
    another dataset or scale). Only our masks' headers are read (every rank lists every image, and a city's masks
    are hundreds of thousands of files): one whose header does not read (emptied, damaged outside our writes, which
    fsync each mask before it appears) is added to `damaged` and its image counts as not done, so that it is
    written again; a damaged body is found when the done images' masks are counted (_read_masks)."""
    for k in range(job.params.num_cells):
        path = find_mask(job.output / str(k), image.name)
        if path is None:
            return False
        try:
            shape = mask_shape(path)
        except UserError:
            damaged.append(path)
            return False
        if shape != (image.H, image.W):
            load_mask(path.parent, image.name, image.H, image.W)  # raises the one-line size error
    return True


def _read_masks(job: MaskJob, image: ImageMetadata) -> torch.Tensor:
    """(H, W, K) bool: an image's masks as written; a damaged one is a UserError saying how to redo it."""
    try:
        return torch.stack([load_mask(job.output / str(k), image.name, image.H, image.W)
                            for k in range(job.params.num_cells)], -1)
    except UserError as e:
        raise UserError(f"{e}; delete it and run again with --resume") from None


def _write_image_masks(job: MaskJob, image: ImageMetadata, member: torch.Tensor) -> torch.Tensor:
    """Write one image's K masks (member: (H, W, K) bool); returns its rays per cell (K,)."""
    planes = member.permute(2, 0, 1).contiguous()  # one copy, so that no mask is gathered from strided memory
    for k in range(job.params.num_cells):
        write_mask(job.output / str(k) / f"{image.name}{SUFFIX}", planes[k])
    return planes.flatten(1).sum(1)


def _write_masks(job: MaskJob, images: list[ImageMetadata], info: DistInfo, on_image: ImageHook | None
                 ) -> tuple[torch.Tensor, int, float, float]:
    """Compute and write the masks of `images`; returns rays per cell (K,) and rays in all, for the report, and
    the seconds spent computing memberships and waiting for the writers.
    Masks are compressed and written (each file fsynced) by a pool of threads while the next image is computed;
    the masks waiting are bounded in bytes (queue_limit, mega_nerf.ordered), and those not started are cancelled on
    an error.
    `on_image` is called with the number of images written after each one, in order (tests stop a run with it)."""
    default_ray, default_dist = default_chunks(info.device)
    ray_chunk, dist_chunk = job.ray_chunk or default_ray, job.dist_chunk or default_dist
    counts = torch.zeros(job.params.num_cells, dtype=torch.int64)
    rays, written, membership, waited = 0, 0, 0.0, 0.0

    def finish(future: Future[torch.Tensor]) -> None:
        nonlocal counts, written, waited
        start = time.perf_counter()
        counts += future.result()
        waited += time.perf_counter() - start
        written += 1
        bar.update()
        if on_image is not None:
            on_image(written)
    share = " (rank 0's share)" if info.world_size > 1 else ""
    bar = tqdm(total=len(images), desc=f"cluster masks{share}", unit="image",
               disable=not (info.is_main and job.progress))
    K = job.params.num_cells
    limit = queue_limit(max((m.H * m.W * K for m in images), default=1))
    with bar, ThreadPoolExecutor(WRITERS) as pool, OrderedQueue(limit) as queue:
        for group in _groups(images, ray_chunk):
            check_failures(info)  # another rank's error ends this one too
            start = time.perf_counter()
            try:
                members = image_membership(group, job.params, info.device, ray_chunk, dist_chunk)
            except torch.OutOfMemoryError:
                names = group[0].name if len(group) == 1 else f"{group[0].name} .. {group[-1].name}"
                raise UserError(f"{names}: out of GPU memory at --ray_chunk {ray_chunk} --dist_chunk {dist_chunk}; "
                                "give smaller ones") from None
            membership += time.perf_counter() - start  # the results are on the CPU: the device's work is done
            for image, member in zip(group, members, strict=True):
                queue.add(pool.submit(_write_image_masks, job, image, member), image.H * image.W * K)
                rays += image.H * image.W
                for future in queue.due():
                    finish(future)
        for future in queue.drain():
            finish(future)
    return counts, rays, membership, waited


def _groups(images: list[ImageMetadata], ray_chunk: int) -> list[list[ImageMetadata]]:
    """Consecutive images whose pixels fit in one ray chunk together (an image larger than that alone), so that
    small images share the GPU's launches (image_membership)."""
    groups: list[list[ImageMetadata]] = []
    pixels = 0
    for image in images:
        if not groups or pixels + image.H * image.W > ray_chunk:
            groups.append([])
            pixels = 0
        groups[-1].append(image)
        pixels += image.H * image.W
    return groups


def write_report(job: MaskJob, counts: list[int], rays: int) -> dict:
    """Save `partition.json` (rays per cell, overlap factor = assigned rays / rays, empty cells) and
    `partition.png`, print a summary, and return the report."""
    p = job.params
    report = {"dataset": str(Path(job.dataset.path).resolve()), "images": len(job.dataset.images), "rays": rays,
              "grid_dim": list(p.grid_dim), "boundary_margin": p.boundary_margin,
              "ray_samples": p.ray_samples, "cluster_2d": p.cluster_2d, "rays_per_cell": counts,
              "overlap_factor": sum(counts) / max(rays, 1),
              "empty_cells": [k for k, c in enumerate(counts) if c == 0]}
    write_json(job.output / "partition.json", report)
    positions = torch.stack([m.c2w[:, 3] for m in job.dataset.images])
    write_bgr(job.output / "partition.png", draw_partition(positions, p))
    print(f"{job.output}: {p.num_cells} cells, {rays} rays, overlap factor {report['overlap_factor']:.3f}")
    print("rays per cell: " + ", ".join(f"{k}: {c}" for k, c in enumerate(counts)))
    if report["empty_cells"]:
        print(f"warning: empty cells {report['empty_cells']} (no ray reaches them; their submodules would "
              "learn nothing: use a smaller --grid_dim)")
    note = overlap_note(report["overlap_factor"], p.num_cells)
    if note:
        print(note)
    return report


def overlap_note(overlap: float, cells: int) -> str | None:
    """A line for a partition whose rays lie, besides their own cell, in more than half of the others on average
    (street-level views: 3.0 of 4 cells, 10.8 of 16; aerial ones 1.5-1.7 of 4, bench/RESULTS.md): each cell then
    trains on most of the scene's rays. Every ray in every cell asks about the altitude slab instead."""
    if cells < 2 or overlap - 1 <= (cells - 1) / 2:
        return None
    if overlap > cells - 1e-9:  # every ray in every cell: what a slab below the cameras gives
        return (f"note: every ray lies in all {cells} cells: is --ray_altitude_range right? (a slab below the "
                "cameras or far from the scene does this; scripts/preview_dataset.py draws it)")
    return (f"note: a ray lies in {overlap:.1f} of the {cells} cells on average, so the mean cell trains on "
            f"{overlap / cells:.0%} of the scene's rays (views that see across the scene do this, street-level ones "
            "most: see the README's 'Street-level captures')")


def _cell_colours(num_cells: int) -> np.ndarray:
    """(K, 3) uint8 BGR, hues spread evenly."""
    hues = np.arange(num_cells) * 180 // num_cells
    hsv = np.stack([hues, np.full(num_cells, 90), np.full(num_cells, 235)], -1)
    return cv2.cvtColor(hsv.astype(np.uint8)[None], cv2.COLOR_HSV2BGR)[0]


def draw_partition(positions: torch.Tensor, params: PartitionParams, size: int = 800) -> np.ndarray:
    """Top-down picture (BGR uint8): y to the right, z down the image, as seen from above (x points down).

    Cells are coloured by nearest centroid, darker where a point at the centroids' altitude belongs to
    several cells (the boundary band); black lines are the cell boundaries, white dots the cameras (N, 3),
    crosses the centroids.
    """
    cent = params.centroids
    yz = torch.cat([positions[:, 1:], cent[:, 1:]]).double()
    lo, hi = yz.min(0).values, yz.max(0).values
    pad = 0.1 * (hi - lo).max().clamp_min(1e-6)
    lo, hi = lo - pad, hi + pad
    scale = size / (hi - lo).max()
    w, h = (int(math.ceil(v)) for v in ((hi - lo) * scale).tolist())
    v, u = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    points = torch.stack([torch.full_like(u, cent[0, 0].item()), lo[0] + u / scale, lo[1] + v / scale], -1)
    points = points.reshape(-1, 3).float()
    nearest, shared = torch.empty(h * w, dtype=torch.long), torch.empty(h * w, dtype=torch.bool)
    for s in range(0, h * w, 1 << 16):
        chunk = points[s:s + (1 << 16)]
        nearest[s:s + chunk.shape[0]] = centroid_distances(chunk, cent, params.cluster_2d).argmin(1)
        shared[s:s + chunk.shape[0]] = cell_membership(chunk, cent, params.boundary_margin or 1.0,
                                                       params.cluster_2d).sum(1) > 1
    labels = nearest.view(h, w).numpy()
    image = _cell_colours(params.num_cells)[labels]
    image[shared.view(h, w).numpy()] //= 2
    edges = np.zeros((h, w), bool)
    edges[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edges[1:] |= labels[1:] != labels[:-1]
    image[edges] = 0

    def pixel(p: torch.Tensor) -> tuple[int, int]:
        return int((p[1] - lo[0]) * scale), int((p[2] - lo[1]) * scale)
    for p in positions:
        cv2.circle(image, pixel(p), 3, (40, 40, 40), -1, cv2.LINE_AA)
        cv2.circle(image, pixel(p), 2, (255, 255, 255), -1, cv2.LINE_AA)
    for k, c in enumerate(cent):
        cv2.drawMarker(image, pixel(c), (0, 0, 0), cv2.MARKER_CROSS, 14, 2)
        u, v = pixel(c)
        cv2.putText(image, str(k), (u + 6, v - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    X, Y = params.grid_dim
    caption = f"grid {X}x{Y}, margin {params.boundary_margin}: darker = several cells"
    cv2.putText(image, caption, (8, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    return image
