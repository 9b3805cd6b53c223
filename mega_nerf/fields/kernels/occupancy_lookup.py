"""Occupancy of every sample along many rays in one GPU kernel (Triton): for each (ray, sample) the point
origin + t * direction, its field coordinates (box normalisation and, on contracted axes, the scene contraction),
its grid cell and that cell's bit, without writing any of the intermediates to memory. The same lookup as a dozen
PyTorch kernels over every uniform sample of a frame took 47 ms of a 1080p frame's 327 (bench/RESULTS.md, third
session) and is most of the elementwise work left in a frame's profile.

Reference: `occupied_along_reference` given the same GridLookup (what a hash field's or a container's `occupied`
calls), a block of rays at a time. The kernel repeats the lookup's arithmetic operation by operation (no fused
multiply-adds, correctly rounded divisions), so the two agree bit for bit (tests/test_gpu.py). The samples per ray
are a compile-time constant (the ray of a sample is then a division by a constant): one compilation per count a
process renders with (full frames, previews), cached on disk by Triton.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from mega_nerf.fields.occupancy import GridLookup

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the PyTorch path is used
    triton = None

BLOCK = 1024


def occupied_along_reference(occupied: Callable[[torch.Tensor], torch.Tensor], origins: torch.Tensor,
                             dirs: torch.Tensor, t: torch.Tensor, points_at_once: int = 1 << 23) -> torch.Tensor:
    """(R, n) bool: `occupied` ((N, 3) -> (N,) bool: a GridLookup, or any field's `occupied`) at
    origins + t * dirs; origins, dirs (R, 3), t (R, n). A block of rays at a time, so memory follows
    `points_at_once`, not R."""
    R, n = t.shape
    out = torch.empty(R, n, dtype=torch.bool, device=t.device)
    rays = max(1, points_at_once // max(n, 1))
    for s in range(0, R, rays):
        sl = slice(s, s + rays)
        points = origins[sl, None, :] + dirs[sl, None, :] * t[sl, :, None]
        out[sl] = occupied(points.reshape(-1, 3)).view(-1, n)
    return out


if triton is not None:

    @triton.jit
    def _axis(o_ptr, d_ptr, lo_ptr, hi_ptr, flag_ptr, ray, t, axis: tl.constexpr, mask):
        """One axis of the field coordinate u of origin + t * direction, as bounds.world_to_box computes it."""
        o = tl.load(o_ptr + ray * 3 + axis, mask=mask, other=0.0)
        d = tl.load(d_ptr + ray * 3 + axis, mask=mask, other=0.0)
        lo, hi = tl.load(lo_ptr + axis), tl.load(hi_ptr + axis)
        u = tl.math.div_rn(o + d * t - lo, hi - lo)
        x = 2.0 * u - 1.0  # bounds.contract of box units, then back to [1/4, 3/4] for the box
        a = tl.abs(x)
        far = tl.where(x < 0, -1.0, 1.0) * (2.0 - tl.math.div_rn(1.0, tl.maximum(a, 1.0)))
        contracted = tl.math.div_rn(tl.where(a > 1, far, x) + 2.0, 4.0)
        return tl.where(tl.load(flag_ptr + axis) != 0, contracted, u)

    @triton.jit
    def _lookup(o_ptr, d_ptr, t_ptr, lo_ptr, hi_ptr, flag_ptr, grid_ptr, out_ptr, total, N: tl.constexpr,
                RES: tl.constexpr, BLOCK: tl.constexpr):
        idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = idx < total
        ray = idx // N
        t = tl.load(t_ptr + idx, mask=mask, other=0.0)
        ux = _axis(o_ptr, d_ptr, lo_ptr, hi_ptr, flag_ptr, ray, t, 0, mask)
        uy = _axis(o_ptr, d_ptr, lo_ptr, hi_ptr, flag_ptr, ray, t, 1, mask)
        uz = _axis(o_ptr, d_ptr, lo_ptr, hi_ptr, flag_ptr, ray, t, 2, mask)
        inside = (ux >= 0) & (ux <= 1) & (uy >= 0) & (uy <= 1) & (uz >= 0) & (uz <= 1)
        # occupancy.cell_index: truncation of u * RES clamped to the grid (clamping first gives the same cell and
        # keeps far-outside points' conversions in range)
        cx = tl.minimum(tl.maximum(ux * RES, 0.0), RES - 1.0).to(tl.int64)
        cy = tl.minimum(tl.maximum(uy * RES, 0.0), RES - 1.0).to(tl.int64)
        cz = tl.minimum(tl.maximum(uz * RES, 0.0), RES - 1.0).to(tl.int64)
        bit = tl.load(grid_ptr + (cx * RES + cy) * RES + cz, mask=mask & inside, other=0)
        tl.store(out_ptr + idx, (bit != 0).to(tl.uint8), mask=mask)


def occupied_along(lookup: GridLookup, origins: torch.Tensor, dirs: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """(R, n) bool: whether `lookup`'s grid may be occupied at origins + t * dirs; origins, dirs (R, 3) float32,
    t (R, n) float32 (what occupied_along_reference gives for the field the lookup describes)."""
    R, n = t.shape
    out = torch.empty(R, n, dtype=torch.uint8, device=t.device)
    if R * n == 0:
        return out.view(torch.bool)
    _lookup[(triton.cdiv(R * n, BLOCK),)](
        origins.float().contiguous(), dirs.float().contiguous(), t.float().contiguous(),
        lookup.box_min.float().contiguous(), lookup.box_max.float().contiguous(),
        lookup.contracted.to(torch.uint8).contiguous(), lookup.mask.view(torch.uint8), out, R * n, N=n,
        RES=lookup.resolution, BLOCK=BLOCK, enable_fp_fusion=False)
    return out.view(torch.bool)
