"""Evaluate a container on the val images: render each whole, score its right half, write renders and metrics.

Protocols (`--eval_protocol`, the same one training was given): Mega-NeRF's (the default, kept for comparable
numbers) trains val images on their left halves, so PSNR, SSIM and LPIPS are taken on their right halves only,
each rendered with its own appearance embedding; strict trains no pixel of a val image and scores it whole,
rendered with the appearance embedding of the training image whose camera is nearest. Every printed table and
metrics.json say which, and how SSIM and LPIPS were computed.

Outputs under `--exp_name`: rgb/<name>.png, depth/<name>.png (colour-mapped, near bright), compare/<name>.png
(ground truth | render | depth) and metrics.json (per image, and the mean over images).

Distributed (`python -m torch.distributed.run --nproc_per_node N mega_nerf/eval.py ...`): the val images are
sharded over ranks, each rank writes its own renders, rank 0 gathers the metrics and writes metrics.json. An
image is rendered the same way whichever rank gets it (fixed ray chunks, no jitter), so the metrics do not
depend on the world size. A rank that fails posts its error and every other rank stops with it before its next
image (mega_nerf.distributed); a rank that dies silently is waited for at most `--timeout_minutes`.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from mega_nerf.allocator import keep_freed_blocks
from mega_nerf.clock import PartsClock
from mega_nerf.data.dataset import MEGA_NERF, STRICT, Dataset, ImageMetadata, dataset_fingerprint, load_dataset
from mega_nerf.distributed import DistInfo, check_failures, distributed_job, gather_objects, shard, single_host
from mega_nerf.errors import UserError
from mega_nerf.evaluation.lpips import LPIPS, LPIPS_IMPLEMENTATION, load_lpips_nets
from mega_nerf.evaluation.metrics import SSIM_IMPLEMENTATION, SSIM_WINDOW, image_metrics
from mega_nerf.fields import kernels
from mega_nerf.imaging import colorize_depth, render_image, to_uint8
from mega_nerf.io import remove_temp_files, write_json, write_png
from mega_nerf.merging.container import Container, ContainerInfo, load_container
from mega_nerf.ordered import OrderedQueue
from mega_nerf.rays import SceneBounds, camera_directions
from mega_nerf.render import default_chunk

EMBEDDINGS_ONLY = "mega-nerf, val embeddings only"  # Mega-NeRF's protocol under training's --val_embeddings_only
PROTOCOL_TEXT = {
    MEGA_NERF: "metrics on the right half of each val image (its left half was trained on: Mega-NeRF's protocol)",
    EMBEDDINGS_ONLY: "metrics on the right half of each val image (its left half trained only its own appearance "
                     "embedding, not the field: --val_embeddings_only, stricter than Mega-NeRF's protocol)",
    STRICT: "metrics on each whole val image, no pixel of which was trained on (strict protocol)"}
APPEARANCE_TEXT = {
    MEGA_NERF: "each val image's own embedding, trained on its left half",
    EMBEDDINGS_ONLY: "each val image's own embedding, trained on its left half (which did not train the field)",
    STRICT: "the embedding of the training image whose camera centre is nearest (the val image's own is untrained)"}
IMPLEMENTATIONS = {
    "ssim": SSIM_IMPLEMENTATION,
    "lpips": LPIPS_IMPLEMENTATION}
METRICS = ("psnr", "ssim", "lpips_alex", "lpips_vgg")
TABLE_ROWS = 20  # beyond this many images the table lists the worst ones (metrics.json has them all)
ImageHook = Callable[[int], None]
# Seconds of a rank's loop: render (the loop's own), score and write (on the worker threads), wait (the loop's, for
# the workers). Renders and scores share the GPU's stream, so each may include waiting for the other's kernels.
LoopClock = dict[str, float]
PICTURES = ("rgb", "depth", "compare")  # the folders of an image's PNGs (score_and_write)
WORKERS = 2  # threads scoring and writing rendered images while the next ones render
PENDING_PIXELS = 1 << 25  # rendered pixels waiting for the workers at most: about 0.7 GB of float32 on the device


@dataclass
class EvalJob:
    container: Container
    info: ContainerInfo
    images: list[ImageMetadata]  # the val images, in appearance-index order
    appearance: dict[str, int]  # image name -> the appearance index it is rendered with
    protocol: str  # dataset.PROTOCOLS
    output: Path
    ray_chunk: int
    lpips: dict[str, LPIPS | None]
    device: torch.device


def check_dataset(info: ContainerInfo, dataset: Dataset, train_scale_factor: int) -> None:
    """UserError when the container's submodules were trained on another dataset than `dataset` (loaded at
    `train_scale_factor`, the scale the fingerprint was taken at)."""
    if len(dataset.images) != info.n_images:
        raise UserError(f"{info.path}: trained on {info.n_images} images, but {dataset.path} holds "
                        f"{len(dataset.images)}")
    if dataset_fingerprint(dataset) != info.dataset:
        raise UserError(f"{info.path}: trained on another dataset than {dataset.path} (names, sizes or poses "
                        f"differ), or at another scale than --train_scale_factor {train_scale_factor}")


def load_checked_dataset(info: ContainerInfo, path: str, train_scale_factor: int, scale_factor: int) -> Dataset:
    """The dataset at `scale_factor`, once checked against the container (at `train_scale_factor`)."""
    trained = load_dataset(path, train_scale_factor)
    check_dataset(info, trained, train_scale_factor)
    return trained if scale_factor == train_scale_factor else load_dataset(path, scale_factor)


@dataclass(frozen=True)
class EvalConfig:
    """One evaluation run, as `mega-nerf-eval` was asked for it (built in cli/eval)."""

    container_path: str
    dataset_path: str
    exp_name: str  # output directory
    val_scale_factor: int = 4  # Mega-NeRF's default
    train_scale_factor: int = 1  # the scale the submodules were trained at (checks the container's dataset)
    eval_protocol: str = MEGA_NERF  # which val pixels were trained and are scored (dataset.PROTOCOLS)
    lpips_weights_dir: str | None = None
    ray_chunk: int | None = None  # rays rendered at once; None: render.default_chunk for the device
    timeout_minutes: float = 10
    progress: bool = True


def prepare(config: EvalConfig, device: torch.device) -> EvalJob:
    """Validate the inputs (one-line errors) and load the container, dataset and LPIPS."""
    chunk = default_chunk(device) if config.ray_chunk is None else config.ray_chunk
    if chunk < 1:
        raise UserError(f"--ray_chunk must be at least 1, got {chunk}")
    container, info = load_container(config.container_path, device)
    dataset = load_checked_dataset(info, config.dataset_path, config.train_scale_factor, config.val_scale_factor)
    protocol = config.eval_protocol
    if info.eval_protocol != protocol:  # else metrics.json would say pixels were (or were not) trained wrongly
        raise UserError(f"{info.path}: trained under --eval_protocol {info.eval_protocol}; evaluate it with the "
                        f"same (got {protocol})")
    for meta in dataset.val:
        width = meta.W - meta.scored_columns_for(protocol).start
        if min(meta.H, width) < SSIM_WINDOW:
            part = "the right half" if protocol == MEGA_NERF else "the whole"
            raise UserError(f"--val_scale_factor {config.val_scale_factor}: {part} of '{meta.name}' "
                            f"({width}x{meta.H}) is under {SSIM_WINDOW} pixels a side (SSIM)")
    weights_dir = Path(config.lpips_weights_dir) if config.lpips_weights_dir else None
    appearance = {m.name: dataset.appearance_for(m, protocol) for m in dataset.val}
    return EvalJob(container, info, dataset.val, appearance, protocol, Path(config.exp_name), chunk,
                   load_lpips_nets(weights_dir, device), device)


@dataclass(frozen=True)
class Rendered:
    """One val image as rendered, on the device: what `score_and_write` takes."""

    meta: ImageMetadata
    rgb: torch.Tensor  # (H, W, 3) in [0, 1]
    depth: torch.Tensor  # (H, W)
    opacity: torch.Tensor  # (H, W)


def render_val_image(job: EvalJob, meta: ImageMetadata) -> Rendered:
    """Render a val image whole (fixed ray chunks, no jitter: the same pixels on any rank)."""
    out = render_image(job.container, meta.c2w, meta.intrinsics, meta.W, meta.H, job.appearance[meta.name],
                       job.info.bounds, job.info.render, job.ray_chunk)
    return Rendered(meta, out["rgb"].clamp(0, 1), out["depth"], out["opacity"])


def ends_on_ground(meta: ImageMetadata, bounds: SceneBounds, columns: slice, device: torch.device) -> torch.Tensor:
    """(H, columns) bool: the pixels whose ray meets the ground plane of the altitude slab within its sampled
    interval (heading down from above it, between `near` and `far`), as rays.near_far bounds it: such a ray must
    end on a surface. Only each ray's down component is formed (camera direction times the pose's first row,
    over its length), not whole rays."""
    rows, cols = torch.meshgrid(torch.arange(meta.H, device=device), torch.arange(meta.W, device=device)[columns],
                                indexing="ij")
    c2w = meta.c2w.to(device)
    d = camera_directions(meta.intrinsics.to(device), cols.flatten().to(c2w.dtype), rows.flatten().to(c2w.dtype))
    down = (d @ c2w[0, :3]) / d.norm(dim=-1)  # x points down
    height = bounds.altitude[1] - c2w[0, 3]  # from the camera down to the ground plane
    return ((down > 0) & (height >= bounds.near * down) & (height <= bounds.far * down)).view(meta.H, -1)


def transparent_ground(ground: torch.Tensor, opacity: torch.Tensor) -> float | None:
    """Of the pixels whose ray must end on the ground (`ground`, bool: ends_on_ground), the share rendered with
    opacity under 1/2: ground the model left transparent, which the background paints and other views see wrong
    (docs/DESIGN.md, Background). None without such pixels."""
    count = int(ground.sum())
    return None if count == 0 else int((ground & (opacity < 0.5)).sum()) / count


def score_and_write(job: EvalJob, rendered: Rendered) -> tuple[dict[str, Any], float, float]:
    """Score the protocol's part of a rendered image against its ground truth, then write rgb, depth
    (colour-mapped) and compare (ground truth | render | depth) PNGs. Runs on a worker thread beside the next
    images' renders. Returns {index, name, metrics} and the seconds scoring and writing took."""
    start = time.perf_counter()
    meta = rendered.meta
    gt = meta.load_rgb().to(job.device).float() / 255
    scored = meta.scored_columns_for(job.protocol)
    metrics = image_metrics(rendered.rgb[:, scored], gt[:, scored], job.lpips)
    if job.info.bounds.altitude is not None:  # only a slab says where the ground must be
        ground = ends_on_ground(meta, job.info.bounds, scored, job.device)
        metrics["transparent_ground"] = transparent_ground(ground, rendered.opacity[:, scored])
    scoring = time.perf_counter() - start
    depth = colorize_depth(rendered.depth, rendered.opacity)
    rgb = to_uint8(rendered.rgb)
    compare = np.concatenate([to_uint8(gt), rgb, depth], 1)
    for folder, picture in zip(PICTURES, (rgb, depth, compare), strict=True):
        write_png(job.output / folder / f"{meta.name}.png", picture)
    return {"index": meta.index, "name": meta.name, "metrics": metrics}, scoring, time.perf_counter() - start - scoring


