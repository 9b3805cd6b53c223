"""Background: the colour a ray sees once it leaves the foreground box (sky, far terrain), from its direction and
the image's appearance embedding. Mega-NeRF uses a second NeRF++-style network here; a direction-only model is
enough for aerial views, where the background is seen at (effectively) infinite distance."""
from __future__ import annotations

import torch
from torch import nn

from mega_nerf.fields.encoding import spherical_harmonics


class Background(nn.Module):
    def __init__(self, appearance_dim: int, hidden: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16 + appearance_dim, hidden), nn.ReLU(),
                                 nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 3))

    def forward(self, directions: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """directions: (N, 3) unit; embedding: (N, appearance_dim). Returns (N, 3) in [0, 1]."""
        return torch.sigmoid(self.net(torch.cat([spherical_harmonics(directions), embedding], -1)).float())
