"""Shuffled ray chunks: every training ray of a cell as (image index, pixel index, uint8 RGB), shuffled across
all images, written once and streamed by the trainer.

On disk (each directory of `--chunk_paths`):
    manifest.json       written last: what the chunks hold (dataset, masks, scale, count) and which files
    chunk_<k>.npy       numpy structured arrays, fields image (u2 or u4), pixel (u4), rgb (3 x u1): 9-11 bytes/ray

The shuffle is external (scatter every image's rays to random buckets, then shuffle each bucket), so memory is
bounded by the chunk size, never by the dataset. Every file appears under its final name only when complete
(io.atomic_open: temp file, then rename), and the manifest only after every chunk: a killed write is redone,
never half-reused.
Rays are regenerated from (image, pixel) and the image's pose; nothing float is stored per ray.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mega_nerf.data.dataset import MEGA_NERF, Dataset, ImageMetadata, dataset_fingerprint
from mega_nerf.errors import UserError
from mega_nerf.io import atomic_open, write_json
from mega_nerf.partition.maskfile import load_mask

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


@dataclass
class Manifest:
    version: int
    dataset: str  # fingerprint of image names, sizes and poses
    masks: str  # fingerprint of the cell's mask files ('' when training on every ray)
    scale_factor: int
    count: int
    image_dtype: str
    chunks: list[list]  # [directory index, file name, ray count] per chunk, in order
    protocol: str = MEGA_NERF  # the evaluation protocol: which val pixels are trained (dataset.PROTOCOLS)


def ray_dtype(n_images: int) -> np.dtype:
    return np.dtype([("image", "<u2" if n_images < 2 ** 16 else "<u4"), ("pixel", "<u4"), ("rgb", "u1", 3)])


def masks_fingerprint(mask_dir: Path | None) -> str:
    if mask_dir is None:
        return ""
    h = hashlib.sha1()
    for p in sorted(mask_dir.iterdir()):
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


def _image_rays(meta: ImageMetadata, mask: torch.Tensor, dtype: np.dtype) -> np.ndarray:
    pixels = mask.flatten().nonzero()[:, 0].numpy()
    rays = np.empty(len(pixels), dtype)
    rays["image"], rays["pixel"] = meta.index, pixels
    rays["rgb"] = meta.load_rgb().view(-1, 3).numpy()[pixels]
    return rays


def _read_manifest(path: Path) -> Manifest | None:
    file = path / MANIFEST
    if not file.is_file():
        return None
    try:
        return Manifest(**json.loads(file.read_text()))
    except (ValueError, TypeError):
        raise UserError(f"{file}: not a chunk manifest of this version; delete the directory to rewrite") from None


def _check_manifest(m: Manifest, expected: dict, path: Path) -> None:
    for key, value in expected.items():
        if getattr(m, key) != value:
            raise UserError(f"{path}: holds chunks of another {key.replace('_', ' ')} "
                            f"(use another --chunk_paths or delete it)")


def _clear_unfinished(path: Path) -> None:
    """Remove what a killed write left (nothing there was finished); refuse to touch anything else."""
    path.mkdir(parents=True, exist_ok=True)
    for entry in path.iterdir():
        if not (entry.name.startswith("chunk_") or entry.name.startswith(MANIFEST)):
            raise UserError(f"{path}: holds files that are not ray chunks ({entry.name}); "
                            "choose an empty or new --chunk_paths directory")
        entry.unlink()


def prepare_chunks(dataset: Dataset, mask_dir: Path | None, chunk_paths: list[Path], chunk_rays: int,
                   seed: int = 0, progress: bool = True, protocol: str = MEGA_NERF) -> Manifest:
    """Write the cell's shuffled ray chunks, or verify and reuse chunks written before."""
    dtype = ray_dtype(len(dataset.images))
    expected = {"version": FORMAT_VERSION, "dataset": dataset_fingerprint(dataset),
                "masks": masks_fingerprint(mask_dir), "scale_factor": dataset.images[0].scale_factor,
                "protocol": protocol}
    existing = _read_manifest(chunk_paths[0])
    if existing is not None:
        _check_manifest(existing, expected, chunk_paths[0])
        for d, name, _ in existing.chunks:
            if not (chunk_paths[d] / name).is_file():
                raise UserError(f"{chunk_paths[d] / name}: chunk listed in the manifest is missing")
        return existing
    for p in chunk_paths:
        _clear_unfinished(p)

    count = sum(int(training_mask(m, mask_dir, protocol).sum()) for m in dataset.images)
    n_chunks = max(1, -(-count // chunk_rays))
    where = [(k % len(chunk_paths), f"chunk_{k:05d}.npy") for k in range(n_chunks)]
    if progress:
        print(f"chunks: {count:,} rays, {count * dtype.itemsize / 2 ** 30:.2f} GiB in {n_chunks} chunk(s) "
              f"under {', '.join(map(str, chunk_paths))}")
    rng = np.random.default_rng(seed)
    buckets = [open(chunk_paths[d] / (name + ".bucket"), "wb") for d, name in where]
    try:
        for meta in tqdm(dataset.images, desc="scatter rays", disable=not progress):
            rays = _image_rays(meta, training_mask(meta, mask_dir, protocol), dtype)
            target = rng.integers(0, n_chunks, len(rays))
            order = np.argsort(target, kind="stable")
            bounds = np.searchsorted(target[order], np.arange(n_chunks + 1))
            for k in range(n_chunks):
                rays[order[bounds[k]:bounds[k + 1]]].tofile(buckets[k])
    finally:
        for f in buckets:
            f.close()
    counts = []
    for d, name in tqdm(where, desc="shuffle chunks", disable=not progress):
        bucket = chunk_paths[d] / (name + ".bucket")
        rays = np.fromfile(bucket, dtype)
        with atomic_open(chunk_paths[d] / name) as f:
            np.save(f, rays[rng.permutation(len(rays))])
        bucket.unlink()
        counts.append(len(rays))
    manifest = Manifest(**expected, count=count, image_dtype=dtype["image"].str,
                        chunks=[[d, name, c] for (d, name), c in zip(where, counts, strict=True)])
    for p in chunk_paths:
        write_json(p / MANIFEST, asdict(manifest))
    return manifest


def gather_in_memory(dataset: Dataset, mask_dir: Path | None, seed: int = 0, protocol: str = MEGA_NERF
                     ) -> np.ndarray:
    """Every ray of the cell in RAM, shuffled (the `memory` data mode, for small scenes)."""
    dtype = ray_dtype(len(dataset.images))
    rays = np.concatenate([_image_rays(m, training_mask(m, mask_dir, protocol), dtype) for m in dataset.images])
    return rays[np.random.default_rng(seed).permutation(len(rays))]
