"""A cell's training rays on disk in under a byte each, plus a share of one image store: written once, streamed by
the trainer.

A ray is the key `offset[image] + pixel` (data.store.pixel_offsets): its place among the dataset's pixels. Every
training ray of the cell goes to one of C chunks at random (C = ceil(rays / chunk_rays)), so each chunk is a
random sample of the cell; a chunk stores its keys sorted, Elias-Fano coded (data.keys: 2 + log2(pixels / keys)
bits a key). Colours are not copied: the stream gathers them from the dataset's image store (data.store), one
file shared by every cell. Rays are regenerated from (image, pixel) and the poses; nothing float is stored.

On disk (each directory of `--chunk_paths`; chunks go round-robin over them):
    chunk_<c>.keys   one chunk's keys (data.keys format)
    plan.json        written before the first chunk: what they will hold, so a killed write resumes (keeping the
                     chunks already written) rather than starting over
    manifest.json    written last, in every directory: version, dataset fingerprint, masks fingerprint, scale,
                     seed, ray count, store file name and the chunk list. Only a manifest marks chunks as usable.
and `<image store>/<dataset fingerprint>.rgb`. Every file appears under its final name only when complete
(io.atomic_open). A later run reuses matching chunks, refuses those of another dataset, mask set or scale (or of
the older .npy format) in one line, and refuses a directory holding anything but chunks.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from mega_nerf.data.dataset import MEGA_NERF, Dataset, ImageMetadata, dataset_fingerprint
from mega_nerf.data.keys import decode_keys, encode_keys, encoded_size
from mega_nerf.data.store import (
    open_store,
    ordered_map,
    pixel_offsets,
    store_bytes,
    store_complete,
    store_path,
    write_store,
)
from mega_nerf.errors import UserError
from mega_nerf.io import atomic_write, remove_temp_files_of, write_json
from mega_nerf.partition.maskfile import load_mask

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
PLAN = "plan.json"
KEY_BUDGET = 1 << 27  # keys held in memory at once while writing (1 GiB of int64)


@dataclass
class Manifest:
    version: int
    dataset: str  # data.dataset.dataset_fingerprint: names, sizes, scale and poses
    masks: str  # fingerprint of the cell's mask files ('' when training on every ray)
    scale_factor: int
    seed: int
    count: int
    store: str  # the image store's file name
    chunks: list[list]  # [directory index, file name, ray count] per chunk, in order
    protocol: str = MEGA_NERF  # the evaluation protocol: which val pixels are trained (dataset.PROTOCOLS)


def masks_fingerprint(mask_dir: Path | None) -> str:
    """SHA-1 over the names and bytes of a cell's mask files ('' without masks). Only regular files count: a
    folder left there by another tool (.ipynb_checkpoints) is no mask, and reading a pipe would wait forever."""
    if mask_dir is None:
        return ""
    h = hashlib.sha1()
    for p in sorted(p for p in mask_dir.iterdir() if p.is_file()):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def cell_mask(meta: ImageMetadata, mask_dir: Path | None) -> torch.Tensor:
    """(H, W) bool: the pixels of this image whose rays belong to the cell (all of them without a mask).
    Masks are stored at the dataset's full size and reduced to the training scale by 'any' pooling (a coarse
    pixel belongs to every cell one of its fine pixels does)."""
    if mask_dir is None:
        return torch.ones(meta.H, meta.W, dtype=torch.bool)
    s = meta.scale_factor
    mask = load_mask(mask_dir, meta.name, meta.H * s, meta.W * s)
    return mask.view(meta.H, s, meta.W, s).any(3).any(1) if s > 1 else mask


def training_mask(meta: ImageMetadata, mask_dir: Path | None, protocol: str = MEGA_NERF) -> torch.Tensor:
    """(H, W) bool: the cell's pixels that train it, all but the scored ones (a val image's right half, or all
    of it under the strict protocol: `ImageMetadata.scored_columns_for`)."""
    return cell_mask(meta, mask_dir) & meta.trained_mask(protocol)


def default_store_dir(chunk_paths: list[Path]) -> Path:
    """Where the image store goes unless given: `image_store` beside the first chunk directory, so the cells of
    one scene (scratch-0, scratch-1, ...) share it."""
    return Path(chunk_paths[0]).absolute().parent / "image_store"


def _chunk_of(count: int, chunks: int, seed: int, image: int) -> np.ndarray:
    """(count,) chunk of each of an image's rays: uniform, and the same draws on every pass and every run."""
    return np.random.default_rng([seed, image]).integers(0, chunks, count)


