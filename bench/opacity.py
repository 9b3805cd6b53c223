"""Where a trained cell puts its density, judged by a synthetic scene's true depth maps: the val views rendered by
one checkpoint, the opacity over the pixels that truly see the sky and over those that see a surface, and the
median rendered depth of the sky pixels. A field that paints the sky with fog in front of the cameras (the sky
pixels opaque at a short depth), or leaves surfaces transparent for the background to paint, renders its training
views well and other views wrong.

    python bench/opacity.py --dataset_path DATA --checkpoint EXP/checkpoints/00002000.pt
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mega_nerf.data.dataset import load_dataset
from mega_nerf.errors import UserError, run_cli
from mega_nerf.fields import build_field
from mega_nerf.imaging import render_image
from mega_nerf.rays import SceneBounds
from mega_nerf.render import RenderConfig, default_chunk
from mega_nerf.training.checkpoint import load_checkpoint


def opacity_by_truth(dataset_path: Path, checkpoint: Path, device: torch.device) -> dict[str, float]:
    """Mean opacity and share over 1/2 of the true sky's and the true surfaces' pixels (val views, whole images),
    and the sky pixels' median rendered depth (normalised units) and the scene's scale (metres per unit)."""
    summary_path = dataset_path / "scene.json"
    if not summary_path.is_file():
        raise UserError(f"{dataset_path}: not a synthetic scene (no scene.json): its depth maps tell sky from surface")
    summary = json.loads(summary_path.read_text())
    state = load_checkpoint(checkpoint, device)
    field = build_field(state["field_config"]).to(device)
    field.load_state_dict(state["model"])
    field.eval()
    dataset = load_dataset(dataset_path)
    bounds = SceneBounds.from_real(1.0, None, summary["ray_altitude_range"], dataset.coordinates)
    render = state["render"]
    config = RenderConfig(render["samples"], render["fine_samples"], perturb=False, bg_samples=render["bg_samples"])
    sky, surface, sky_depth = [], [], []
    with torch.no_grad():
        for m in tqdm(dataset.val, desc="val views", unit="view"):
            out = render_image(field, m.c2w, m.intrinsics, m.W, m.H, dataset.appearance_for(m, state["eval_protocol"]),
                               bounds, config, default_chunk(device))
            truth = torch.from_numpy(np.load(dataset_path / "depth" / "val" / f"{m.name}.npy")).to(device)
            open_sky = torch.isinf(truth)
            sky.append(out["opacity"][open_sky])
            surface.append(out["opacity"][~open_sky])
            sky_depth.append(out["depth"][open_sky])
    sky_all, surface_all = torch.cat(sky), torch.cat(surface)
    return {"sky_pixels": sky_all.numel(), "sky_opacity": float(sky_all.mean()),
            "sky_opaque": float((sky_all > 0.5).float().mean()), "sky_depth": float(torch.cat(sky_depth).median()),
            "surface_opacity": float(surface_all.mean()), "surface_opaque": float((surface_all > 0.5).float().mean()),
            "metres_per_unit": float(summary["pose_scale_factor"])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset_path", type=Path, required=True, help="a synthetic scene written with depth maps")
    p.add_argument("--checkpoint", type=Path, required=True)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    r = opacity_by_truth(args.dataset_path, args.checkpoint, device)
    print(f"{args.checkpoint}: sky ({r['sky_pixels']:,} pixels) opacity {r['sky_opacity']:.3f}, "
          f"{r['sky_opaque']:.1%} over 1/2, median depth {r['sky_depth']:.3f} "
          f"({r['sky_depth'] * r['metres_per_unit']:.1f} m); surfaces opacity {r['surface_opacity']:.3f}, "
          f"{r['surface_opaque']:.1%} over 1/2", file=sys.stdout)


if __name__ == "__main__":
    run_cli(main)
