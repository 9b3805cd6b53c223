"""Where a trained cell puts its density, judged by a synthetic scene's true depth maps: the val views rendered by
one checkpoint (its own scene bounds and render settings, as evaluation renders them), the opacity over the pixels
that truly see the sky and over those that see a surface, and the sky's median rendered depth (of its pixels over
half opaque, depth / opacity: where their density sits). With `--cluster_mask_path` only the cell's pixels count.
A field that paints the sky with fog in front of the cameras (the sky's pixels opaque at a short depth), or leaves
surfaces transparent for the background to paint, can render its training views well and other views wrong.

    python bench/opacity.py --dataset_path DATA --checkpoint EXP/checkpoints/00002000.pt [--cluster_mask_path M/0]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm import tqdm

from mega_nerf.data.chunks import cell_mask
from mega_nerf.data.dataset import dataset_fingerprint, load_dataset
from mega_nerf.errors import UserError, run_cli
from mega_nerf.fields import build_field
from mega_nerf.imaging import render_image
from mega_nerf.rays import SceneBounds
from mega_nerf.render import RenderConfig, default_chunk
from mega_nerf.synthetic.surface import depth_map
from mega_nerf.training.checkpoint import load_checkpoint


def opacity_by_truth(dataset_path: Path, checkpoint: Path, mask_dir: Path | None, device: torch.device
                     ) -> dict[str, float]:
    """Over the val views' pixels (the cell's only, with `mask_dir`): the true sky's and the true surfaces' mean
    opacity and share over 1/2, the sky's median depth where over 1/2 opaque (normalised units), and the scene's
    metres per unit."""
    summary_path = dataset_path / "scene.json"
    if not summary_path.is_file():
        raise UserError(f"{dataset_path}: not a synthetic scene (no scene.json): its depth maps tell sky from surface")
    state = load_checkpoint(checkpoint, device)
    dataset = load_dataset(dataset_path)
    if state["dataset"] != dataset_fingerprint(dataset):
        raise UserError(f"{checkpoint}: trained on another dataset than {dataset_path}")
    field = build_field(state["field_config"]).to(device)
    field.load_state_dict(state["model"])
    field.eval()
    scene = state["scene"]
    altitude = tuple(scene["altitude_range"]) if scene["altitude_range"] else None
    bounds = SceneBounds(scene["near"], scene["far"], altitude)
    render = state["render"]
    config = RenderConfig(render["samples"], render["fine_samples"], perturb=False, bg_samples=render["bg_samples"])
    sky, surface, sky_depth = [], [], []
    with torch.no_grad():
        for m in tqdm(dataset.val, desc="val views", unit="view"):
            out = render_image(field, m.c2w, m.intrinsics, m.W, m.H, dataset.appearance_for(m, state["eval_protocol"]),
                               bounds, config, default_chunk(device))
            counted = cell_mask(m, mask_dir).reshape(-1).to(device)
            open_sky = torch.isinf(depth_map(dataset_path, m)).to(device)
            opacity, depth = out["opacity"].reshape(-1), out["depth"].reshape(-1)
            sky.append(opacity[open_sky & counted])
            surface.append(opacity[~open_sky & counted])
            opaque_sky = open_sky & counted & (opacity > 0.5)
            sky_depth.append(depth[opaque_sky] / opacity[opaque_sky])
    sky_all, surface_all, depths = torch.cat(sky), torch.cat(surface), torch.cat(sky_depth)
    return {"sky_pixels": sky_all.numel(), "sky_opacity": float(sky_all.mean()),
            "sky_opaque": float((sky_all > 0.5).float().mean()),
            "sky_depth": float(depths.median()) if depths.numel() else float("nan"),
            "surface_pixels": surface_all.numel(), "surface_opacity": float(surface_all.mean()),
            "surface_opaque": float((surface_all > 0.5).float().mean()),
            "metres_per_unit": float(json.loads(summary_path.read_text())["pose_scale_factor"])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset_path", type=Path, required=True, help="a synthetic scene written with depth maps")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--cluster_mask_path", type=Path, help="count only this cell's pixels")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    r = opacity_by_truth(args.dataset_path, args.checkpoint, args.cluster_mask_path, device)
    print(f"{args.checkpoint}: sky ({r['sky_pixels']:,} pixels) opacity {r['sky_opacity']:.3f}, "
          f"{r['sky_opaque']:.1%} over 1/2, median depth {r['sky_depth']:.3f} "
          f"({r['sky_depth'] * r['metres_per_unit']:.1f} m); surfaces ({r['surface_pixels']:,} pixels) opacity "
          f"{r['surface_opacity']:.3f}, {r['surface_opaque']:.1%} over 1/2")


if __name__ == "__main__":
    run_cli(main)