def summarise(results: list[dict[str, Any]], config: EvalConfig, val_embeddings_only: bool = False
              ) -> dict[str, Any]:
    """metrics.json's contents: per image (val order) and the mean over images (None where unavailable);
    `val_embeddings_only`: the container's submodules were trained so (the protocol's text says so)."""
    results = sorted(results, key=lambda r: r["index"])
    mean: dict[str, float | None] = {}
    for key in METRICS:
        values = [r["metrics"][key] for r in results]
        mean[key] = None if any(v is None for v in values) else float(np.mean(values))
    grounds = [r["metrics"]["transparent_ground"] for r in results if "transparent_ground" in r["metrics"]]
    if grounds:  # with a slab: the mean over the images with pixels that must end on the ground
        shares = [share for share in grounds if share is not None]
        mean["transparent_ground"] = float(np.mean(shares)) if shares else None
    protocol = config.eval_protocol
    text = EMBEDDINGS_ONLY if val_embeddings_only else protocol
    return {"protocol": PROTOCOL_TEXT[text], "eval_protocol": protocol, "val_embeddings_only": val_embeddings_only,
            "appearance": APPEARANCE_TEXT[text],
            "implementations": IMPLEMENTATIONS, "container": str(config.container_path),
            "dataset": str(config.dataset_path), "val_scale_factor": config.val_scale_factor,
            "images": {r["name"]: r["metrics"] for r in results}, "mean": mean}


