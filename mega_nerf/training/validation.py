"""Validation renders during training: a few val images rendered whole, PSNR on their scored halves inside the cell.

Val images are trained on their left halves only (`ImageMetadata.scored_columns_for`), so the right half is unseen;
under the strict protocol no pixel of them is trained, and each is scored whole.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mega_nerf.data.chunks import cell_mask
from mega_nerf.data.dataset import MEGA_NERF, ImageMetadata
from mega_nerf.fields.base import Field
from mega_nerf.imaging import colorize_depth, render_image, to_uint8
from mega_nerf.io import write_png
from mega_nerf.rays import SceneBounds
from mega_nerf.render import RenderConfig

CHUNK = 8192  # rays rendered at once: small, so validation adds little to the training run's peak memory


@torch.no_grad()
def validate(field: Field, images: list[ImageMetadata], mask_dir: Path | None, bounds: SceneBounds,
             render: RenderConfig, output: Path, step: int, protocol: str = MEGA_NERF,
             appearances: list[int] | None = None) -> dict[str, float]:
    """Render `images` (val images) whole through `field`, with `appearances` (None: each image's own index);
    write gt | render | depth PNGs to `output`; return the PSNR over their scored parts under `protocol` inside
    the cell of `mask_dir` (the whole cell without one), or {} when no image holds a pixel of the cell."""
    field.eval()
    errors, count = 0.0, 0
    for i, meta in enumerate(images):
        appearance = meta.index if appearances is None else appearances[i]
        out = render_image(field, meta.c2w, meta.intrinsics, meta.W, meta.H, appearance, bounds, render, CHUNK)
        pred = out["rgb"].cpu()
        gt = meta.load_rgb().float() / 255
        scored = cell_mask(meta, mask_dir) & meta.scored_mask(protocol)
        errors += ((pred - gt) ** 2)[scored].sum().item()
        count += int(scored.sum()) * 3
        panel = np.concatenate([to_uint8(gt), to_uint8(pred), colorize_depth(out["depth"], out["opacity"])], 1)
        write_png(output / f"{step:08d}_{meta.name}.png", panel)
    field.train()
    return {"val_psnr": -10 * np.log10(max(errors / count, 1e-10))} if count else {}
