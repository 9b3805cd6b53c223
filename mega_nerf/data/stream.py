"""Streaming training batches from shuffled ray chunks, the next piece loading on a background thread.

The chunks are read in pieces of at most `piece_rays` consecutive rays (a memory-mapped slice of a chunk file),
so the first batch waits for one small piece, not a whole chunk. Since a chunk is already a random shuffle of
the cell's rays, every piece is a random sample of them. An epoch is the pieces in a seeded random order, each
re-permuted by a seed of (epoch, piece): batch b of an epoch is rays [b * batch_size, (b + 1) * batch_size) of
that sequence. The position is therefore two integers (epoch, offset), saved in checkpoints, so a resumed run
sees exactly the batches an uninterrupted one would.
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch


def _to_tensors(rays: np.ndarray, pin: bool) -> dict[str, torch.Tensor]:
    out = {"image": torch.from_numpy(rays["image"].astype(np.int32)),
           "pixel": torch.from_numpy(rays["pixel"].astype(np.int32)),
           "rgb": torch.from_numpy(np.ascontiguousarray(rays["rgb"]))}
    return {k: v.pin_memory() for k, v in out.items()} if pin else out


class RayStream:
    """Batches over chunk files (disk mode) or one in-memory array (memory mode)."""

    def __init__(self, sources: list[Path | np.ndarray], counts: list[int], batch_size: int, seed: int,
                 device: torch.device, piece_rays: int = 1 << 22) -> None:
        self.sources = sources
        self.pieces = [(k, start, min(start + piece_rays, count))  # (source, first ray, end)
                       for k, count in enumerate(counts) for start in range(0, count, piece_rays)]
        self.counts = [end - start for _, start, end in self.pieces]
        self.batch_size, self.seed, self.device = batch_size, seed, torch.device(device)
        self.epoch, self.offset = 0, 0
        self.wait_seconds = 0.0  # time the trainer spent blocked on data
        self.waits = 0  # batches that blocked on a piece load for over a millisecond
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._loaded: dict[tuple[int, int], dict[str, torch.Tensor]] = {}  # (epoch, position) -> tensors
        self._pending: dict[tuple[int, int], Future] = {}

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self._loaded.clear()
        self._pending.clear()

    def _order(self, epoch: int) -> np.ndarray:
        """The piece indices in the order epoch `epoch` visits them."""
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.counts))

    def _layout(self) -> tuple[np.ndarray, np.ndarray]:
        """This epoch's piece sizes in epoch order, and their cumulative ends."""
        sizes = np.array(self.counts)[self._order(self.epoch)]
        return sizes, np.cumsum(sizes)

    def _load(self, epoch: int, position: int) -> dict[str, torch.Tensor]:
        k = int(self._order(epoch)[position])
        source, start, end = self.pieces[k]
        rays = self.sources[source]
        rays = (rays if isinstance(rays, np.ndarray) else np.load(rays, mmap_mode="r"))[start:end]
        rays = rays[np.random.default_rng([self.seed, epoch, k]).permutation(len(rays))]
        return _to_tensors(rays, pin=self.device.type == "cuda")

    def _piece(self, position: int) -> dict[str, torch.Tensor]:
        """This epoch's piece at `position`, on the device; starts loading the one after it (next epoch's
        first after the last), so the trainer does not wait at piece or epoch boundaries."""
        key = (self.epoch, position)
        if key not in self._loaded:
            future = self._pending.pop(key, None) or self._pool.submit(self._load, *key)
            start = time.perf_counter()
            host = future.result()
            waited = time.perf_counter() - start
            self.wait_seconds += waited
            self.waits += waited > 1e-3
            self._loaded = {key: {k: v.to(self.device, non_blocking=True) for k, v in host.items()}}
            nxt = (self.epoch, position + 1) if position + 1 < len(self.counts) else (self.epoch + 1, 0)
            if nxt not in self._pending:
                self._pending = {nxt: self._pool.submit(self._load, *nxt)}
        return self._loaded[key]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The next batch: image index (B,) long, pixel index (B,) long, rgb (B, 3) float in [0, 1]."""
        sizes, ends = self._layout()
        parts = []
        need = self.batch_size
        while need > 0:
            if self.offset >= ends[-1]:  # epoch done: a partial last batch is fine
                if parts:
                    break
                self.epoch, self.offset = self.epoch + 1, 0
                sizes, ends = self._layout()
            position = int(np.searchsorted(ends, self.offset, side="right"))
            start = self.offset - (ends[position] - sizes[position])
            take = int(min(need, sizes[position] - start))
            piece = self._piece(position)
            parts.append({k: v[start:start + take] for k, v in piece.items()})
            self.offset += take
            need -= take
        image = torch.cat([p["image"] for p in parts]).long()
        pixel = torch.cat([p["pixel"] for p in parts]).long()
        rgb = torch.cat([p["rgb"] for p in parts]).float() / 255.0
        return image, pixel, rgb
