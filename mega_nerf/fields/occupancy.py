"""Occupancy grid over a field's box: which cells may hold density, so the renderer skips empty space.

Each update evaluates the density at one jittered point per cell, keeps a decaying running maximum
(as Instant-NGP does, Mueller et al. 2022, appendix E.2), and marks a cell occupied while that maximum is above
a threshold. Until the first update every cell counts as occupied.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from mega_nerf.bounds import world_to_box


def cell_index(u: torch.Tensor, resolution: int) -> torch.Tensor:
    """Points in box coordinates u in [0, 1]^3, (N, 3) -> flat index (N,) of their cell in a grid of
    `resolution`^3 cells, x slowest (points outside are clamped to the nearest cell)."""
    c = (u * resolution).long().clamp(0, resolution - 1)
    return (c[:, 0] * resolution + c[:, 1]) * resolution + c[:, 2]


@dataclass(frozen=True)
class GridLookup:
    """A box field's `occupied`: the box (3,), (3,), its contracted axes (3,) bool, and a grid's mask
    (resolution^3,) bool over field coordinates (bounds.world_to_box, cell_index). Called on points it is the
    reference of the fused lookup along rays (fields/kernels/occupancy_lookup.py), which it hands its tensors."""

    box_min: torch.Tensor
    box_max: torch.Tensor
    contracted: torch.Tensor
    any_contracted: bool
    mask: torch.Tensor
    resolution: int

    def __call__(self, positions: torch.Tensor) -> torch.Tensor:
        """(N, 3) world positions -> (N,) bool: in the domain and in an occupied cell."""
        u, inside = world_to_box(positions, self.box_min, self.box_max, self.contracted, self.any_contracted)
        return self.mask[cell_index(u, self.resolution)] & inside


class OccupancyGrid(nn.Module):
    def __init__(self, resolution: int = 128, decay: float = 0.95) -> None:
        super().__init__()
        self.resolution, self.decay = resolution, decay
        self.register_buffer("density", torch.zeros(resolution ** 3))
        self.register_buffer("mask", torch.ones(resolution ** 3, dtype=torch.bool))

    @torch.no_grad()
    def update(self, density_fn: Callable[[torch.Tensor], torch.Tensor], threshold: float,
               generator: torch.Generator | None = None, chunk: int = 2 ** 18) -> None:
        """Re-estimate occupancy. density_fn maps box coordinates (M, 3) to density (M,)."""
        r = self.resolution
        device = self.density.device
        for start in range(0, r ** 3, chunk):
            idx = torch.arange(start, min(start + chunk, r ** 3), device=device)
            cells = torch.stack([idx // (r * r), (idx // r) % r, idx % r], -1).float()
            jitter = torch.rand(cells.shape, generator=generator, device=device)
            sigma = density_fn((cells + jitter) / r).float()
            self.density[idx] = torch.maximum(self.density[idx] * self.decay, sigma)
        self.mask.copy_(self.density > threshold)

    @property
    def occupied_fraction(self) -> float:
        return self.mask.float().mean().item()
