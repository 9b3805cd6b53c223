"""Rays and altitude clipping against an independent float64 pinhole projection and plane geometry.

Convention under test (docs/DESIGN.md): c2w columns are the camera's right, up, back axes and its centre;
pixel (column i, row j) has its centre at (i + 0.5, j + 0.5); the camera looks along -back.
"""
from __future__ import annotations

import math

import pytest
import torch

from mega_nerf.data.dataset import Coordinates
from mega_nerf.rays import Cameras, image_rays, near_far, normalize_altitude_range, rays_from_pixels


def random_rotation(gen: torch.Generator) -> torch.Tensor:
    """A uniformly random proper rotation (3, 3) float64, from the QR decomposition of a Gaussian matrix."""
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    return q if torch.det(q) > 0 else -q


def random_camera(gen: torch.Generator, W: int, H: int) -> tuple[torch.Tensor, torch.Tensor]:
    """c2w (3, 4) and intrinsics (4,) float64 with fx != fy and an off-centre principal point."""
    c2w = torch.cat([random_rotation(gen), 4 * torch.randn(3, 1, generator=gen, dtype=torch.float64)], 1)
    u = torch.rand(4, generator=gen, dtype=torch.float64)
    intrinsics = torch.stack([W * (0.6 + u[0]), H * (0.9 + u[1]),  # fx != fy
                              W * (0.3 + 0.4 * u[2]), H * (0.3 + 0.4 * u[3])])  # off-centre cx, cy
    return c2w, intrinsics


