"""Does the merged container lose to its submodules inside their own cells, and does it show seams?

Trains every cell of a partition for the same number of steps, merges them, and for each cell k scores the val
images' right halves (never trained on) inside cell k's mask twice: rendered by submodule k alone and by the
container. Writes one val image rendered by the container, with the cell borders drawn, to look for seams.

    python bench/merge_quality.py --preset oblique --steps 2000 --pictures out/
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_results, cell_args, ensure_city, ensure_partition  # noqa: E402

from mega_nerf.cli.train import config_from_argv  # noqa: E402
from mega_nerf.data.chunks import cell_mask  # noqa: E402
from mega_nerf.merging.container import load_container  # noqa: E402
from mega_nerf.merging.merge import merge_submodules  # noqa: E402
from mega_nerf.rays import image_rays  # noqa: E402
from mega_nerf.render import render_in_chunks  # noqa: E402
from mega_nerf.training.trainer import Trainer  # noqa: E402


def render(field: torch.nn.Module, trainer: Trainer, meta, render_config) -> torch.Tensor:  # noqa: ANN001
    device = trainer.device
    origins, dirs = image_rays(meta.c2w.to(device), meta.intrinsics.to(device), meta.W, meta.H)
    near, far = trainer.bounds.clip(origins, dirs)
    app = torch.full((origins.shape[0],), meta.index, device=device)
    out = render_in_chunks(field, origins, dirs, near, far, app, render_config, chunk=1 << 18)
    return out["rgb"].view(meta.H, meta.W, 3).cpu()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="oblique")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--grid_dim", type=int, nargs=2, default=[2, 2])
    p.add_argument("--work", type=Path, default=Path("bench-work"))
    p.add_argument("--pictures", type=Path, default=None, help="folder for the seam picture")
    p.add_argument("--extra", default="",
                   help="further training options as one argument with '=' (--extra=\"--batch_size 16384\"): "
                        "after a space argparse takes an option for one of this script's")
    p.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    args = p.parse_args()
    dataset = ensure_city(args.preset, args.work)
    masks = ensure_partition(dataset, args.work, tuple(args.grid_dim))
    cells = args.grid_dim[0] * args.grid_dim[1]
    trainers = []
    for k in range(cells):
        trainer = Trainer(config_from_argv([
            *cell_args(dataset, masks, args.work, k, f"merge-exp-{k}"), "--train_iterations", str(args.steps),
            "--ckpt_interval", str(args.steps), "--val_interval", str(10 * args.steps), *args.extra.split()]))
        trainer.run()
        trainers.append(trainer)
        print(f"cell {k} trained", flush=True)
    merged = args.work / "merged.pt"
    merge_submodules(f"{args.work}/merge-exp-", masks / "params.pt", merged, False, 1.15)
    container, info = load_container(merged, trainers[0].device)
    config = dataclasses.replace(trainers[0].render_config, perturb=False)
    errors = np.zeros((cells, 2))
    counts = np.zeros(cells)
    with torch.no_grad():
        for meta in trainers[0].dataset.val:
            whole = render(container, trainers[0], meta, config)
            gt = meta.load_rgb().float() / 255
            for k, trainer in enumerate(trainers):
                mask = cell_mask(meta, trainer.mask_dir).clone()
                mask[:, : meta.W // 2] = False
                if not mask.any():
                    continue
                trainer.field.eval()
                alone = render(trainer.field, trainer, meta, config)
                errors[k] += [((alone - gt) ** 2)[mask].sum().item(), ((whole - gt) ** 2)[mask].sum().item()]
                counts[k] += 3 * int(mask.sum())
            if args.pictures is not None and meta is trainers[0].dataset.val[len(trainers[0].dataset.val) // 2]:
                picture = (whole.clamp(0, 1).numpy() * 255).astype(np.uint8)[:, :, ::-1].copy()
                args.pictures.mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(args.pictures / f"merged_{args.preset}_{meta.name}.png"),
                            np.concatenate([picture, (gt.numpy() * 255).astype(np.uint8)[:, :, ::-1]], 1))
    rows = ["| cell | val right-half pixels in cell | submodule alone | container | container - alone |",
            "|---|---|---|---|---|"]
    for k in range(cells):
        alone, whole = (-10 * math.log10(e / counts[k]) for e in errors[k])
        rows.append(f"| {k} | {int(counts[k] / 3):,} | {alone:.2f} dB | {whole:.2f} dB | {whole - alone:+.2f} dB |")
    append_results(args.results, f"Merged container against its submodules, {args.preset} preset, "
                   f"{args.steps} steps per cell", "python " + " ".join(sys.argv), "\n".join(rows))


if __name__ == "__main__":
    main()
