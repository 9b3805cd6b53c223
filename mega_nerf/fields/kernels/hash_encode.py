"""Fused hash-grid encoding on the GPU (Triton): one kernel computes all 8 corners of a level for a block of
points, and the backward pass scatters gradients into the table with atomic adds. It computes exactly the
function of the plain PyTorch `HashGrid.forward` (the reference, tested equal on the GPU), without the
(N, L, 8, 3) int64 temporaries that make the reference slow. Positions get no gradient (poses are fixed).

Why the backward sums before it adds: atomic adds to one address serialise, and on real scenes most samples fall
in few cells (one atomic add per point, corner and feature made the backward 71 ms of a 99 ms step on an H200).
So each program sorts its block of points by their cell at its level, sums each run of equal cells with a
segmented scan, and only a run's last point adds the sum: one atomic add per (cell, corner, feature) and block
instead of one per point. All levels do it: on uniform points, where little repeats, the sort hides behind the
atomic adds (at most ~3% a level), while crowded hashed levels gain as much as the dense ones
(bench/hash_backward.py --per_level; H200, 2M samples of rays in a small region: 60 -> 4.0 ms, uniform 6.5 -> 6.3).
The sort and the reverse scan need Triton 3.0 or later.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference path is used
    triton = None

BLOCK = 256


if triton is not None:

    @triton.jit
    def _corner(bx, by, bz, fx, fy, fz, res, dense, size, c: tl.constexpr):
        ox: tl.constexpr = (c >> 2) & 1
        oy: tl.constexpr = (c >> 1) & 1
        oz: tl.constexpr = c & 1
        vx, vy, vz = bx + ox, by + oy, bz + oz
        stride = res + 1
        dense_index = vx + stride * (vy + stride * vz)
        hashed = (vx ^ (vy * 2654435761) ^ (vz * 805459861)) & (size - 1)
        index = tl.where(dense, dense_index, hashed)
        wx = fx if ox else 1.0 - fx
        wy = fy if oy else 1.0 - fy
        wz = fz if oz else 1.0 - fz
        return index, wx * wy * wz

    @triton.jit
    def _base(x_ptr, n, mask, res):
        x = tl.minimum(tl.maximum(tl.load(x_ptr + n * 3 + 0, mask=mask, other=0.0), 0.0), 1.0)
        y = tl.minimum(tl.maximum(tl.load(x_ptr + n * 3 + 1, mask=mask, other=0.0), 0.0), 1.0)
        z = tl.minimum(tl.maximum(tl.load(x_ptr + n * 3 + 2, mask=mask, other=0.0), 0.0), 1.0)
        resf = res.to(tl.float32)  # float32 scaling, exactly as the reference computes it
        sx, sy, sz = x * resf, y * resf, z * resf
        bx = tl.minimum(tl.floor(sx).to(tl.int64), res - 1)
        by = tl.minimum(tl.floor(sy).to(tl.int64), res - 1)
        bz = tl.minimum(tl.floor(sz).to(tl.int64), res - 1)
        return bx, by, bz, sx - bx.to(tl.float32), sy - by.to(tl.float32), sz - bz.to(tl.float32)

    @triton.jit
    def _forward(x_ptr, table_ptr, res_ptr, offset_ptr, out_ptr, N, size, L: tl.constexpr, BLOCK: tl.constexpr):
        level = tl.program_id(1)
        n = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = n < N
        res = tl.load(res_ptr + level)
        offset = tl.load(offset_ptr + level)
        dense = (res + 1) * (res + 1) * (res + 1) <= size
        bx, by, bz, fx, fy, fz = _base(x_ptr, n, mask, res)
        acc0 = tl.zeros((BLOCK,), tl.float32)
        acc1 = tl.zeros((BLOCK,), tl.float32)
        for c in tl.static_range(8):
            index, w = _corner(bx, by, bz, fx, fy, fz, res, dense, size, c)
            row = (index + offset) * 2
            acc0 += w * tl.load(table_ptr + row, mask=mask, other=0.0)
            acc1 += w * tl.load(table_ptr + row + 1, mask=mask, other=0.0)
        tl.store(out_ptr + n * (2 * L) + level * 2, acc0, mask=mask)
        tl.store(out_ptr + n * (2 * L) + level * 2 + 1, acc1, mask=mask)

    @triton.jit
    def _two_smallest(a, a_next, b, b_next):
        # The two smallest of a multiset, as (smallest, next). Scanned in reverse over sorted cells it gives each
        # point the next point's cell; commutative, so the order a reverse scan hands over its operands is moot.
        return tl.minimum(a, b), tl.minimum(tl.maximum(a, b), tl.minimum(a_next, b_next))

    @triton.jit
    def _run_sum(run_a, a0, a1, run_b, b0, b1):
        # Sums within runs of equal id: associative (as a scan needs) because equal ids are adjacent (sorted).
        same = run_a == run_b
        return run_b, b0 + tl.where(same, a0, 0.0), b1 + tl.where(same, a1, 0.0)

    @triton.jit
    def _sort_by_cell(x_ptr, n, N, res, BLOCK: tl.constexpr):
        """n: (BLOCK,) point ids of a block. Returns them reordered by their cell at resolution res (points of
        one cell adjacent), each one's run id (non-decreasing, equal within a cell) and whether it ends its run."""
        mask = n < N
        bx, by, bz, _, _, _ = _base(x_ptr, n, mask, res)
        stride = res + 1
        cell = tl.where(mask, bx + stride * (by + stride * bz), stride * stride * stride)  # padding sorts last
        lane = tl.arange(0, BLOCK)
        key = tl.sort(cell * BLOCK + lane)  # the lane in the low bits carries the point along
        cell = key // BLOCK
        no_next = tl.full((BLOCK,), 2 ** 63 - 1, tl.int64)
        _, next_cell = tl.associative_scan((cell, no_next), 0, _two_smallest, reverse=True)
        last = (next_cell != cell).to(tl.int32)
        run = tl.cumsum(last, 0) - last  # runs ended before this point
        return n - lane + (key & (BLOCK - 1)), run, last != 0

    @triton.jit
    def _backward(x_ptr, grad_out_ptr, grad_table_ptr, res_ptr, offset_ptr, N, size, level0, L: tl.constexpr,
                  BLOCK: tl.constexpr, AGGREGATE: tl.constexpr):
        level = level0 + tl.program_id(1)
        n = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        res = tl.load(res_ptr + level)
        offset = tl.load(offset_ptr + level)
        dense = (res + 1) * (res + 1) * (res + 1) <= size
        if AGGREGATE:
            n, run, last = _sort_by_cell(x_ptr, n, N, res, BLOCK)
        mask = n < N
        bx, by, bz, fx, fy, fz = _base(x_ptr, n, mask, res)
        g0 = tl.load(grad_out_ptr + n * (2 * L) + level * 2, mask=mask, other=0.0)
        g1 = tl.load(grad_out_ptr + n * (2 * L) + level * 2 + 1, mask=mask, other=0.0)
        for c in tl.static_range(8):
            index, w = _corner(bx, by, bz, fx, fy, fz, res, dense, size, c)
            row = (index + offset) * 2
            v0, v1, write = w * g0, w * g1, mask
            if AGGREGATE:  # a cell's points share its corners: sum each run, add once from its last point
                _, v0, v1 = tl.associative_scan((run, v0, v1), 0, _run_sum)
                write = mask & last
            tl.atomic_add(grad_table_ptr + row, v0, mask=write, sem="relaxed")
            tl.atomic_add(grad_table_ptr + row + 1, v1, mask=write, sem="relaxed")


