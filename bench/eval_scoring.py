"""Where eval's scoring time goes, one image size at a time: the first call of each metric against the later ones.

On an H200 rank 0's scoring took 11.6 s whether it scored 45 `city` val images or 23 (bench/RESULTS.md, eighth
session): a one-time cost. This times each part of `evaluation.metrics.image_metrics` apart, on random images of
the size eval scores (the right half of a val image at --val_scale_factor), in a fresh process so that imports
and first calls count as they do in eval. Eval's scoring clock also holds decoding each ground truth and its copy to
the device, and runs on two threads beside the renders; neither is timed here:

    python bench/eval_scoring.py --height 120 --width 80 --images 8 [--lpips_weights_dir D]
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch

from mega_nerf.errors import run_cli


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds `fn` takes, the device synchronised before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--height", type=int, default=120)
    p.add_argument("--width", type=int, default=80, help="the scored part's width (a right half)")
    p.add_argument("--images", type=int, default=8, help="later calls timed after the first")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--lpips_weights_dir", type=Path, default=None, help="as eval.py's (default: its default)")
    args = p.parse_args()
    device = torch.device(args.device)
    start = time.perf_counter()
    from mega_nerf.evaluation.lpips import load_lpips_nets
    from mega_nerf.evaluation.metrics import psnr, ssim
    rows = [("import metrics", time.perf_counter() - start)]
    generator = torch.Generator(device=device).manual_seed(0)
    pairs = [(torch.rand(args.height, args.width, 3, device=device, generator=generator),
              torch.rand(args.height, args.width, 3, device=device, generator=generator))
             for _ in range(args.images + 1)]
    nets = {}
    load = timed(lambda: nets.update(load_lpips_nets(args.lpips_weights_dir, device)), device)
    rows.append(("load LPIPS nets", load))
    metrics: dict[str, Callable[[torch.Tensor, torch.Tensor], object]] = {"psnr": psnr, "ssim": ssim}
    metrics.update({f"lpips_{name}": model for name, model in nets.items() if model is not None})
    for name, metric in metrics.items():
        first = timed(lambda metric=metric: metric(*pairs[0]), device)
        later = sum(timed(lambda pair=pair, metric=metric: metric(*pair), device) for pair in pairs[1:])
        rows.append((f"{name}: first call", first))
        rows.append((f"{name}: each later call", later / args.images))
    print(f"{device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), images "
          f"{args.height}x{args.width}; LPIPS: {', '.join(n for n, m in nets.items() if m is not None) or 'none'}")
    for label, seconds in rows:
        print(f"{label:<28} {seconds * 1000:10.1f} ms")


if __name__ == "__main__":
    run_cli(main)
