"""The field interface every model exposes to the renderer: a single submodule and the merged container alike.

A field maps sample points to density and colour, says which points may hold density (so the renderer can skip
empty space), and gives the background colour that rays see once they leave the foreground.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from mega_nerf.bounds import box_exit, box_to_world, contracted_position, world_to_box
from mega_nerf.errors import UserError
from mega_nerf.fields.background import Background
from mega_nerf.fields.occupancy import GridLookup


class Field(nn.Module):
    """Abstract field. Positions are normalised DRB world coordinates, directions are unit vectors, and
    appearance indices are image indices (train + val sorted by name).

    A field owns what is particular to it: `train_defaults` (options a user leaves unset take these values)
    and `after_step` (its own schedule, e.g. occupancy updates), so the trainer never asks which field it has.
    """

    train_defaults: ClassVar[dict[str, Any]] = {}
    cpu_train_defaults: ClassVar[dict[str, Any]] = {}  # overrides of train_defaults on a CPU (what fits there)

    def train_bytes_per_sample(self) -> int:
        """About the memory one sample takes in a training step (forward activations kept for backward, and
        their gradients): bounds how many rays one forward/backward pass may hold. Default: a small MLP's."""
        return 4096

    def after_step(self, step: int, generator: torch.Generator | None = None) -> None:
        """Called by the trainer after optimiser step `step` (counted from 1). Default: nothing."""

    def occupancy_estimated(self, step: int) -> bool:
        """Whether `after_step` has estimated what `occupied` answers by the end of step `step`. Default: True (no
        estimate to wait for)."""
        return True

    def foreground_exit(self, origins: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor | None:
        """Where each ray (N, 3), (N, 3) leaves the foreground (N,), beyond which the renderer places its
        background samples; None when the field has nothing beyond its box (the default)."""
        return None

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

    def grid_lookup(self) -> GridLookup | None:
        """The box and grid that `occupied` reads, where it is exactly a grid lookup in field coordinates (the
        renderer then looks up whole rays in one kernel); None (the default): ask `occupied` point by point."""
        return None


class BoxField(Field):
    """A field over an axis-aligned foreground box of the normalised world. Along `contracted` axes the world
    beyond the box is contracted into the field's domain (bounds.py); along the others density is zero outside.
    Field coordinates u lie in [0, 1]^3: the box fills [0, 1] on a plain axis and [1/4, 3/4] on a contracted one.

    Appearance: each image's embedding enters the colour MLP (NeRF-W style) or, with `affine_appearance`
    (Mega-NeRF's option of that name), maps through one linear layer to a 3x4 affine transform of the colour MLP's
    output before its sigmoid, the MLP then seeing no embedding. The background always sees the embedding, and
    with `horizon_background` over an altitude slab only directions at or above the horizon.
    """

    unsaved_appearance_dim: int  # the width a saved config without appearance_dim means (fields.complete_config)

    def __init__(self, box_min: torch.Tensor, box_max: torch.Tensor, n_images: int, appearance_dim: int,
                 contracted: tuple[bool, bool, bool] | list[bool] = (False, False, False),
                 affine_appearance: bool = False, horizon_background: bool = False) -> None:
        super().__init__()
        if affine_appearance and appearance_dim < 1:
            raise UserError("--affine_appearance needs an appearance embedding (--appearance_dim of 1 or more)")
        self.affine = nn.Linear(appearance_dim, 12) if affine_appearance else None
        if self.affine is not None:  # the identity transform for every image at the start
            nn.init.zeros_(self.affine.weight)
            with torch.no_grad():
                self.affine.bias.copy_(torch.eye(3, 4).flatten())
        self.colour_code_dim = 0 if affine_appearance else appearance_dim  # embedding width the colour MLP sees
        self.register_buffer("box_min", torch.as_tensor(box_min, dtype=torch.float32).clone())
        self.register_buffer("box_max", torch.as_tensor(box_max, dtype=torch.float32).clone())
        self.register_buffer("contracted", torch.tensor(list(contracted), dtype=torch.bool), persistent=False)
        self.any_contracted = any(contracted)
        # With an altitude slab (the down axis not contracted) a ray heading down ends on the ground plane, and the
        # background is the sky. horizon_background shows such a ray the sky at the horizon of its heading, so that
        # the background cannot paint the ground's colours through a field left transparent there.
        self.horizon_background = bool(horizon_background) and not contracted[0]
        self.appearance = nn.Embedding(n_images, appearance_dim)
        self.bg = Background(appearance_dim)

    def colour_code(self, appearance: torch.Tensor) -> torch.Tensor:
        """The appearance input of the colour MLP for image indices (N,): (N, colour_code_dim)."""
        if self.affine is not None:
            return self.appearance.weight.new_zeros(appearance.shape[0], 0)
        return self.appearance(appearance)

    def finish_colour(self, logits: torch.Tensor, appearance: torch.Tensor,
                      ray_of: torch.Tensor | None = None) -> torch.Tensor:
        """Colour (N, 3) in [0, 1] from the colour MLP's output (N, 3): through the image's affine transform when
        there is one, then a sigmoid. appearance: (N,), or (R,) per ray with ray_of (N,) giving each point's ray."""
        logits = logits.float()
        if self.affine is not None:
            transform = self.affine(self.appearance(appearance)).float().view(-1, 3, 4)  # (N or R, 3, 4)
            if ray_of is not None:
                transform = transform[ray_of]
            logits = (transform[:, :, :3] @ logits[:, :, None])[:, :, 0] + transform[:, :, 3]
        return torch.sigmoid(logits)

    def to_box(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Field coordinates u (N, 3) and whether each point is in the field's domain (N,)."""
        return world_to_box(positions, self.box_min, self.box_max, self.contracted, self.any_contracted)

    def from_box(self, u: torch.Tensor) -> torch.Tensor:
        """World positions (N, 3) of field coordinates u (N, 3) (infinite at a contracted axis' ends)."""
        return box_to_world(u, self.box_min, self.box_max, self.contracted)

    def contracted_position(self, positions: torch.Tensor) -> torch.Tensor:
        """World positions (N, 3) with what lies beyond the box along a contracted axis pulled in by the
        contraction (at most a box half-width beyond it), and the rest exactly as given: where the container
        routes a far point, next to the part of the box it lies beyond."""
        if not self.any_contracted:
            return positions
        return contracted_position(positions, self.box_min, self.box_max, self.contracted)

    def foreground_exit(self, origins: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor | None:
        """Where each ray leaves the foreground box (N,), when the world beyond it is contracted; else None."""
        return box_exit(origins, dirs, self.box_min, self.box_max) if self.any_contracted else None

    def background(self, directions: torch.Tensor, appearance: torch.Tensor) -> torch.Tensor:
        # x points down. Straight down has no heading: its level direction is the zero vector, one fixed colour.
        if self.horizon_background:
            level = torch.cat([torch.zeros_like(directions[:, :1]), directions[:, 1:]], -1)
            level = torch.nn.functional.normalize(level, dim=-1)  # device ops only: a CUDA graph replays them
            directions = torch.where(directions[:, :1] > 0, level, directions)
        return self.bg(directions, self.appearance(appearance))
