"""A Triton kernel that writes out what the exact partition kernel computes for each pixel before its cells: the
ray and its bounds (partition.exact_kernel._pixel_rays_bounds), for tests/test_gpu.py to compare with
partition.pixels bit for bit. Imported only where Triton and a GPU are."""
import torch
import triton
import triton.language as tl

from mega_nerf.partition.exact_kernel import _pixel_rays_bounds
from mega_nerf.partition.pixels import CAMERA_FLOATS


@triton.jit
def _probe(cam_ptr, image, W, first, n_rays, near, far, top, ground, box_ptr, out_ptr, CAMERA: tl.constexpr,
           PLACE: tl.constexpr, BLOCK: tl.constexpr):
    ray = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = ray < n_rays
    ox, oy, oz, dx, dy, dz, near_t, split_t, far_t = _pixel_rays_bounds(cam_ptr, image, W, first, ray, near, far,
                                                                        top, ground, box_ptr, CAMERA, PLACE, BLOCK)
    tl.store(out_ptr + ray * 9 + 0, ox, mask=live)
    tl.store(out_ptr + ray * 9 + 1, oy, mask=live)
    tl.store(out_ptr + ray * 9 + 2, oz, mask=live)
    tl.store(out_ptr + ray * 9 + 3, dx, mask=live)
    tl.store(out_ptr + ray * 9 + 4, dy, mask=live)
    tl.store(out_ptr + ray * 9 + 5, dz, mask=live)
    tl.store(out_ptr + ray * 9 + 6, near_t, mask=live)
    tl.store(out_ptr + ray * 9 + 7, split_t, mask=live)
    tl.store(out_ptr + ray * 9 + 8, far_t, mask=live)


def kernel_rays_bounds(cameras: torch.Tensor, image: int, W: int, first: int, last: int, near: float, far: float,
                       altitude_range: tuple[float, float], box_corners: torch.Tensor | None) -> torch.Tensor:
    """(N, 9) float32: origin, direction, near, split and far of pixels first .. last - 1 as the kernel makes them
    (box_corners: box_min then box_max, (6,); None: no box)."""
    n, block = last - first, 128
    out = torch.empty(n, 9, device=cameras.device)
    corners = torch.zeros(6, device=cameras.device) if box_corners is None else box_corners
    _probe[(triton.cdiv(n, block),)](cameras, image, W, first, n, near, far, *altitude_range, corners, out,
                                     CAMERA=CAMERA_FLOATS, PLACE=box_corners is not None, BLOCK=block,
                                     enable_fp_fusion=False)
    return out
