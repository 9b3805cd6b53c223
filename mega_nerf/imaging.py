"""Whole images: render one through a field, and turn renders into pictures (uint8 RGB, colour-mapped depth).

Validation, evaluation, camera paths and the benchmarks render a view the same way (`render_image`): every
pixel's ray in row-major order (rays.image_rays), clipped to the scene bounds (rays.SceneBounds), one appearance
index for all, rendered with the trained render settings but no jitter, a fixed number of rays at a time
(render.render_in_chunks), so a view renders the same whichever stage or process asks for it.
"""
from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import torch

from mega_nerf.fields.base import Field
from mega_nerf.rays import SceneBounds, image_rays
from mega_nerf.render import RenderConfig, render_in_chunks


@torch.no_grad()
def render_clipped(field: Field, origins: torch.Tensor, dirs: torch.Tensor, appearance: torch.Tensor,
                   bounds: SceneBounds, config: RenderConfig, chunk: int, segment: int = 32
                   ) -> dict[str, torch.Tensor]:
    """Inference on rays origins (R, 3), dirs (R, 3) with appearance indices (R,), on the field's device:
    clipped to `bounds`, rendered with the trained `config` (bg_samples included) without jitter, `chunk` rays at
    a time (`segment`: samples per ray per early-termination pass). Returns rgb (R, 3), depth (R,), opacity (R,)
    and samples (0-d: samples shaded)."""
    near, far = bounds.clip(origins, dirs)
    return render_in_chunks(field, origins, dirs, near, far, appearance, dataclasses.replace(config, perturb=False),
                            chunk, segment)


def render_image(field: Field, c2w: torch.Tensor, intrinsics: torch.Tensor, W: int, H: int, appearance: int,
                 bounds: SceneBounds, config: RenderConfig, chunk: int, segment: int = 32
                 ) -> dict[str, torch.Tensor]:
    """One whole W x H view through `field` (`render_clipped`). c2w: (3, 4); intrinsics: (4,) fx, fy, cx, cy;
    appearance: the image index whose embedding every pixel uses. Returns, on the field's device (that of its
    parameters; the CPU for a field without any), rgb (H, W, 3), depth (H, W), opacity (H, W) and samples (0-d)."""
    weight = next(field.parameters(), None)
    device = torch.device("cpu") if weight is None else weight.device
    origins, dirs = image_rays(c2w.to(device), intrinsics.to(device), W, H)
    index = torch.full((W * H,), appearance, device=device)
    out = render_clipped(field, origins, dirs, index, bounds, config, chunk, segment)
    return {"rgb": out["rgb"].view(H, W, 3), "depth": out["depth"].view(H, W),
            "opacity": out["opacity"].view(H, W), "samples": out["samples"]}


def to_uint8(rgb: torch.Tensor) -> np.ndarray:
    """(H, W, 3) float RGB in [0, 1] (clamped) -> (H, W, 3) uint8, rounded to nearest."""
    return (rgb.clamp(0, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8)


def colorize_depth(depth: torch.Tensor, opacity: torch.Tensor) -> np.ndarray:
    """(H, W) depth -> (H, W, 3) uint8 RGB, near bright, normalised over the opaque pixels' range."""
    d = depth.float().cpu().numpy()
    solid = opacity.cpu().numpy() > 0.5
    lo, hi = (np.percentile(d[solid], [1, 99]) if solid.any() else (0.0, 1.0))
    scaled = 1 - np.clip((d - lo) / max(hi - lo, 1e-8), 0, 1)
    img = cv2.applyColorMap((scaled * 255).astype(np.uint8), cv2.COLORMAP_TURBO)
    img[~solid] = 0
    return img[:, :, ::-1].copy()