def _cells(metrics: dict[str, float | None]) -> str:
    """PSNR, SSIM and both LPIPS as fixed-width table cells ('n/a' where unavailable)."""
    out = ""
    for key, width, digits in (("psnr", 8, 2), ("ssim", 8, 4), ("lpips_alex", 12, 4), ("lpips_vgg", 12, 4)):
        value = metrics[key]
        out += f"{'n/a':>{width}}" if value is None else f"{value:{width}.{digits}f}"
    return out


def format_table(report: dict[str, Any]) -> str:
    """One screen: every image (or the TABLE_ROWS worst by PSNR), then the mean, under the protocol line."""
    images = report["images"]
    rows = list(images.items())
    note = ""
    if len(rows) > TABLE_ROWS:
        rows = sorted(rows, key=lambda item: item[1]["psnr"])[:TABLE_ROWS]
        note = f"  ({TABLE_ROWS} worst of {len(images)} images by PSNR; all in metrics.json)"
    width = max(12, *(len(name) for name, _ in rows))
    lines = [f"{len(images)} val images, {report['protocol']}; appearance: {report['appearance']}",
             f"{'image':<{width}}{'PSNR':>8}{'SSIM':>8}{'LPIPS-alex':>12}{'LPIPS-vgg':>12}{note}"]
    lines += [f"{name:<{width}}{_cells(m)}" for name, m in rows]
    lines.append(f"{'mean':<{width}}{_cells(report['mean'])}")
    ground = report["mean"].get("transparent_ground")
    if ground is not None:
        lines.append(f"transparent ground: {ground:.1%} of the scored pixels whose ray must end on the ground (mean "
                     "over images) are rendered with opacity under 1/2, where the background shows")
    return "\n".join(lines)


