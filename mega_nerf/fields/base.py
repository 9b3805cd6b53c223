"""The field interface every model exposes to the renderer: a single submodule and the merged container alike.

A field maps sample points to density and colour, says which points may hold density (so the renderer can skip
empty space), and gives the background colour that rays see once they leave the foreground.
"""
from __future__ import annotations

import torch
from torch import nn


class Field(nn.Module):
    """Abstract field. Positions are normalised DRB world coordinates, directions are unit vectors, and
    appearance indices are image indices (train + val sorted by name)."""

    def forward(self, positions: torch.Tensor, directions: torch.Tensor, appearance: torch.Tensor,
                ray_of: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: (N, 3). directions (3,) and appearance are per point, (N, 3) and (N,), or, when ray_of (N,)
        gives each point's ray, per ray, (R, 3) and (R,): a field may then compute view-dependent terms once per
        ray rather than once per sample. Returns density (N,) >= 0 and rgb (N, 3) in [0, 1]."""
        raise NotImplementedError

    def occupied(self, positions: torch.Tensor) -> torch.Tensor:
        """(N, 3) -> (N,) bool: False where the field is known to be empty (density zero may be assumed)."""
        raise NotImplementedError

    def background(self, directions: torch.Tensor, appearance: torch.Tensor) -> torch.Tensor:
        """Colour seen along (N, 3) directions once a ray leaves the foreground. Returns (N, 3)."""
        raise NotImplementedError