def backward_into(grad_table: torch.Tensor, x: torch.Tensor, grad_out: torch.Tensor, resolutions: torch.Tensor,
                  offsets: torch.Tensor, size: int, levels: range, aggregate: bool = True) -> None:
    """Adds the table gradient of `levels` (consecutive) into grad_table (rows, 2) float32. x: (N, 3) float32,
    grad_out: (N, 2 L) float32, both contiguous. aggregate=False adds point by point (the plain scatter, kept
    for bench/hash_backward.py to compare against)."""
    grid = (triton.cdiv(x.shape[0], BLOCK), len(levels))
    _backward[grid](x, grad_out, grad_table, resolutions, offsets, x.shape[0], size, levels.start,
                    L=resolutions.shape[0], BLOCK=BLOCK, AGGREGATE=aggregate)


class _HashEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, table: torch.Tensor, resolutions: torch.Tensor, offsets: torch.Tensor,
                size: int) -> torch.Tensor:  # noqa: ANN001
        x = x.float().contiguous()
        N, L = x.shape[0], resolutions.shape[0]
        out = torch.empty(N, 2 * L, device=x.device, dtype=torch.float32)
        grid = (triton.cdiv(N, BLOCK), L)
        _forward[grid](x, table.contiguous(), resolutions, offsets, out, N, size, L=L, BLOCK=BLOCK)
        ctx.save_for_backward(x, resolutions, offsets)
        ctx.size, ctx.table_shape = size, table.shape
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # noqa: ANN001, ANN205
        x, resolutions, offsets = ctx.saved_tensors
        grad_table = torch.zeros(ctx.table_shape, device=x.device, dtype=torch.float32)
        L = resolutions.shape[0]
        backward_into(grad_table, x, grad_out.float().contiguous(), resolutions, offsets, ctx.size, range(L))
        return None, grad_table, None, None, None


def hash_encode(x: torch.Tensor, table: torch.Tensor, resolutions: torch.Tensor, offsets: torch.Tensor,
                size: int) -> torch.Tensor:
    """x: (N, 3) in [0, 1]^3; table: (sum of level sizes, 2) float32 (float16 for inference: read as is, summed
    in float32). Returns (N, 2 L) float32, level-major."""
    if x.shape[0] == 0:
        return x.new_zeros(0, 2 * resolutions.shape[0]) + table.sum() * 0  # keeps the graph for backward
    return _HashEncode.apply(x, table, resolutions, offsets, size)
