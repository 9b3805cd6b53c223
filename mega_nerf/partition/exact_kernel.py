"""The exact ray-to-cell rule (partition.exact) in one GPU kernel (Triton): per ray, the ends of every centroid's
nearest interval along the straight part, the point rule at each, and beyond the foreground box the arcs' ends and
boxes, with nothing in between written to memory. The PyTorch version runs dozens of float64 kernels over
(rays, cells, cells) temporaries, 27 ms of GPU time per million rays on survey256's 4 cells (bench/RESULTS.md,
thirteenth session); with the kernel a fresh survey256 partition's membership took 1.12-1.21 s against 1.58 s, and
city's 1.93 against 2.59 s (fifteenth). Two entry points share that work (`_cells`): `exact_membership` for given
rays, and `pixel_membership`, which makes each pixel's ray and bounds itself (partition.pixels), so that a
partition writes nothing to GPU memory but the cells.

References: `exact_membership_reference`, partition.exact's segment and arc rules combined as
cells.exact_ray_membership combines them, and `pixel_membership_reference`, the same after partition.pixels. The
kernels repeat their arithmetic operation by operation (no fused multiply-adds, correctly rounded divisions and
square roots, sums over axes in the same order, the box extent subtracted in float32 as contracted_position does),
so each agrees with its reference bit for bit (tests/test_gpu.py), and a pixel's bits never depend on its batch or
on the process count. Triton's math library flushes subnormal float32 values to zero, which PyTorch does not; a
partition's rays and bounds have none (their magnitudes are those of pixel offsets over focal lengths, unit
directions and distances of at least 1e-12). One difference is left: Triton's minima and maxima pass over a
NaN where torch's propagate it; partition rays have finite bounds (rays.near_far clamps them to the partition's
near and far), so no NaN arises.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from mega_nerf.partition.exact import DEFAULT_ARCS, SLACK, Box, arc_membership, routed, segment_membership
from mega_nerf.partition.pixels import CAMERA_FLOATS, Piece, piece_rays

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference runs
    triton = None


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
    def _cells(ox, oy, oz, dx, dy, dz, near32, split32, far32, c_ptr, w_ptr, lo_ptr, ext_ptr, flag_ptr, scale_ptr,
               K: tl.constexpr, KP: tl.constexpr, FIRST_AXIS: tl.constexpr, PLACE: tl.constexpr,
               ARCS: tl.constexpr, BLOCK: tl.constexpr):
        """(BLOCK, KP) bool: the cells of float32 rays (BLOCK,) bounded to [near, split] and routed beyond."""
        ox, oy, oz = ox.to(tl.float64), oy.to(tl.float64), oz.to(tl.float64)
        dx, dy, dz = dx.to(tl.float64), dy.to(tl.float64), dz.to(tl.float64)
        k = tl.arange(0, KP)
        valid = (k < K)[None, :]
        scale = tl.load(scale_ptr)  # float64: a Python float argument would arrive as float32
        cx = tl.load(c_ptr + k * 3 + 0, mask=k < K, other=0.0)
        cy = tl.load(c_ptr + k * 3 + 1, mask=k < K, other=0.0)
        cz = tl.load(c_ptr + k * 3 + 2, mask=k < K, other=0.0)
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
        return member

    @triton.jit
    def _ray_membership(o_ptr, d_ptr, near_ptr, split_ptr, far_ptr, c_ptr, w_ptr, lo_ptr, ext_ptr, flag_ptr,
                        out_ptr, n_rays, scale_ptr, K: tl.constexpr, KP: tl.constexpr, FIRST_AXIS: tl.constexpr,
                        PLACE: tl.constexpr, ARCS: tl.constexpr, BLOCK: tl.constexpr):
        """The cells of given rays (exact_membership)."""
        ray = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        live = ray < n_rays
        ox = tl.load(o_ptr + ray * 3 + 0, mask=live, other=0.0)
        oy = tl.load(o_ptr + ray * 3 + 1, mask=live, other=0.0)
        oz = tl.load(o_ptr + ray * 3 + 2, mask=live, other=0.0)
        dx = tl.load(d_ptr + ray * 3 + 0, mask=live, other=0.0)
        dy = tl.load(d_ptr + ray * 3 + 1, mask=live, other=0.0)
        dz = tl.load(d_ptr + ray * 3 + 2, mask=live, other=0.0)
        near32 = tl.load(near_ptr + ray, mask=live, other=0.0)
        split32 = tl.load(split_ptr + ray, mask=live, other=0.0)
        far32 = tl.load(far_ptr + ray, mask=live, other=0.0)
        member = _cells(ox, oy, oz, dx, dy, dz, near32, split32, far32, c_ptr, w_ptr, lo_ptr, ext_ptr, flag_ptr,
                        scale_ptr, K, KP, FIRST_AXIS, PLACE, ARCS, BLOCK)
        k = tl.arange(0, KP)
        tl.store(out_ptr + ray[:, None] * K + k[None, :], member.to(tl.uint8), mask=live[:, None] & (k < K)[None, :])

    @triton.jit
    def _box_axis(o, d, lo, hi):
        """bounds.box_exit along one axis: the distances (entering, leaving) of its slab, float32 as there."""
        safe = tl.where(tl.abs(d) < 1e-12, 1e-12, d)
        t0, t1 = tl.math.div_rn(lo - o, safe), tl.math.div_rn(hi - o, safe)
        return tl.minimum(t0, t1), tl.maximum(t0, t1)

    @triton.jit
    def _pixel_rays_bounds(cam_ptr, image, W, first, ray, near, far, top, ground, box_ptr, CAMERA: tl.constexpr,
                           PLACE: tl.constexpr, BLOCK: tl.constexpr):
        """partition.pixels, float32 operation by operation: the rays of one image's pixels first + ray (BLOCK,)
        (origin, direction) and their near, split and far bounds."""
        pix = first + ray
        row = pix // W
        col = pix - row * W
        cam = cam_ptr + image * CAMERA  # a row of pixels.camera_table
        x = tl.math.div_rn((col.to(tl.float32) + 0.5) - tl.load(cam + 14), tl.load(cam + 12))
        # times -1, not negated: Triton's negation is 0 - y, which turns torch's -0.0 into +0.0
        y = tl.math.div_rn((row.to(tl.float32) + 0.5) - tl.load(cam + 15), tl.load(cam + 13)) * -1.0
        z = tl.full([BLOCK], -1.0, tl.float32)
        norm = tl.math.sqrt_rn(x * x + y * y + z * z)
        ux, uy, uz = tl.math.div_rn(x, norm), tl.math.div_rn(y, norm), tl.math.div_rn(z, norm)
        dx = tl.load(cam + 0) * ux + tl.load(cam + 1) * uy + tl.load(cam + 2) * uz
        dy = tl.load(cam + 4) * ux + tl.load(cam + 5) * uy + tl.load(cam + 6) * uz
        dz = tl.load(cam + 8) * ux + tl.load(cam + 9) * uy + tl.load(cam + 10) * uz
        ox = tl.load(cam + 3 + 0 * ray)  # the camera centre, one per ray
        oy = tl.load(cam + 7 + 0 * ray)
        oz = tl.load(cam + 11 + 0 * ray)

        # rays.near_far: clipped to the altitude slab
        down = tl.maximum(dx, 1e-12)
        near_t = tl.where((ox < top) & (dx > 0), tl.math.div_rn(top - ox, down), near)
        near_t = tl.minimum(tl.maximum(near_t, near), far)
        far_t = tl.where((ox < ground) & (dx > 0), tl.math.div_rn(ground - ox, down), far)
        far_t = tl.minimum(far_t, far)
        far_t = tl.where((ox < top) & (dx <= 0), near_t, tl.maximum(near_t, far_t))
        split_t = far_t
        if PLACE:  # the box exit (bounds.box_exit), clamped to [near, far]
            enter_x, leave_x = _box_axis(ox, dx, tl.load(box_ptr + 0), tl.load(box_ptr + 3))
            enter_y, leave_y = _box_axis(oy, dy, tl.load(box_ptr + 1), tl.load(box_ptr + 4))
            enter_z, leave_z = _box_axis(oz, dz, tl.load(box_ptr + 2), tl.load(box_ptr + 5))
            enter = tl.maximum(tl.maximum(enter_x, enter_y), enter_z)
            leave = tl.minimum(tl.minimum(leave_x, leave_y), leave_z)
            split_t = tl.maximum(tl.minimum(far_t, tl.where(leave >= enter, leave, 0.0)), near_t)
        return ox, oy, oz, dx, dy, dz, near_t, split_t, far_t

    @triton.jit(do_not_specialize=["image", "W", "first", "n_rays", "at"])
    def _pixel_membership(cam_ptr, image, W, first, n_rays, at, near, far, top, ground, box_ptr, c_ptr, w_ptr,
                          lo_ptr, ext_ptr, flag_ptr, out_ptr, scale_ptr, CAMERA: tl.constexpr, K: tl.constexpr,
                          KP: tl.constexpr, FIRST_AXIS: tl.constexpr, PLACE: tl.constexpr, ARCS: tl.constexpr,
                          BLOCK: tl.constexpr):
        """The cells of one image's pixels first .. first + n_rays - 1, written from row `at` of the output."""
        ray = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        live = ray < n_rays
        ox, oy, oz, dx, dy, dz, near_t, split_t, far_t = _pixel_rays_bounds(
            cam_ptr, image, W, first, ray, near, far, top, ground, box_ptr, CAMERA, PLACE, BLOCK)
        member = _cells(ox, oy, oz, dx, dy, dz, near_t, split_t, far_t, c_ptr, w_ptr, lo_ptr, ext_ptr, flag_ptr,
                        scale_ptr, K, KP, FIRST_AXIS, PLACE, ARCS, BLOCK)
        k = tl.arange(0, KP)
        tl.store(out_ptr + (at + ray)[:, None] * K + k[None, :], member.to(tl.uint8),
                 mask=live[:, None] & (k < K)[None, :])