def project(points: torch.Tensor, c2w: torch.Tensor, intrinsics: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Pinhole projection of world points (N, 3) to continuous pixel coordinates u (N,), v (N,), depth (N,).

    Written from docs/DESIGN.md's convention only: camera x right, y up, z back, so depth = -z and image rows grow
    downwards (against +y)."""
    fx, fy, cx, cy = intrinsics.tolist()
    cam = (points - c2w[:, 3]) @ c2w[:, :3]  # row-vector form of R^T (p - t)
    depth = -cam[:, 2]
    return cx + fx * cam[:, 0] / depth, cy - fy * cam[:, 1] / depth, depth


def distance_to_ray(points: torch.Tensor, origins: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor:
    """Distance (N,) from each point to the half-line origin + t * dir, t >= 0, dirs unit."""
    offset = points - origins
    t = (offset * dirs).sum(-1).clamp_min(0)
    return (offset - t[:, None] * dirs).norm(dim=-1)


def test_directions_are_unit_and_origins_are_the_camera_centre():
    gen = torch.Generator().manual_seed(0)
    c2w, intrinsics = random_camera(gen, 17, 11)
    origins, dirs = image_rays(c2w, intrinsics, 17, 11)
    assert origins.shape == dirs.shape == (17 * 11, 3)
    torch.testing.assert_close(dirs.norm(dim=-1), torch.ones(17 * 11, dtype=torch.float64))
    torch.testing.assert_close(origins, c2w[:, 3].expand(17 * 11, 3))


def test_principal_point_ray_looks_along_minus_back_axis():
    """The ray through (cx, cy) is the optical axis: -c2w[:, 2]."""
    gen = torch.Generator().manual_seed(1)
    c2w, intrinsics = random_camera(gen, 40, 30)
    cx, cy = intrinsics[2:].tolist()
    _, dirs = rays_from_pixels(c2w, intrinsics, torch.tensor([cx]), torch.tensor([cy]), center=0.0)
    torch.testing.assert_close(dirs[0], -c2w[:, 2])


def test_ray_of_fractional_pixel_passes_through_projected_point():
    """Random world points in front of random cameras: the ray at their projection passes through them."""
    gen = torch.Generator().manual_seed(2)
    for _ in range(10):
        c2w, intrinsics = random_camera(gen, 64, 48)
        points = c2w[:, 3] + 10 * torch.randn(200, 3, generator=gen, dtype=torch.float64)
        u, v, depth = project(points, c2w, intrinsics)
        keep = depth > 0.1
        origins, dirs = rays_from_pixels(c2w, intrinsics, u[keep] - 0.5, v[keep] - 0.5)
        scale = (points[keep] - origins).norm(dim=-1)
        assert (distance_to_ray(points[keep], origins, dirs) / scale).max() < 1e-10


def test_pixel_rays_from_image_rays_and_cameras_pass_through_points_projecting_to_pixel_centres():
    """One random point per random camera; the camera's principal point is nudged by the point's sub-pixel
    offset so that it projects exactly onto a pixel centre. Both ray generators must hit it."""
    gen = torch.Generator().manual_seed(3)
    sizes = [(23, 17), (40, 31), (64, 48), (9, 50)]
    c2ws, intrinsics_all, pixels, points = [], [], [], []
    for k in range(24):
        W, H = sizes[k % len(sizes)]
        c2w, intrinsics = random_camera(gen, W, H)
        while True:
            point = c2w[:, 3] + 5 * torch.randn(1, 3, generator=gen, dtype=torch.float64)
            u, v, depth = project(point, c2w, intrinsics)
            if depth[0] > 0.1 and 0 <= u[0] < W and 0 <= v[0] < H:
                break
        col, row = math.floor(u[0]), math.floor(v[0])
        nudge = torch.tensor([0, 0, col + 0.5 - u[0], row + 0.5 - v[0]], dtype=torch.float64)
        intrinsics = intrinsics + nudge
        u, v, _ = project(point, c2w, intrinsics)
        assert abs(u[0] - col - 0.5) < 1e-9 and abs(v[0] - row - 0.5) < 1e-9
        origins, dirs = image_rays(c2w, intrinsics, W, H)
        pixel = row * W + col
        scale = (point[0] - c2w[:, 3]).norm()
        assert distance_to_ray(point, origins[pixel:pixel + 1], dirs[pixel:pixel + 1])[0] / scale < 1e-4
        c2ws.append(c2w)
        intrinsics_all.append(intrinsics)
        pixels.append((W, H, pixel))
        points.append(point[0])
    cameras = Cameras(torch.stack(c2ws).float(), torch.stack(intrinsics_all).float(),
                      torch.tensor([p[0] for p in pixels]), torch.tensor([p[1] for p in pixels]))
    origins, dirs = cameras.rays(torch.arange(len(pixels)), torch.tensor([p[2] for p in pixels]))
    points = torch.stack(points)
    scale = (points - torch.stack(c2ws)[:, :, 3]).norm(dim=-1)
    assert (distance_to_ray(points, origins.double(), dirs.double()) / scale).max() < 1e-4


def test_cameras_rays_match_image_rays_over_images_of_different_sizes():
    gen = torch.Generator().manual_seed(4)
    sizes = [(13, 7), (30, 21), (8, 40)]
    poses = [random_camera(gen, W, H) for W, H in sizes]
    cameras = Cameras(torch.stack([p[0] for p in poses]).float(), torch.stack([p[1] for p in poses]).float(),
                      torch.tensor([s[0] for s in sizes]), torch.tensor([s[1] for s in sizes]))
    image_index = torch.randint(0, len(sizes), (500,), generator=gen)
    counts = torch.tensor([W * H for W, H in sizes])
    pixel_index = (torch.rand(500, generator=gen) * counts[image_index]).long()
    origins, dirs = cameras.rays(image_index, pixel_index)
    for k, (W, H) in enumerate(sizes):
        ref_o, ref_d = image_rays(cameras.c2w[k], cameras.intrinsics[k], W, H)
        mask = image_index == k
        assert mask.any()
        torch.testing.assert_close(origins[mask], ref_o[pixel_index[mask]])
        torch.testing.assert_close(dirs[mask], ref_d[pixel_index[mask]])


# Altitude clipping. Normalised down-coordinates: the top plane is x = TOP, the ground plane x = GROUND.
TOP, GROUND, NEAR, FAR = -0.3, 0.2, 0.01, 100.0


def unit_dirs(gen: torch.Generator, n: int, down: bool) -> torch.Tensor:
    """Random unit directions (n, 3) pointing down (+x) or up (-x), never near horizontal."""
    d = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    d[:, 0] = d[:, 0].abs().clamp_min(0.2) * (1 if down else -1)
    return d / d.norm(dim=-1, keepdim=True)


def origins_at(gen: torch.Generator, n: int, x_low: float, x_high: float) -> torch.Tensor:
    o = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    o[:, 0] = x_low + (x_high - x_low) * torch.rand(n, generator=gen, dtype=torch.float64)
    return o


def test_rays_from_above_heading_down_start_at_top_plane_and_end_at_ground():
    gen = torch.Generator().manual_seed(5)
    o, d = origins_at(gen, 300, -2.0, TOP - 0.05), unit_dirs(gen, 300, down=True)
    n, f = near_far(o, d, NEAR, FAR, (TOP, GROUND))
    torch.testing.assert_close((o + n[:, None] * d)[:, 0], torch.full((300,), TOP, dtype=torch.float64))
    torch.testing.assert_close((o + f[:, None] * d)[:, 0], torch.full((300,), GROUND, dtype=torch.float64))


def test_rays_between_planes_keep_near_and_end_at_ground():
    gen = torch.Generator().manual_seed(6)
    o, d = origins_at(gen, 300, TOP + 0.01, GROUND - 0.05), unit_dirs(gen, 300, down=True)
    n, f = near_far(o, d, NEAR, FAR, (TOP, GROUND))
    assert (n == NEAR).all()
    torch.testing.assert_close((o + f[:, None] * d)[:, 0], torch.full((300,), GROUND, dtype=torch.float64))


def test_rays_heading_up_inside_the_slab_keep_default_bounds():
    gen = torch.Generator().manual_seed(7)
    o, d = origins_at(gen, 300, TOP + 0.01, 1.0), unit_dirs(gen, 300, down=False)
    n, f = near_far(o, d, NEAR, FAR, (TOP, GROUND))
    assert (f == FAR).all()
    assert (n == NEAR).all()


def test_rays_above_the_slab_heading_up_are_empty():
    """The sky corners of an oblique view never enter the slab: no samples, only the background."""
    gen = torch.Generator().manual_seed(17)
    o, d = origins_at(gen, 300, -2.0, TOP - 0.01), unit_dirs(gen, 300, down=False)
    n, f = near_far(o, d, NEAR, FAR, (TOP, GROUND))
    assert (f == n).all() and (n == NEAR).all()


def test_bounds_are_clamped_and_ordered_for_any_ray():
    gen = torch.Generator().manual_seed(8)
    o = origins_at(gen, 2000, -3.0, 3.0)
    d = torch.randn(2000, 3, generator=gen, dtype=torch.float64)
    d = d / d.norm(dim=-1, keepdim=True)
    near, far = 0.5, 2.0
    n, f = near_far(o, d, near, far, (TOP, GROUND))
    assert (n >= near).all() and (f >= n).all() and (f <= far).all()
    beyond = (o[:, 0] < TOP) & (d[:, 0] > 0) & ((TOP - o[:, 0]) / d[:, 0] > far)  # meet the top beyond far
    assert beyond.any() and (f[beyond] == n[beyond]).all() and (n[beyond] == far).all()
    # Rays below the ground plane never touch the slab's planes going down: default bounds.
    below = (o[:, 0] > GROUND) & (d[:, 0] > 0)
    assert below.any() and (n[below] == near).all() and (f[below] == far).all()


def test_without_altitude_range_bounds_are_constant():
    gen = torch.Generator().manual_seed(9)
    o, d = origins_at(gen, 50, -2.0, 2.0), unit_dirs(gen, 50, down=True)
    n, f = near_far(o, d, 0.1, 3.0, None)
    assert (n == 0.1).all() and (f == 3.0).all()


def test_normalize_altitude_range_uses_down_origin_and_scale():
    coordinates = Coordinates(torch.tensor([10.0, -7.0, 3.0], dtype=torch.float64), 50.0)
    top, ground = normalize_altitude_range([-40.0, 35.0], coordinates)
    assert top == pytest.approx((-40.0 - 10.0) / 50.0)
    assert ground == pytest.approx((35.0 - 10.0) / 50.0)
    assert normalize_altitude_range(None, coordinates) is None
