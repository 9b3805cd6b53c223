"""The exact ray-to-cell rule (partition.exact) in one GPU kernel (Triton): per ray, the ends of every centroid's
nearest interval along the straight part, the point rule at each, and beyond the foreground box the arcs' ends and
boxes, with nothing in between written to memory. The PyTorch version runs dozens of float64 kernels over
(rays, cells, cells) temporaries, 27 ms of GPU time per million rays on survey256's 4 cells (bench/RESULTS.md,
thirteenth session); with the kernel a fresh survey256 partition's membership took 1.12-1.21 s against 1.58 s, and
city's 1.93 against 2.59 s (fifteenth).

Reference: `exact_membership_reference`, partition.exact's segment and arc rules combined as
cells.exact_ray_membership combines them. The kernel repeats their float64 arithmetic operation by operation (no
fused multiply-adds, correctly rounded divisions, sums over axes in the same order, the box extent subtracted in
float32 as contracted_position does), so the two agree bit for bit (tests/test_gpu.py), and a pixel's bits still
never depend on its batch or on the process count. One difference is left: Triton's minima and maxima pass over a
NaN where torch's propagate it; partition rays have finite bounds (rays.near_far clamps them to the partition's
near and far), so no NaN arises.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from mega_nerf.partition.exact import DEFAULT_ARCS, SLACK, arc_membership, segment_membership

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference runs
    triton = None

Box = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # box_min, box_max (3,) and the contracted axes (3,) bool


def exact_membership_reference(origins: torch.Tensor, dirs: torch.Tensor, near: torch.Tensor, split: torch.Tensor,
                               far: torch.Tensor, centroids: torch.Tensor, margin: float, cluster_2d: bool,
                               place: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
    """(N, K) bool: the straight part [near, split] exactly, and with `place` the routed remainder [split, far] of
    the rays that have one, conservatively (partition.exact)."""
    member = segment_membership(origins, dirs, near, split, centroids, margin, cluster_2d, place)
    if place is not None:
        # A remainder of one point (split = far) is the segment's end, tested above; the arcs would place it again
        # up to the rounding of their t (an ulp, far inside exact.SLACK)
        rest = (split != far).nonzero().squeeze(1)
        if len(rest):
            member[rest] |= arc_membership(origins[rest], dirs[rest], split[rest], far[rest], centroids, margin,
                                           cluster_2d, place)
    return member


if triton is not None:

    @triton.jit
    def _routed(p, lo_ptr, ext_ptr, flag_ptr, axis: tl.constexpr, PLACE: tl.constexpr):
        """bounds.contracted_position along one axis (float64: Triton divides those correctly rounded, div.rn.f64):
        beyond the box, pulled in by the contraction."""
        if PLACE:
            lo, ext = tl.load(lo_ptr + axis), tl.load(ext_ptr + axis)
            x = 2.0 * (p - lo) / ext - 1.0
            a = tl.abs(x)
            c = tl.where(a > 1, tl.where(x < 0, -1.0, 1.0) * (2.0 - 1.0 / tl.maximum(a, 1.0)), x)
            pulled = lo + ext * (c + 1.0) / 2.0
            p = tl.where((tl.load(flag_ptr + axis) != 0) & (a > 1), pulled, p)
        return p

    @triton.jit
    def _sq_dist(px, py, pz, cx, cy, cz, FIRST_AXIS: tl.constexpr):
        """(BLOCK, KP) squared distances of points to centroids, summed over axes in order (partition.exact)."""
        dy, dz = py[:, None] - cy[None, :], pz[:, None] - cz[None, :]
        if FIRST_AXIS == 0:
            dx = px[:, None] - cx[None, :]
            return dx * dx + dy * dy + dz * dz
        return dy * dy + dz * dz

    @triton.jit
    def _rule(px, py, pz, cx, cy, cz, valid, scale, FIRST_AXIS: tl.constexpr):
        """(BLOCK, KP): partition.exact.point_rule at one point per ray."""
        d2 = tl.where(valid, _sq_dist(px, py, pz, cx, cy, cz, FIRST_AXIS), float("inf"))
        return valid & (d2 <= scale * tl.min(d2, axis=1)[:, None])

    @triton.jit
    def _rule_at(ox, oy, oz, dx, dy, dz, t, cx, cy, cz, valid, scale, lo_ptr, ext_ptr, flag_ptr,
                 FIRST_AXIS: tl.constexpr, PLACE: tl.constexpr):
        """The point rule at place(o + t d) for each ray."""
        px = _routed(ox + dx * t, lo_ptr, ext_ptr, flag_ptr, 0, PLACE)
        py = _routed(oy + dy * t, lo_ptr, ext_ptr, flag_ptr, 1, PLACE)
        pz = _routed(oz + dz * t, lo_ptr, ext_ptr, flag_ptr, 2, PLACE)
        return _rule(px, py, pz, cx, cy, cz, valid, scale, FIRST_AXIS)

    @triton.jit
    def _box_sq(lo, hi, c):
        """One axis of a piece's nearest and farthest squared distances to the centroids (BLOCK, KP)."""
        below = tl.maximum(lo[:, None] - c[None, :], 0.0)
        above = tl.maximum(c[None, :] - hi[:, None], 0.0)
        far = tl.maximum(c[None, :] - lo[:, None], hi[:, None] - c[None, :])
        return below * below + above * above, far * far

    @triton.jit
    def _membership(o_ptr, d_ptr, near_ptr, split_ptr, far_ptr, c_ptr, w_ptr, lo_ptr, ext_ptr, flag_ptr, out_ptr,
                    n_rays, scale_ptr, K: tl.constexpr, KP: tl.constexpr, FIRST_AXIS: tl.constexpr,
                    PLACE: tl.constexpr, ARCS: tl.constexpr, BLOCK: tl.constexpr):
        ray = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        live = ray < n_rays
        k = tl.arange(0, KP)
        valid = (k < K)[None, :]
        scale = tl.load(scale_ptr)  # float64: a Python float argument would arrive as float32
        cx = tl.load(c_ptr + k * 3 + 0, mask=k < K, other=0.0)
        cy = tl.load(c_ptr + k * 3 + 1, mask=k < K, other=0.0)
        cz = tl.load(c_ptr + k * 3 + 2, mask=k < K, other=0.0)
        ox = tl.load(o_ptr + ray * 3 + 0, mask=live, other=0.0).to(tl.float64)
        oy = tl.load(o_ptr + ray * 3 + 1, mask=live, other=0.0).to(tl.float64)
        oz = tl.load(o_ptr + ray * 3 + 2, mask=live, other=0.0).to(tl.float64)
        dx = tl.load(d_ptr + ray * 3 + 0, mask=live, other=0.0).to(tl.float64)
        dy = tl.load(d_ptr + ray * 3 + 1, mask=live, other=0.0).to(tl.float64)
        dz = tl.load(d_ptr + ray * 3 + 2, mask=live, other=0.0).to(tl.float64)
        near32 = tl.load(near_ptr + ray, mask=live, other=0.0)
        split32 = tl.load(split_ptr + ray, mask=live, other=0.0)
        far32 = tl.load(far_ptr + ray, mask=live, other=0.0)
        t0 = tl.minimum(near32, split32).to(tl.float64)
        t1 = tl.maximum(near32, split32).to(tl.float64)

        # The straight part: voronoi_ends, then the point rule at each end, and at t0 and t1
        r2 = _sq_dist(ox, oy, oz, cx, cy, cz, FIRST_AXIS)  # (BLOCK, KP) |o - c_i|^2
        if FIRST_AXIS == 0:
            dc = dx[:, None] * cx[None, :] + dy[:, None] * cy[None, :] + dz[:, None] * cz[None, :]
        else:
            dc = dy[:, None] * cy[None, :] + dz[:, None] * cz[None, :]
        member = _rule_at(ox, oy, oz, dx, dy, dz, t0, cx, cy, cz, valid, scale, lo_ptr, ext_ptr, flag_ptr,
                          FIRST_AXIS, PLACE)
        member |= _rule_at(ox, oy, oz, dx, dy, dz, t1, cx, cy, cz, valid, scale, lo_ptr, ext_ptr, flag_ptr,
                           FIRST_AXIS, PLACE)
        for j in range(K):
            cjx, cjy, cjz = tl.load(c_ptr + j * 3 + 0), tl.load(c_ptr + j * 3 + 1), tl.load(c_ptr + j * 3 + 2)
            ey, ez = oy - cjy, oz - cjz
            if FIRST_AXIS == 0:
                ex = ox - cjx
                r2j = ex * ex + ey * ey + ez * ez
                dcj = dx * cjx + dy * cjy + dz * cjz
            else:
                r2j = ey * ey + ez * ez
                dcj = dy * cjy + dz * cjz
            slope = 2.0 * (dc - dcj[:, None])  # (BLOCK, KP) over i
            offset = r2j[:, None] - r2
            root = -offset / tl.where(slope == 0, 1.0, slope)
            lo = tl.maximum(t0, tl.max(tl.where(valid & (slope < 0), root, -float("inf")), axis=1))
            hi = tl.minimum(t1, tl.min(tl.where(valid & (slope > 0), root, float("inf")), axis=1))
            blocked = tl.max((valid & (slope == 0) & (offset > 0)).to(tl.int32), axis=1) != 0
            empty = (lo > hi) | blocked
            member |= _rule_at(ox, oy, oz, dx, dy, dz, tl.where(empty, t0, lo), cx, cy, cz, valid, scale, lo_ptr,
                               ext_ptr, flag_ptr, FIRST_AXIS, PLACE)
            member |= _rule_at(ox, oy, oz, dx, dy, dz, tl.where(empty, t0, hi), cx, cy, cz, valid, scale, lo_ptr,
                               ext_ptr, flag_ptr, FIRST_AXIS, PLACE)

        if PLACE:  # the routed remainder [split, far], in ARCS pieces evenly spaced in 1 / t: arc_membership
            arc = (split32 != far32)[:, None]
            s, f = split32.to(tl.float64), far32.to(tl.float64)
            qx = tl.zeros([BLOCK], dtype=tl.float64)
            qy = tl.zeros([BLOCK], dtype=tl.float64)
            qz = tl.zeros([BLOCK], dtype=tl.float64)
            for a in range(ARCS + 1):
                w = tl.load(w_ptr + a)
                t = 1.0 / ((1.0 - w) / s + w / f)
                px = _routed(ox + dx * t, lo_ptr, ext_ptr, flag_ptr, 0, PLACE)
                py = _routed(oy + dy * t, lo_ptr, ext_ptr, flag_ptr, 1, PLACE)
                pz = _routed(oz + dz * t, lo_ptr, ext_ptr, flag_ptr, 2, PLACE)
                member |= arc & _rule(px, py, pz, cx, cy, cz, valid, scale, FIRST_AXIS)
                if a > 0:
                    near2y, far2y = _box_sq(tl.minimum(qy, py), tl.maximum(qy, py), cy)
                    near2z, far2z = _box_sq(tl.minimum(qz, pz), tl.maximum(qz, pz), cz)
                    if FIRST_AXIS == 0:
                        near2x, far2x = _box_sq(tl.minimum(qx, px), tl.maximum(qx, px), cx)
                        near2 = near2x + near2y + near2z
                        far2 = far2x + far2y + far2z
                    else:
                        near2 = near2y + near2z
                        far2 = far2y + far2z
                    least = tl.min(tl.where(valid, far2, float("inf")), axis=1)
                    member |= arc & valid & (near2 <= scale * least[:, None])
                qx, qy, qz = px, py, pz
        tl.store(out_ptr + ray[:, None] * K + k[None, :], member.to(tl.uint8), mask=live[:, None] & valid)