def throughput_line(images: list[ImageMetadata], seconds: float, device: torch.device, clock: LoopClock) -> str:
    """Rank 0's own share: images, rays per second (rendering, scoring and writing included), where the time
    went, peak GPU memory."""
    rays = sum(meta.H * meta.W for meta in images)
    line = f"rank 0: {len(images)} images, {rays:,} rays in {seconds:.1f} s ({rays / max(seconds, 1e-9):,.0f} rays/s"
    line += f"; render {clock['render']:.1f} s; on {WORKERS} threads beside it: score {clock['score']:.1f} s, write "
    line += f"{clock['write']:.1f} s; waited {clock['wait']:.1f} s for them)"
    if device.type == "cuda":
        line += f", peak GPU memory {torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f} GiB"
    return line


def evaluate(config: EvalConfig, on_image: ImageHook | None = None, on_ready: Callable[[], None] | None = None,
             clock: PartsClock | None = None) -> dict[str, Any] | None:
    """Run the evaluation on this rank's share of the val images. Returns the report on rank 0, else None.
    `on_image` is called with the number of images this rank has rendered after each one (tests stop a rank
    with it); `on_ready`, on rank 0, once the container, dataset and protocol have passed their checks (the
    command saves its options then, so a refused run leaves the saved ones alone). Rank 0 prints where the run's
    time went (`clock`: its parts so far, e.g. the command's start-up)."""
    clock = PartsClock() if clock is None else clock
    with distributed_job(config.timeout_minutes) as info:
        clock.mark("ranks")
        keep_freed_blocks(info.device)  # each chunk's temporaries, reused instead of faulted in again, as in training
        if info.device.type == "cuda":
            kernels.prepare_in_background()  # overlaps loading the container and the dataset, as in training
        job = prepare(config, info.device)
        if on_ready is not None and info.is_main:
            on_ready()
        if single_host(info):  # temp names carry a PID, not a host: another machine's live rank could look dead
            for folder in PICTURES:
                remove_temp_files(job.output / folder)  # what killed runs left mid-write
        clock.mark("container and dataset")
        mine = shard(job.images, info)
        bar = tqdm(mine, desc="eval", unit="image", disable=not info.is_main or not config.progress)
        loop: LoopClock = {"render": 0.0, "score": 0.0, "write": 0.0, "wait": 0.0}
        start = time.perf_counter()
        workers = ThreadPoolExecutor(WORKERS, thread_name_prefix="eval-worker", initializer=_use_device,
                                     initargs=(job.device,))
        try:
            with torch.no_grad():
                results = _evaluate_share(job, bar, info, loop, workers, on_image)
        except BaseException:
            workers.shutdown(wait=False, cancel_futures=True)  # the failure is posted now, not after queued work
            raise
        workers.shutdown()
        seconds = time.perf_counter() - start
        clock.mark("images", f"{len(mine)} on this rank")
        gathered = gather_objects(results, info)
        if info.world_size > 1:
            clock.mark("waiting for the other ranks")  # the results are small: gathering them is waiting
        if gathered is None:
            return None
        report = summarise([r for rank in gathered for r in rank], config, job.info.val_embeddings_only)
        write_json(job.output / "metrics.json", report)
        clock.mark("report")
        print(format_table(report))
        print(throughput_line(mine, seconds, info.device, loop))
        print(clock.summary("eval: {total} on rank 0" if info.world_size > 1 else "eval: {total}"))
        print(f"wrote {job.output / 'metrics.json'}")
        return report


