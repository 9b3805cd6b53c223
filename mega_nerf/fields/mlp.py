"""The Mega-NeRF-faithful field: positional encoding (12 position, 4 direction frequencies), 8 layers of 256 with
a skip connection at layer 4, shifted-softplus density, and a 48-wide appearance embedding appended before the
colour head (Turki et al. 2022; Mildenhall et al. 2020). Our quality and speed reference."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from mega_nerf.fields.base import BoxField
from mega_nerf.fields.encoding import positional_encoding

APPEARANCE_DIM = 48  # Mega-NeRF's


class MLPField(BoxField):
    # Mega-NeRF's optimisation settings: small batches, coarse and fine samples.
    train_defaults = {"lr": 5e-4, "samples": 256, "fine_samples": 512, "batch_size": 1024, "lr_decay_epochs": 0.0,
                      "train_iterations": 30000, "near_gradient_distance": 0.0}
    unsaved_appearance_dim = APPEARANCE_DIM  # a config saved without a width: the default, which never changed

    def __init__(self, box_min: torch.Tensor, box_max: torch.Tensor, n_images: int,
                 appearance_dim: int = APPEARANCE_DIM, layers: int = 8, width: int = 256, skip: int = 4,
                 position_frequencies: int = 12, direction_frequencies: int = 4,
                 contracted: tuple[bool, bool, bool] | list[bool] = (False,) * 3, affine_appearance: bool = False,
                 horizon_background: bool = False) -> None:
        """layers, width, position_frequencies, direction_frequencies: Mega-NeRF's --layers, --layer_dim,
        --pos_xyz_dim, --pos_dir_dim; contracted, affine_appearance, horizon_background: BoxField's."""
        super().__init__(box_min, box_max, n_images, appearance_dim, contracted, affine_appearance,
                         horizon_background)
        self.position_frequencies, self.direction_frequencies, self.skip = (
            position_frequencies, direction_frequencies, skip)
        pos_dim, dir_dim = 3 * (1 + 2 * position_frequencies), 3 * (1 + 2 * direction_frequencies)
        self.layers = nn.ModuleList(
            nn.Linear(pos_dim if i == 0 else width + (pos_dim if i == skip else 0), width) for i in range(layers))
        self.sigma = nn.Linear(width, 1)
        self.feature = nn.Linear(width, width)
        self.color = nn.Sequential(nn.Linear(width + dir_dim + self.colour_code_dim, width // 2), nn.ReLU(),
                                   nn.Linear(width // 2, 3))

    def train_bytes_per_sample(self) -> int:
        """Measured on the CPU (bench/step_memory.py, tiny city): 15.4 KB per sample for 8 layers of 256, the
        layers' activations kept for backward and their gradients."""
        return 8 * len(self.layers) * self.layers[0].out_features

    def forward(self, positions: torch.Tensor, directions: torch.Tensor, appearance: torch.Tensor,
                ray_of: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if ray_of is not None:
            directions, appearance = directions[ray_of], appearance[ray_of]
        u, inside = self.to_box(positions)
        x = positional_encoding(u * 2 - 1, self.position_frequencies)
        h = x
        for i, layer in enumerate(self.layers):
            h = F.relu(layer(torch.cat([h, x], -1) if i == self.skip else h))
        density = F.softplus(self.sigma(h).float()[:, 0] - 1.0)  # shifted softplus (Mip-NeRF 360 / Mega-NeRF)
        d = positional_encoding(directions, self.direction_frequencies)
        rgb = self.finish_colour(self.color(torch.cat([self.feature(h), d, self.colour_code(appearance)], -1)),
                                 appearance)
        return density * inside, rgb

    def occupied(self, positions: torch.Tensor) -> torch.Tensor:
        return self.to_box(positions)[1]
