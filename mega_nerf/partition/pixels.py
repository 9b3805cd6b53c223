"""The rays a partition tests, made pixel by pixel, and their bounds.

Every operation here is elementwise in float32: a pixel's ray never depends on the batch it comes in (a batched
matrix product, as in rays.rays_from_pixels, may choose its arithmetic by batch size), and the exact rule's GPU
kernel (partition.exact_kernel) repeats each operation bit for bit. Both rules test these rays, so the exact masks
still hold the sampled ones; they equal the trainer's (rays.rays_from_pixels) up to rounding (directions within
1e-6: tests/test_partition.py).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from mega_nerf.bounds import box_exit
from mega_nerf.data.dataset import ImageMetadata
from mega_nerf.partition.exact import Box
from mega_nerf.rays import near_far

# A camera as one row of floats: c2w (3, 4) row-major, then fx, fy, cx, cy
CAMERA_FLOATS = 16
Piece = tuple[int, int, int, int]  # an image's row of the camera table, its width, first pixel, end pixel


def camera_table(images: Sequence[ImageMetadata], device: torch.device) -> torch.Tensor:
    """(I, CAMERA_FLOATS) float32 on `device`: each image's camera as one row."""
    rows = [torch.cat([m.c2w.float().reshape(12), m.intrinsics.float().reshape(4)]) for m in images]
    return torch.stack(rows).to(device)


def pixel_rays(camera: torch.Tensor, W: int, first: int, last: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Origins and unit directions (N, 3) of an image's pixels first .. last - 1 in row-major order, through
    their centres. camera: one row of `camera_table`."""
    pix = torch.arange(first, last, device=camera.device)
    rows = torch.div(pix, W, rounding_mode="floor")
    cols = pix - rows * W
    c2w, (fx, fy, cx, cy) = camera[:12].view(3, 4), camera[12:]
    x = (cols.float() + 0.5 - cx) / fx  # divided by a tensor: a Python float would be a multiply by its reciprocal
    y = -((rows.float() + 0.5 - cy) / fy)
    z = torch.full_like(x, -1.0)
    norm = (x * x + y * y + z * z).sqrt()
    u = (x / norm, y / norm, z / norm)
    dirs = torch.stack([c2w[i, 0] * u[0] + c2w[i, 1] * u[1] + c2w[i, 2] * u[2] for i in range(3)], -1)
    return c2w[:, 3].expand_as(dirs), dirs


def ray_bounds(origins: torch.Tensor, dirs: torch.Tensor, near: float, far: float,
               altitude_range: tuple[float, float], box: Box | None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(near, split, far) per ray (N,): the ray clipped to the altitude slab (rays.near_far), and where its part
    inside the foreground box ends (far without a box; the part beyond is routed by the contraction)."""
    near_t, far_t = near_far(origins, dirs, near, far, altitude_range)
    if box is None:
        return near_t, far_t, far_t
    return near_t, torch.minimum(far_t, box_exit(origins, dirs, box[0], box[1])).clamp_min(near_t), far_t



def piece_rays(cameras: torch.Tensor, pieces: list[Piece], near: float, far: float,
               altitude_range: tuple[float, float], box: Box | None) -> tuple[torch.Tensor, ...]:
    """origins, dirs (N, 3) and near, split, far (N,) of the pieces' pixels in order (cameras: camera_table)."""
    rays = [pixel_rays(cameras[i], W, first, last) for i, W, first, last in pieces]
    origins, dirs = torch.cat([o for o, _ in rays]), torch.cat([d for _, d in rays])
    return origins, dirs, *ray_bounds(origins, dirs, near, far, altitude_range, box)
