"""Rendering speed of a merged container: rays/s and ms per 1920x1080 frame (a val camera's pose with its
intrinsics scaled to that size; making and clipping its rays included, as imaging.render_image does), samples
shaded per ray, and peak GPU memory; with --profile, the operations that took the GPU's time in one more frame
(torch.profiler).

    python bench/render_speed.py --container_path merged.pt --dataset_path D [--frames 3] [--chunk 262144]
        [--segment 32] [--profile]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_results, profiled  # noqa: E402

from mega_nerf.data.dataset import load_dataset  # noqa: E402
from mega_nerf.imaging import render_image  # noqa: E402
from mega_nerf.merging.container import load_container  # noqa: E402
from mega_nerf.rays import image_rays  # noqa: E402
from mega_nerf.render import occupancy_along, uniform_samples  # noqa: E402

W, H = 1920, 1080


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--container_path", type=Path, required=True)
    p.add_argument("--dataset_path", type=Path, required=True)
    p.add_argument("--frames", type=int, default=3)
    p.add_argument("--chunk", type=int, default=262144)
    p.add_argument("--segment", type=int, default=32, help="samples per ray per pass of early termination")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    field, info = load_container(args.container_path, device)
    meta = load_dataset(args.dataset_path).val[0]
    scale = W / meta.W
    intrinsics = meta.intrinsics.clone() * torch.tensor([scale, scale, scale, H / meta.H])

    def frame() -> dict[str, torch.Tensor]:
        return render_image(field, meta.c2w, intrinsics, W, H, meta.index, info.bounds, info.render, args.chunk,
                            args.segment)

    frame()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.frames):
        out = frame()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.frames
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else 0.0
    table = ("| cells | frame | chunk | segment | ms/frame | rays/s | samples/ray | peak GiB | mean opacity |\n"
             "|---|---|---|---|---|---|---|---|---|\n"
             f"| {len(info.cells)} | {W}x{H} | {args.chunk} | {args.segment} | {seconds * 1e3:.0f} | "
             f"{W * H / seconds:,.0f} | {int(out['samples']) / (W * H):.1f} | {peak:.1f} | "
             f"{out['opacity'].mean().item():.3f} |")
    append_results(args.results, "Render speed, merged container", "python " + " ".join(sys.argv), table)
    if args.profile and device.type == "cuda":
        prof, wall, busy = profiled(frame, record_shapes=True)
        print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=30))
        print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_device_time_total", row_limit=20))
        print(f"profiled frame: GPU busy {busy * 1e3:.0f} ms of {wall * 1e3:.0f} ms wall (profiler overhead included)")
        origins, dirs = image_rays(meta.c2w.to(device), intrinsics.to(device), W, H)
        near, far = info.bounds.clip(origins, dirs)
        start = time.perf_counter()
        for s in range(0, W * H, args.chunk):
            sl = slice(s, s + args.chunk)
            t = uniform_samples(near[sl], far[sl], info.render.samples, perturb=False)[0]
            occupancy_along(field, origins[sl], dirs[sl], t)
        torch.cuda.synchronize()
        lookups = time.perf_counter() - start
        print(f"occupancy lookups alone (every uniform sample of the frame): {lookups * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
