"""Rendering speed of a merged container: rays/s and ms per 1920x1080 frame (a val camera's pose with its
intrinsics scaled to that size), plus peak GPU memory.

    python bench/render_speed.py --container_path merged.pt --dataset_path D [--frames 3] [--chunk 262144]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_results  # noqa: E402

from mega_nerf.container import load_container  # noqa: E402
from mega_nerf.data.dataset import load_dataset  # noqa: E402
from mega_nerf.rays import image_rays, near_far  # noqa: E402
from mega_nerf.render import render_in_chunks  # noqa: E402

W, H = 1920, 1080


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--container_path", type=Path, required=True)
    p.add_argument("--dataset_path", type=Path, required=True)
    p.add_argument("--frames", type=int, default=3)
    p.add_argument("--chunk", type=int, default=262144)
    p.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    field, info = load_container(args.container_path, device)
    meta = load_dataset(args.dataset_path).val[0]
    scale = W / meta.W
    intrinsics = meta.intrinsics.clone() * torch.tensor([scale, scale, scale, H / meta.H])
    origins, dirs = image_rays(meta.c2w.to(device), intrinsics.to(device), W, H)
    near, far = near_far(origins, dirs, info.near, info.far, info.altitude_range)
    app = torch.full((W * H,), meta.index, device=device)
    config = info.render
    render_in_chunks(field, origins, dirs, near, far, app, config, args.chunk)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.frames):
        out = render_in_chunks(field, origins, dirs, near, far, app, config, args.chunk)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.frames
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else 0.0
    table = ("| cells | frame | ms/frame | rays/s | peak GiB | mean opacity |\n|---|---|---|---|---|---|\n"
             f"| {len(info.cells)} | {W}x{H} | {seconds * 1e3:.0f} | {W * H / seconds:,.0f} | {peak:.1f} | "
             f"{out['opacity'].mean().item():.3f} |")
    append_results(args.results, "Render speed, merged container", "python " + " ".join(sys.argv), table)


if __name__ == "__main__":
    main()