def exact_membership(origins: torch.Tensor, dirs: torch.Tensor, near: torch.Tensor, split: torch.Tensor,
                     far: torch.Tensor, centroids: torch.Tensor, margin: float, cluster_2d: bool,
                     box: Box | None) -> torch.Tensor:
    """`exact_membership_reference` on the GPU for float32 rays: origins, dirs (N, 3); near <= split <= far (N,);
    centroids (K, 3); `box`: the box beyond which points are routed by the contraction (cells.routed), or None."""
    n, K = origins.shape[0], centroids.shape[0]
    out = torch.empty(n, K, dtype=torch.uint8, device=origins.device)
    if n == 0:
        return out.view(torch.bool)
    device, f64 = origins.device, torch.float64
    if box is None:
        lo = ext = torch.zeros(3, dtype=f64, device=device)
        flags = torch.zeros(3, dtype=torch.uint8, device=device)
    else:  # contracted_position's extent is a float32 difference
        lo, ext = box[0].to(device).double(), (box[1].to(device) - box[0].to(device)).double()
        flags = box[2].to(device, torch.uint8)
    KP = max(2, triton.next_power_of_2(K))
    block = max(16, min(256, 2048 // KP))
    w = torch.linspace(0, 1, DEFAULT_ARCS + 1, dtype=f64, device=device)  # arc_membership's
    scale = torch.tensor(margin ** 2 * (1 + SLACK), dtype=f64, device=device)  # point_rule's
    _membership[(triton.cdiv(n, block),)](
        origins.float().contiguous(), dirs.float().contiguous(), near.float().contiguous(),
        split.float().contiguous(), far.float().contiguous(), centroids.to(device, f64).contiguous(), w,
        lo.contiguous(), ext.contiguous(), flags.contiguous(), out, n, scale, K=K, KP=KP,
        FIRST_AXIS=1 if cluster_2d else 0, PLACE=box is not None, ARCS=DEFAULT_ARCS, BLOCK=block,
        enable_fp_fusion=False)
    return out.view(torch.bool)
