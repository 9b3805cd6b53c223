"""The shared image store: every image of a dataset decoded once, at the training scale, into one file that the
ray chunks of every cell index into (data.chunks), instead of copying each ray's colour into each cell's chunks.

`<store>/<dataset fingerprint>.rgb`: the images' (H, W, 3) uint8 RGB, concatenated in image-index order, nothing
else; so pixel `key` (data.chunks: offset[image] + pixel) is bytes [3 key, 3 key + 3). The name fixes the dataset
and the scale (data.dataset.dataset_fingerprint); the file is written atomically (io.atomic_open), so one of the
right size is complete. Several trainers may write it at once: each writes its own temp file and the last rename
wins, with the same bytes. Images are decoded by a pool of threads (OpenCV releases the GIL) in order.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np

from mega_nerf.data.dataset import Dataset, dataset_fingerprint
from mega_nerf.io import atomic_open
from mega_nerf.ordered import OrderedQueue

SUFFIX = ".rgb"
T = TypeVar("T")
R = TypeVar("R")


def workers() -> int:
    """Threads for decoding: the CPUs this process may use, at most 16."""
    return max(1, min(16, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def ordered_map(fn: Callable[[T], R], items: Iterable[T], threads: int | None = None) -> Iterator[R]:
    """fn over `items` on a pool of threads, results in order; fewer than twice `threads` results wait
    (mega_nerf.ordered), so memory stays bounded however long the input; work not started is cancelled when
    the caller stops early or a call fails."""
    threads = threads or workers()
    with ThreadPoolExecutor(threads) as pool, OrderedQueue(2 * threads - 1) as queue:
        for item in items:
            queue.add(pool.submit(fn, item))
            yield from (future.result() for future in queue.due())
        yield from (future.result() for future in queue.drain())


def pixel_offsets(dataset: Dataset) -> np.ndarray:
    """(I + 1,) int64: where each image's pixels start in the key space (and the store, in pixels); the last entry
    is the dataset's pixel count, the keys' universe."""
    return np.concatenate([[0], np.cumsum([m.H * m.W for m in dataset.images], dtype=np.int64)])


def store_path(store_dir: Path, dataset: Dataset) -> Path:
    return store_dir / f"{dataset_fingerprint(dataset)}{SUFFIX}"


def store_bytes(dataset: Dataset) -> int:
    return int(pixel_offsets(dataset)[-1]) * 3


def store_complete(path: Path, dataset: Dataset) -> bool:
    """Whether the store file exists with the dataset's size (a complete one: writes are atomic)."""
    return path.is_file() and path.stat().st_size == store_bytes(dataset)


def write_store(path: Path, dataset: Dataset) -> None:
    """Decode every image (threads, in order) into the store file at `path`, atomically."""
    with atomic_open(path) as f:
        for rgb in ordered_map(lambda m: m.load_rgb().numpy(), dataset.images):
            f.write(rgb.tobytes())


def open_store(path: Path, dataset: Dataset) -> np.ndarray:
    """The store as a read-only memory map (P, 3) uint8, P the dataset's pixel count."""
    return np.memmap(path, np.uint8, "r", shape=(int(pixel_offsets(dataset)[-1]), 3))
