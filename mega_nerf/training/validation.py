"""Validation renders during training: a few val images rendered whole, PSNR on the right half inside the cell.

Val images are trained on their left halves only (docs/DESIGN.md), so the right half is unseen.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import cv2
import numpy as np
import torch

from mega_nerf.data.chunks import cell_mask
from mega_nerf.data.dataset import ImageMetadata
from mega_nerf.fields.base import Field
from mega_nerf.rays import SceneBounds, image_rays
from mega_nerf.render import RenderConfig, render_in_chunks


def colorize_depth(depth: torch.Tensor, opacity: torch.Tensor) -> np.ndarray:
    """(H, W) depth -> (H, W, 3) uint8 RGB, near bright, normalised over the opaque pixels' range."""
    d = depth.float().cpu().numpy()
    solid = opacity.cpu().numpy() > 0.5
    lo, hi = (np.percentile(d[solid], [1, 99]) if solid.any() else (0.0, 1.0))
    scaled = 1 - np.clip((d - lo) / max(hi - lo, 1e-8), 0, 1)
    img = cv2.applyColorMap((scaled * 255).astype(np.uint8), cv2.COLORMAP_TURBO)
    img[~solid] = 0
    return img[:, :, ::-1].copy()


def to_uint8(rgb: torch.Tensor) -> np.ndarray:
    return (rgb.clamp(0, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8)


def write_rgb(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.ascontiguousarray(rgb[:, :, ::-1]))


@torch.no_grad()
def validate(field: Field, images: list[ImageMetadata], mask_dir: Path | None, bounds: SceneBounds,
             render: RenderConfig, output: Path, step: int) -> dict[str, float]:
    """Render `images` (val images) whole through `field`; write gt | render | depth PNGs to `output`; return the
    PSNR over their right halves inside the cell of `mask_dir` (the whole image without one), or {} when no
    image holds a pixel of the cell."""
    device = next(field.parameters()).device
    config = dataclasses.replace(render, perturb=False)
    field.eval()
    errors, count = 0.0, 0
    for meta in images:
        mask = cell_mask(meta, mask_dir)
        origins, dirs = image_rays(meta.c2w.to(device), meta.intrinsics.to(device), meta.W, meta.H)
        near, far = bounds.clip(origins, dirs)
        app = torch.full((origins.shape[0],), meta.index, device=device)
        out = render_in_chunks(field, origins, dirs, near, far, app, config)
        pred = out["rgb"].view(meta.H, meta.W, 3).cpu()
        gt = meta.load_rgb().float() / 255
        right = mask.clone()
        right[:, : meta.W // 2] = False
        errors += ((pred - gt) ** 2)[right].sum().item()
        count += int(right.sum()) * 3
        depth = colorize_depth(out["depth"].view(meta.H, meta.W), out["opacity"].view(meta.H, meta.W))
        panel = np.concatenate([to_uint8(gt), to_uint8(pred), depth], 1)
        write_rgb(output / f"{step:08d}_{meta.name}.png", panel)
    field.train()
    return {"val_psnr": -10 * np.log10(max(errors / count, 1e-10))} if count else {}