def _rule_args(centroids: torch.Tensor, margin: float, cluster_2d: bool, box: Box | None,
               device: torch.device) -> tuple[list[torch.Tensor], dict[str, int | bool]]:
    """The kernels' shared arguments: centroids, arc weights, the box's corner, extent and contracted axes, the
    point rule's scale (all float64 but the axes), then the compile-time ones."""
    f64 = torch.float64
    if box is None:
        lo = ext = torch.zeros(3, dtype=f64, device=device)
        flags = torch.zeros(3, dtype=torch.uint8, device=device)
    else:  # contracted_position's extent is a float32 difference
        lo, ext = box[0].to(device).double(), (box[1].to(device) - box[0].to(device)).double()
        flags = box[2].to(device, torch.uint8)
    K = centroids.shape[0]
    KP = max(2, triton.next_power_of_2(K))
    w = torch.linspace(0, 1, DEFAULT_ARCS + 1, dtype=f64, device=device)  # arc_membership's
    scale = torch.tensor(margin ** 2 * (1 + SLACK), dtype=f64, device=device)  # point_rule's
    tensors = [centroids.to(device, f64).contiguous(), w, lo.contiguous(), ext.contiguous(), flags.contiguous()]
    return tensors + [scale], dict(K=K, KP=KP, FIRST_AXIS=1 if cluster_2d else 0, PLACE=box is not None,
                                   ARCS=DEFAULT_ARCS, BLOCK=max(16, min(256, 2048 // KP)))


def exact_membership(origins: torch.Tensor, dirs: torch.Tensor, near: torch.Tensor, split: torch.Tensor,
                     far: torch.Tensor, centroids: torch.Tensor, margin: float, cluster_2d: bool,
                     box: Box | None) -> torch.Tensor:
    """`exact_membership_reference` on the GPU for float32 rays: origins, dirs (N, 3); near <= split <= far (N,);
    centroids (K, 3); `box`: the box beyond which points are routed by the contraction (exact.routed), or None."""
    n, K = origins.shape[0], centroids.shape[0]
    out = torch.empty(n, K, dtype=torch.uint8, device=origins.device)
    if n == 0:
        return out.view(torch.bool)
    (c, w, lo, ext, flags, scale), meta = _rule_args(centroids, margin, cluster_2d, box, origins.device)
    _ray_membership[(triton.cdiv(n, meta["BLOCK"]),)](
        origins.float().contiguous(), dirs.float().contiguous(), near.float().contiguous(),
        split.float().contiguous(), far.float().contiguous(), c, w, lo, ext, flags, out, n, scale, **meta,
        enable_fp_fusion=False)
    return out.view(torch.bool)


def pixel_membership_reference(cameras: torch.Tensor, pieces: list[Piece], near: float, far: float,
                               altitude_range: tuple[float, float], centroids: torch.Tensor, margin: float,
                               cluster_2d: bool, box: Box | None) -> torch.Tensor:
    """(N, K) bool for the pieces' pixels in order: partition.pixels' rays and bounds, then
    `exact_membership_reference` (cameras: pixels.camera_table)."""
    rays = piece_rays(cameras, pieces, near, far, altitude_range, box)
    return exact_membership_reference(*rays, centroids, margin, cluster_2d, routed(box))


def pixel_membership(cameras: torch.Tensor, pieces: list[Piece], near: float, far: float,
                     altitude_range: tuple[float, float], centroids: torch.Tensor, margin: float, cluster_2d: bool,
                     box: Box | None) -> torch.Tensor:
    """`pixel_membership_reference` on the GPU, one launch per piece and nothing but the cells written: no rays,
    bounds or temporaries in memory (the rays and bounds took 0.18 s of survey256's 0.36 s of warm membership as
    PyTorch kernels, bench/RESULTS.md, twenty-sixth session)."""
    device = cameras.device
    out = torch.empty(sum(last - first for _, _, first, last in pieces), centroids.shape[0], dtype=torch.uint8,
                      device=device)
    (c, w, lo, ext, flags, scale), meta = _rule_args(centroids, margin, cluster_2d, box, device)
    corners = torch.zeros(6, device=device) if box is None else torch.cat([box[0], box[1]]).to(device).float()
    top, ground = altitude_range
    at = 0
    for image, W, first, last in pieces:
        n = last - first
        _pixel_membership[(triton.cdiv(n, meta["BLOCK"]),)](
            cameras, image, W, first, n, at, near, far, top, ground, corners, c, w, lo, ext, flags, out, scale,
            CAMERA=CAMERA_FLOATS, **meta, enable_fp_fusion=False)
        at += n
    return out.view(torch.bool)