def _evaluate_share(job: EvalJob, images: Iterable[ImageMetadata], info: DistInfo, clock: LoopClock,
                    workers: ThreadPoolExecutor, on_image: ImageHook | None) -> list[dict[str, Any]]:
    """Render `images` in turn while `workers` score and write the ones before. Rendered images wait for them up
    to PENDING_PIXELS (mega_nerf.ordered), so the renders are held back only then: by a slow disk, or by the
    first scoring's one-time cost (on an H200, rank 0's scoring took 11.6 s for 45 `city` images and for 23
    alike). A worker's error is raised before the next render. Returns the results in order, once every PNG is
    written."""
    results: list[dict[str, Any]] = []
    with OrderedQueue(PENDING_PIXELS) as queue:
        for count, meta in enumerate(images, 1):
            check_failures(info)  # another rank's error ends this one too
            queue.raise_failed()  # a worker's error, so that this rank stops (and tells the others) now
            start = time.perf_counter()
            rendered = render_val_image(job, meta)
            clock["render"] += time.perf_counter() - start
            queue.add(workers.submit(score_and_write, job, rendered), meta.H * meta.W)
            results.extend(_finish(future, clock) for future in queue.due())
            if on_image is not None:
                on_image(count)
        results.extend(_finish(future, clock) for future in queue.drain())
    return results


def _use_device(device: torch.device) -> None:
    """A worker thread's CUDA device: this rank's (a new thread's is the first GPU)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


def _finish(work: Future, clock: LoopClock) -> dict[str, Any]:
    """An image's result once scored and written (its error raised here); the wait and the work counted."""
    start = time.perf_counter()
    result, scoring, writing = work.result()
    clock["wait"] += time.perf_counter() - start
    clock["score"] += scoring
    clock["write"] += writing
    return result
