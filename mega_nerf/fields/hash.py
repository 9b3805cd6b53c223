"""The default field: a multi-resolution hash grid and two small MLPs (Instant-NGP, Mueller et al. 2022), with
a per-image appearance embedding in the colour branch (NeRF-W style) and an occupancy grid for empty space."""
from __future__ import annotations

import torch
from torch import nn

from mega_nerf.fields import kernels
from mega_nerf.fields.base import BoxField
from mega_nerf.fields.encoding import SH_DEGREE, HashGrid, spherical_harmonics
from mega_nerf.fields.kernels import mlp_heads as mlp_triton
from mega_nerf.fields.occupancy import GridLookup, OccupancyGrid


class _TruncExp(torch.autograd.Function):
    """exp with its gradient clamped for large inputs, as Instant-NGP's density activation."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(x)
        return torch.exp(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        (x,) = ctx.saved_tensors
        return grad * torch.exp(x.clamp(max=15))


def trunc_exp(x: torch.Tensor) -> torch.Tensor:
    return _TruncExp.apply(x)


# The appearance embedding's width: 8, where nerfacto takes 32 and NeRF-W and Mega-NeRF 48. Under Mega-NeRF's
# protocol a val image's embedding is fitted to its left half alone, and a wider one can fit more of that half's
# own errors: on the oblique preset, 4 runs each to 12,000-14,000 steps, val PSNR ended at 25.00 dB on
# average with 8 against 24.61 with 32, and at most 0.11 dB under its best against up to 0.99 with 32; on `city`
# 8 and 32 ended within 0.03 dB (bench/RESULTS.md, ninth session). A survey whose images differ by more than
# exposure and white balance (time of day, weather) may want more: --appearance_dim.
APPEARANCE_DIM = 8


class HashField(BoxField):
    # Instant-NGP's optimisation settings: large batches, a high learning rate, uniform samples only. The lr falls
    # 10x every 30 passes over the cell's rays and a run ends after two such falls (Trainer._plan): on the oblique
    # preset, Mega-NeRF's schedule (10x over 30000 steps) peaked at 25.01 dB after 8000 steps and fell to 24.74 by
    # 16000; 10x every 10 epochs held steady but at 23.9; every 30 epochs gave 24.88, 25.24, 25.32 dB at 4000, 8000
    # and 12000 steps (bench/RESULTS.md, val PSNR against steps).
    train_defaults = {"lr": 1e-2, "samples": 128, "fine_samples": 0, "batch_size": 32768, "lr_decay_epochs": 30.0,
                      "train_iterations": None, "appearance_dim": APPEARANCE_DIM}
    unsaved_appearance_dim = 32  # configs were saved without a width while 32 was the default
    # The plain PyTorch encoding (the CPU's) materialises every corner of every sample: 32768 rays would take
    # about 40 GB there, so a CPU step is smaller (and split into passes by the trainer's --micro_batch).
    cpu_train_defaults = {"batch_size": 4096}

    def __init__(self, box_min: torch.Tensor, box_max: torch.Tensor, n_images: int,
                 appearance_dim: int = APPEARANCE_DIM, hidden: int = 64, geo_features: int = 15, n_levels: int = 16,
                 n_features: int = 2, log2_table_size: int = 19, base_resolution: int = 16, max_resolution: int = 2048,
                 occupancy_resolution: int = 128, occupancy_threshold: float = 0.0, occupancy_interval: int = 8,
                 occupancy_warmup: int = 32, contracted: tuple[bool, bool, bool] | list[bool] = (False,) * 3,
                 affine_appearance: bool = False, sh_degree: int = SH_DEGREE,
                 horizon_background: bool = False) -> None:
        """occupancy_threshold: the density below which a cell counts as empty; occupancy_interval and
        occupancy_warmup: steps between updates and before the first one; contracted, affine_appearance,
        horizon_background: BoxField's; sh_degree: the degree of the view direction's spherical harmonics in the
        colour MLP (0: the colour does not depend on the direction; the background's stays at 3, since the sky is
        all direction)."""
        super().__init__(box_min, box_max, n_images, appearance_dim, contracted, affine_appearance,
                         horizon_background)
        self.occupancy_threshold = occupancy_threshold
        self.occupancy_interval, self.occupancy_warmup = occupancy_interval, occupancy_warmup
        self.grid = HashGrid(n_levels, n_features, log2_table_size, base_resolution, max_resolution)
        self.density_net = nn.Sequential(nn.Linear(self.grid.output_dim, hidden), nn.ReLU(),
                                         nn.Linear(hidden, 1 + geo_features))
        # The colour MLP's first layer, W [sh(d), geo, embedding] + b, split in two: the direction and appearance
        # part is the same for every sample of a ray, so it is computed once per ray.
        self.sh_degree = sh_degree
        self.color_ray = nn.Linear((sh_degree + 1) ** 2 + self.colour_code_dim, hidden)
        self.color_geo = nn.Linear(geo_features, hidden, bias=False)
        self.color_net = nn.Sequential(nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 3))
        self.occupancy = OccupancyGrid(occupancy_resolution)

    def train_bytes_per_sample(self) -> int:
        """Measured on the CPU (bench/step_memory.py, tiny city): 7.5 KB per sample at 16 levels, nearly all of
        it the encoding's 8 corners per level (indices, weights, features and their gradients)."""
        return 480 * self.grid.n_levels + 256

    def density_features(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Box coordinates (N, 3) -> density (N,) and geometry features (N, geo_features)."""
        h = self.density_net(self.grid(u)).float()
        return trunc_exp(h[:, 0] - 1.0), h[:, 1:]

    def fused(self, positions: torch.Tensor) -> bool:
        """Whether forward runs the fused inference kernel: on the GPU, without gradients, under a half
        autocast (what the kernel reproduces), for widths it takes, without an affine appearance."""
        return (self.affine is None and kernels.available(positions) and not torch.is_grad_enabled()
                and torch.is_autocast_enabled("cuda")
                and mlp_triton.supported(self.grid.output_dim, self.color_geo.out_features,
                                         self.density_net[2].out_features))

    def forward(self, positions: torch.Tensor, directions: torch.Tensor, appearance: torch.Tensor,
                ray_of: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        u, inside = self.to_box(positions)
        sh = spherical_harmonics(directions, self.sh_degree)
        view = self.color_ray(torch.cat([sh, self.colour_code(appearance)], -1))
        if self.fused(positions):
            if ray_of is None:
                ray_of = torch.arange(positions.shape[0], device=positions.device)
            logit, rgb = mlp_triton.fused_heads(self.grid(u), view, ray_of, self.density_net, self.color_geo,
                                                self.color_net, torch.get_autocast_dtype("cuda"))
            return trunc_exp(logit - 1.0) * inside, rgb
        density, geo = self.density_features(u)
        logits = self.color_net(self.color_geo(geo) + (view if ray_of is None else view[ray_of]))
        rgb = self.finish_colour(logits, appearance, ray_of)
        return density * inside, rgb

    def occupied(self, positions: torch.Tensor) -> torch.Tensor:
        return self.grid_lookup()(positions)

    def grid_lookup(self) -> GridLookup:
        return GridLookup(self.box_min, self.box_max, self.contracted, self.any_contracted, self.occupancy.mask,
                          self.occupancy.resolution)

    def update_occupancy(self, threshold: float, generator: torch.Generator | None = None) -> None:
        self.occupancy.update(lambda u: self.density_features(u)[0], threshold, generator)

    def after_step(self, step: int, generator: torch.Generator | None = None) -> None:
        """Re-estimate the occupancy grid every `occupancy_interval` steps once past the warm-up."""
        if step >= self.occupancy_warmup and step % self.occupancy_interval == 0:
            self.update_occupancy(self.occupancy_threshold, generator)

    def occupancy_estimated(self, step: int) -> bool:
        """True from after_step's first update on: the first multiple of the interval at or past the warm-up (steps
        count from 1, so never step 0)."""
        return step >= max(1, -(-self.occupancy_warmup // self.occupancy_interval)) * self.occupancy_interval
