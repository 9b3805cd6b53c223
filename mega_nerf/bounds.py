"""The foreground box: the part of the normalised world the fields represent.

Horizontally it spans where the cameras look (where their image corners and centres meet the ground, or reach
`far`) and the cameras themselves; vertically the altitude slab when one is given, else the same points.
Every submodule of a scene shares this box, so the merged container sees one consistent world.
"""
from __future__ import annotations

import torch

from mega_nerf.rays import Cameras, SceneBounds, rays_from_pixels


def scene_box(cameras: Cameras, bounds: SceneBounds, margin: float = 0.05
              ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(box_min (3,), box_max (3,), mean ray segment length) from every image's corner and centre rays."""
    W, H = cameras.width.float(), cameras.height.float()
    cols = torch.stack([torch.zeros_like(W), W - 1, torch.zeros_like(W), W - 1, (W - 1) / 2], 1)
    rows = torch.stack([torch.zeros_like(H), torch.zeros_like(H), H - 1, H - 1, (H - 1) / 2], 1)
    c2w = cameras.c2w.repeat_interleave(5, 0)
    origins, dirs = rays_from_pixels(c2w, cameras.intrinsics.repeat_interleave(5, 0), cols.flatten(), rows.flatten())
    n, f = bounds.clip(origins, dirs)
    altitude_range = bounds.altitude
    points = torch.cat([origins + dirs * f[:, None], cameras.c2w[:, :, 3]])
    lo, hi = points.min(0).values, points.max(0).values
    if altitude_range is not None:
        lo[0], hi[0] = altitude_range
    pad = (hi - lo).max() * margin
    return lo - pad, hi + pad, float((f - n).mean())