def _split(keys: np.ndarray, chunks: int, seed: int, image: int, group: list[int]) -> list[np.ndarray]:
    """An image's sorted keys that go to each chunk of `group` (_chunk_of), each still sorted. The chunk numbers
    are sorted as the narrowest unsigned integers that hold them: numpy's stable sort is then a radix sort, four
    times faster than on int64."""
    target = _chunk_of(len(keys), chunks, seed, image).astype(np.min_scalar_type(chunks - 1))
    order = np.argsort(target, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(target, minlength=chunks))])
    return [keys[order[bounds[c]:bounds[c + 1]]] for c in group]


def _read_json(file: Path) -> dict | None:
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text())
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise UserError(f"{file}: not a chunk manifest; delete {file.parent} to rewrite the chunks")
    return data


def _read_manifest(path: Path) -> Manifest | None:
    data = _read_json(path / MANIFEST)
    if data is None:
        return None
    if data.get("version") != FORMAT_VERSION:
        raise UserError(f"{path}: holds ray chunks of an older format (version {data.get('version')}); delete "
                        f"its chunk_* files and {MANIFEST} (or the whole directory) to rewrite them")
    try:
        return Manifest(**data)
    except TypeError:
        raise UserError(f"{path / MANIFEST}: not a chunk manifest; delete {path} to rewrite the chunks") from None


def _check_manifest(m: Manifest, expected: dict, path: Path) -> None:
    for key, value in expected.items():
        if key != "seed" and getattr(m, key) != value:
            saved = f"made under --eval_protocol {m.protocol}; " if key == "protocol" else ""
            raise UserError(f"{path}: holds chunks of another {key.replace('_', ' ')} ({saved}resuming an "
                            f"experiment? give the options it was trained with; else use another --chunk_paths or "
                            f"delete it)")


def _clear_unfinished(path: Path, keep: set[str]) -> None:
    """Remove what a killed write left but the chunks in `keep` (complete: written atomically); refuse to touch
    anything that is not ours."""
    path.mkdir(parents=True, exist_ok=True)
    for entry in path.iterdir():
        if not entry.name.startswith(("chunk_", MANIFEST, PLAN)):
            raise UserError(f"{path}: holds files that are not ray chunks ({entry.name}); "
                            "choose an empty or new --chunk_paths directory")
        if entry.name not in keep:
            entry.unlink()


def _check_space(needs: dict[Path, int]) -> None:
    """One line when a folder's disk has less free space than it is about to be given (bytes per folder)."""
    by_disk: dict[int, tuple[Path, int]] = {}
    for folder, size in needs.items():
        existing = next(p for p in [folder, *folder.absolute().parents] if p.exists())
        device = existing.stat().st_dev
        first, total = by_disk.get(device, (existing, 0))
        by_disk[device] = (first, total + size)
    for existing, size in by_disk.values():
        free = shutil.disk_usage(existing).free
        if free < size:
            raise UserError(f"{existing}: the ray chunks need {size:,} bytes but its disk has {free:,} free")


def _write_chunk(path: Path, keys: list[np.ndarray], universe: int) -> int:
    """Encode one chunk's keys (per image, each sorted, images in order) to `path`; returns the key count."""
    joined = np.concatenate(keys) if keys else np.zeros(0, np.int64)
    atomic_write(path, encode_keys(joined, universe))
    return len(joined)


