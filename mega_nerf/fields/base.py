"""The field interface every model exposes to the renderer: a single submodule and the merged container alike.

A field maps sample points to density and colour, says which points may hold density (so the renderer can skip
empty space), and gives the background colour that rays see once they leave the foreground.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from mega_nerf.fields.background import Background


class Field(nn.Module):
    """Abstract field. Positions are normalised DRB world coordinates, directions are unit vectors, and
    appearance indices are image indices (train + val sorted by name).

    A field owns what is particular to it: `train_defaults` (options a user leaves unset take these values)
    and `after_step` (its own schedule, e.g. occupancy updates), so the trainer never asks which field it has.
    """

    train_defaults: ClassVar[dict[str, Any]] = {}

    def after_step(self, step: int, generator: torch.Generator | None = None) -> None:
        """Called by the trainer after optimiser step `step` (counted from 1). Default: nothing."""

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


class BoxField(Field):
    """A field that lives in an axis-aligned box of the normalised world; outside it, density is zero."""

    def __init__(self, box_min: torch.Tensor, box_max: torch.Tensor, n_images: int, appearance_dim: int) -> None:
        super().__init__()
        self.register_buffer("box_min", torch.as_tensor(box_min, dtype=torch.float32).clone())
        self.register_buffer("box_max", torch.as_tensor(box_max, dtype=torch.float32).clone())
        self.appearance = nn.Embedding(n_images, appearance_dim)
        self.bg = Background(appearance_dim)

    def to_box(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Box coordinates u in [0, 1]^3 (N, 3) and whether each point is inside (N,)."""
        u = (positions - self.box_min) / (self.box_max - self.box_min)
        return u, ((u >= 0) & (u <= 1)).all(-1)

    def background(self, directions: torch.Tensor, appearance: torch.Tensor) -> torch.Tensor:
        return self.bg(directions, self.appearance(appearance))
