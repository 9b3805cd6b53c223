"""How far a synthetic preset's pixels are from the same pixels box-filtered: each val view rendered as the preset
renders it against a `--samples` x `--samples` grid of rays per pixel averaged in linear light (as a sensor
integrates), both through the camera response and 8-bit rounding, PSNR over the right halves that validation
scores. A pixel-centre preset (`pixel_samples` 1) puts this aliasing into its ground truth: the number estimates
what a model that resolves only pixel-scale detail can score on it (not a bound: many views could resolve finer).

    python bench/aliasing.py --preset oblique --samples 5
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_results  # noqa: E402

from mega_nerf.synthetic import PRESETS  # noqa: E402
from mega_nerf.synthetic.generate import plan_scene, render_pixels  # noqa: E402
from mega_nerf.synthetic.shading import camera_response  # noqa: E402


def pixels(linear: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    """Linear colours as the stored 8-bit image's values, in [0, 1]."""
    return camera_response(linear, gain).mul(255).round() / 255


def psnr(mse: float) -> float:
    """PSNR in dB of a mean squared error of values in [0, 1]; inf when they agree."""
    return math.inf if mse == 0 else -10 * math.log10(mse)


def odd(value: str) -> int:
    """--samples: an odd count, so that the grid holds the pixel's centre."""
    samples = int(value)
    if samples < 1 or samples % 2 == 0:
        raise argparse.ArgumentTypeError(f"must be odd and positive, not {value}")
    return samples


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="oblique", choices=list(PRESETS))
    p.add_argument("--samples", type=odd, default=5, help="rays per pixel along each axis of the box filter (odd)")
    p.add_argument("--views", type=int, default=None, help="only the first this many val views (at least 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    args = p.parse_args()
    preset, device = PRESETS[args.preset], torch.device(args.device)
    city, survey, origin, scale = plan_scene(preset, args.seed)
    city = city.to(device)
    views = [i for i, split in enumerate(survey.splits) if split == "val"][:args.views]
    if not views:
        p.error("no val views to measure (--views)")
    gains = survey.gains(device)
    errors = []
    for i in tqdm(views, desc="views", unit="view"):
        as_rendered = render_pixels(city, preset, survey, origin, scale, [i], preset.pixel_samples, device)[0]
        box = render_pixels(city, preset, survey, origin, scale, [i], args.samples, device)[0]
        diff = (pixels(as_rendered, gains[i]) - pixels(box, gains[i])).view(preset.H, preset.W, 3)
        errors.append(diff[:, preset.W // 2:].square().mean().item())
    worst, best = psnr(max(errors)), psnr(min(errors))
    line = (f"{args.preset} (pixel_samples {preset.pixel_samples}) against a {args.samples}x{args.samples} box filter, "
            f"{len(views)} val views' right halves: {psnr(float(np.mean(errors))):.2f} dB "
            f"(views {worst:.2f} to {best:.2f})")
    append_results(args.results, f"Aliasing of the {args.preset} preset", "python " + " ".join(sys.argv), line)


if __name__ == "__main__":
    main()