def prepare_chunks(dataset: Dataset, mask_dir: Path | None, chunk_paths: list[Path], chunk_rays: int,
                   seed: int = 0, store_dir: Path | None = None, masks: str | None = None,
                   protocol: str = MEGA_NERF) -> Manifest:
    """Write the cell's ray chunks and the dataset's image store if missing, or verify and reuse them. Prints how
    many bytes go where before writing; one-line UserError when a disk lacks the space. `masks`: the masks'
    fingerprint when the caller has it (masks_fingerprint reads every mask file)."""
    chunk_paths = [Path(p) for p in chunk_paths]
    store = store_path(store_dir or default_store_dir(chunk_paths), dataset)
    # a killed write's temp (the whole store's size) goes; other cells' live ones stay
    if (note := remove_temp_files_of(store)) is not None:
        print(note, file=sys.stderr)
    expected = {"version": FORMAT_VERSION, "dataset": dataset_fingerprint(dataset),
                "masks": masks_fingerprint(mask_dir) if masks is None else masks,
                "scale_factor": dataset.images[0].scale_factor, "seed": seed, "protocol": protocol}
    existing = _read_manifest(chunk_paths[0])
    if existing is not None:
        _check_manifest(existing, expected, chunk_paths[0])
        for d, name, _ in existing.chunks:
            if not isinstance(d, int) or not 0 <= d < len(chunk_paths):
                raise UserError(f"{chunk_paths[0] / MANIFEST}: chunk {name} lies in chunk folder {d}, but "
                                f"--chunk_paths gives {len(chunk_paths)}; give the folders the chunks were written "
                                "to, in the same order")
            if not (chunk_paths[d] / name).is_file():
                raise UserError(f"{chunk_paths[d] / name}: chunk listed in the manifest is missing")
        if not store_complete(store, dataset):
            _announce(f"image store: {store_bytes(dataset):,} bytes to {store}")
            _check_space({store.parent: store_bytes(dataset)})
            write_store(store, dataset)
        return existing

    offsets = pixel_offsets(dataset)
    universe = int(offsets[-1])

    def image_keys(i: int) -> np.ndarray:
        meta = dataset.images[i]
        return offsets[i] + np.flatnonzero(training_mask(meta, mask_dir, protocol).numpy())
    cached: list[np.ndarray] | None = []  # every image's keys while they fit KEY_BUDGET; else re-read per group
    count = 0
    for keys in ordered_map(image_keys, range(len(dataset.images))):
        count += len(keys)
        if cached is not None and count <= KEY_BUDGET:
            cached.append(keys)
        else:
            cached = None
    n_chunks = max(1, math.ceil(count / chunk_rays))
    where = [(c % len(chunk_paths), f"chunk_{c:05d}.keys") for c in range(n_chunks)]
    plan = {**expected, "count": count, "chunks": [list(w) for w in where]}
    resumable = _read_json(chunk_paths[0] / PLAN) == plan
    keep = {name for d, name in where if resumable and (chunk_paths[d] / name).is_file()}
    for p in chunk_paths:
        _clear_unfinished(p, keep)
    todo = [c for c, (_, name) in enumerate(where) if name not in keep]
    needs = {p: 0 for p in chunk_paths}
    for c in todo:
        needs[chunk_paths[where[c][0]]] += encoded_size(math.ceil(count / n_chunks), universe) + 8
    write_store_too = not store_complete(store, dataset)
    if write_store_too:
        needs[store.parent] = needs.get(store.parent, 0) + store_bytes(dataset)
    _announce(f"chunks: {count:,} rays in {n_chunks} chunk(s), about {sum(needs.values()):,} bytes: "
              f"keys to {', '.join(map(str, chunk_paths))}"
              + (f"; image store ({store_bytes(dataset):,} bytes, shared by every cell) to {store}"
                 if write_store_too else f"; image store {store} present"))
    _check_space(needs)  # before the first byte: the plan too waits for it
    write_json(chunk_paths[0] / PLAN, plan)
    if write_store_too:
        write_store(store, dataset)

    def image_pieces_of(i: int, group: list[int]) -> list[np.ndarray]:
        """Image i's keys of each chunk in `group`."""
        return _split(image_keys(i) if cached is None else cached[i], n_chunks, seed, i, group)
    per_group = max(1, KEY_BUDGET // max(1, math.ceil(count / n_chunks)))
    for g in range(0, len(todo), per_group):
        group = todo[g:g + per_group]
        buckets: dict[int, list[np.ndarray]] = {c: [] for c in group}
        for image_pieces in ordered_map(partial(image_pieces_of, group=group), range(len(dataset.images))):
            for c, keys in zip(group, image_pieces, strict=True):
                buckets[c].append(keys)
        jobs = [(chunk_paths[where[c][0]] / where[c][1], buckets.pop(c)) for c in group]
        list(ordered_map(lambda job: _write_chunk(*job, universe), jobs))
    counts = [_chunk_count(chunk_paths[d] / name) for d, name in where]
    manifest = Manifest(**expected, count=count, store=store.name,
                        chunks=[[d, name, n] for (d, name), n in zip(where, counts, strict=True)])
    for p in chunk_paths:
        write_json(p / MANIFEST, asdict(manifest))
    (chunk_paths[0] / PLAN).unlink()
    return manifest


def _announce(line: str) -> None:
    """What is about to be written where: printed before writing, progress bars or not."""
    print(line, flush=True)


def _chunk_count(path: Path) -> int:
    """Keys in a chunk file, from its header."""
    with open(path, "rb") as f:
        return int.from_bytes(f.read(16)[8:16], "little")


class ChunkReader:
    """Chunk c of a manifest as ray arrays: image (N,) int32, pixel (N,) int32, rgb (N, 3) uint8, the colours
    gathered from the image store (the keys come sorted, so the gather walks the store in order)."""

    def __init__(self, manifest: Manifest, chunk_paths: list[Path], dataset: Dataset,
                 store_dir: Path | None = None) -> None:
        self.files = [Path(chunk_paths[d]) / name for d, name, _ in manifest.chunks]
        self.counts = [n for _, _, n in manifest.chunks]
        self.offsets = pixel_offsets(dataset)
        self.store = open_store((store_dir or default_store_dir(chunk_paths)) / manifest.store, dataset)

    def __call__(self, c: int) -> dict[str, np.ndarray]:
        try:
            keys = decode_keys(self.files[c].read_bytes())
        except (OSError, ValueError) as e:
            raise UserError(f"{self.files[c]}: unreadable ray chunk ({e}); delete its directory to rewrite") from None
        image = np.searchsorted(self.offsets, keys, side="right") - 1
        return {"image": image.astype(np.int32), "pixel": (keys - self.offsets[image]).astype(np.int32),
                "rgb": np.asarray(self.store[keys])}


def gather_in_memory(dataset: Dataset, mask_dir: Path | None, seed: int = 0, protocol: str = MEGA_NERF
                     ) -> dict[str, np.ndarray]:
    """Every ray of the cell in RAM as ChunkReader's arrays, shuffled (the `memory` data mode, small scenes).
    Images are decoded by a pool of threads."""
    def image_rays(meta: ImageMetadata) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pixels = np.flatnonzero(training_mask(meta, mask_dir, protocol).numpy())
        return np.full(len(pixels), meta.index, np.int32), pixels, meta.load_rgb().view(-1, 3).numpy()[pixels]
    image, pixel, rgb = zip(*ordered_map(image_rays, dataset.images), strict=True)
    rays = {"image": np.concatenate(image), "pixel": np.concatenate(pixel).astype(np.int32),
            "rgb": np.concatenate(rgb).reshape(-1, 3)}
    order = np.random.default_rng(seed).permutation(len(rays["image"]))
    return {k: v[order] for k, v in rays.items()}
