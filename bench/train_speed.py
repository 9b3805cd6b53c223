"""Train the same cell with the `mlp` field (Mega-NeRF's settings) and the `hash` field for equal wall time,
logging val PSNR against training time; print rays/s, samples/s, peak GPU memory, and how long `hash` takes to
reach the PSNR `mlp` ends at.

    python bench/train_speed.py --preset city --minutes 8
    python bench/train_speed.py --fields mlp --history_out mlp.json ...   # one field per call, compared later
    python bench/train_speed.py --fields hash --compare_with mlp.json ...

Val PSNR is measured on a fixed sample of val pixels in the cell, right halves only (never trained on).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_results, cell_args, ensure_city, ensure_partition  # noqa: E402

from mega_nerf.cli.train import config_from_argv
from mega_nerf.data.chunks import cell_mask  # noqa: E402
from mega_nerf.imaging import render_clipped  # noqa: E402
from mega_nerf.training.trainer import Trainer  # noqa: E402

SETTINGS = {  # Mega-NeRF's reference settings for mlp; ours for hash
    # batch 1024; 32 samples beyond the box, the default when bench/data's mlp curves were measured
    "mlp": ["--field", "mlp", "--train_iterations", "500000", "--bg_samples", "32"],
    "hash": ["--field", "hash", "--train_iterations", "20000"],  # the trainer's defaults: batch 32768
}


DENSE_SECONDS = 60  # val PSNR every eval_every seconds up to here (where the curves rise), then 8 times sparser


def val_pixels(trainer: Trainer, count: int, seed: int = 0, trained: bool = False) -> tuple[torch.Tensor, ...]:
    """A fixed sample of the cell's scored val pixels (right halves): image index, pixel index, rgb. With
    `trained`, a sample of the pixels training fits instead (every train image's, val left halves): their PSNR
    beside the val PSNR tells over-fitting from a lack of capacity."""
    images, pixels, colours = [], [], []
    for meta in trainer.dataset.images if trained else trainer.dataset.val:
        cell = cell_mask(meta, trainer.mask_dir)
        mask = cell & meta.trained_mask() if trained else cell & meta.scored_mask()
        idx = mask.flatten().nonzero()[:, 0]
        if trained:  # a few thousand pixels per image keep loading cheap
            idx = idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed))[:4096]]
        images.append(torch.full_like(idx, meta.index))
        pixels.append(idx)
        colours.append(meta.load_rgb().view(-1, 3)[idx])
    image, pixel, rgb = torch.cat(images), torch.cat(pixels), torch.cat(colours)
    pick = torch.from_numpy(np.random.default_rng(seed).permutation(len(image))[:count])
    return image[pick], pixel[pick], rgb[pick].float() / 255


def render_sample(trainer: Trainer, sample: tuple[torch.Tensor, ...], appearance: torch.Tensor | None = None
                  ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sample's pixels rendered as at evaluation (no jitter): render_clipped's output, their true colours
    and their rays (origins, dirs); `appearance` (I,) replaces each image's appearance index when given."""
    image, pixel, rgb = (t.to(trainer.device) for t in sample)
    origins, dirs = trainer.cameras.rays(image, pixel)
    app = image if appearance is None else appearance.to(image.device)[image]
    trainer.field.eval()
    out = render_clipped(trainer.field, origins, dirs, app, trainer.bounds, trainer.render_config, chunk=4096)
    trainer.field.train()
    return out, rgb, origins, dirs


def val_psnr(trainer: Trainer, sample: tuple[torch.Tensor, ...], appearance: torch.Tensor | None = None) -> float:
    """PSNR of the sample's pixels; `appearance` (I,) replaces each image's appearance index when given."""
    out, rgb, _, _ = render_sample(trainer, sample, appearance)
    return -10 * math.log10(torch.mean((out["rgb"] - rgb) ** 2).item())


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_field(field: str, base: list[str], minutes: float, eval_every: float, sample_count: int) -> dict:
    trainer = Trainer(config_from_argv(base))
    t0 = time.perf_counter()
    stream = trainer.prepare_data()
    prep_seconds = time.perf_counter() - t0
    sample = val_pixels(trainer, sample_count)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    history, trained, rays, waits_before, blocked_before = [], 0.0, 0, stream.wait_seconds, stream.waits
    next_eval, steps = 0.0, 0
    shaded = torch.zeros((), dtype=torch.long, device=trainer.device)
    while trained < minutes * 60:
        if trained >= next_eval:
            history.append((trained, val_psnr(trainer, sample)))
            print(f"{field} {trained:.1f} s: val PSNR {history[-1][1]:.2f} dB", flush=True)
            next_eval += eval_every if trained < DENSE_SECONDS else 8 * eval_every
        sync()
        start = time.perf_counter()
        for _ in range(10):
            trainer.train_step(stream)
            shaded += trainer.last_samples
        sync()
        trained += time.perf_counter() - start
        steps += 10
        rays += 10 * trainer.config.batch_size
    history.append((trained, val_psnr(trainer, sample)))
    return {"field": field, "history": history, "rays_per_s": rays / trained,
            "samples_per_s": int(shaded) / trained, "samples_per_ray": int(shaded) / rays, "steps": steps,
            "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else 0.0,
            "data_wait_fraction": (stream.wait_seconds - waits_before) / trained,
            "steps_waiting": (stream.waits - blocked_before) / steps,
            "chunk_prep_seconds": prep_seconds, "batch_size": trainer.config.batch_size}


def time_to_reach(history: list, target: float) -> tuple[float, float] | None:
    """When a PSNR curve first reaches `target`: (linear interpolation between the two evaluations around the
    crossing, time of the first evaluation at or above it); None if never."""
    for (t0, p0), (t1, p1) in zip([(0.0, float("-inf"))] + history[:-1], history, strict=True):
        if p1 >= target:
            return (t1 if p0 == float("-inf") else t0 + (t1 - t0) * (target - p0) / (p1 - p0)), t1
    return None


def table(results: dict) -> str:
    rows = ["| field | batch | rays/s | samples/s | samples/ray | peak GiB | final val PSNR | time waiting on data "
            "| steps that waited | chunk prep s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results.values():
        rows.append(f"| {r['field']} | {r['batch_size']} | {r['rays_per_s']:,.0f} | {r['samples_per_s']:,.0f} | "
                    f"{r['samples_per_ray']:.1f} | {r['peak_gib']:.1f} | {r['history'][-1][1]:.2f} dB | "
                    f"{100 * r['data_wait_fraction']:.2f}% | {100 * r['steps_waiting']:.2f}% | "
                    f"{r['chunk_prep_seconds']:.1f} |")
    for r in results.values():
        curve = ", ".join(f"{t:.0f}s {p:.2f}" for t, p in r["history"])
        rows.append(f"\n{r['field']} val PSNR over training time: {curve}")
    if {"mlp", "hash"} <= set(results):
        target = results["mlp"]["history"][-1][1]
        reach = time_to_reach(results["hash"]["history"], target)
        mlp_time = results["mlp"]["history"][-1][0]
        gain = results["hash"]["history"][-1][1] - target
        if reach is None:
            when = "never"
        else:
            when = (f"after {reach[0]:.1f} s ({mlp_time / reach[0]:.1f}x faster; interpolated between evaluations, "
                    f"the first evaluation at or above it came at {reach[1]:.1f} s, {mlp_time / reach[1]:.1f}x)")
        rows.append(f"\nhash reaches mlp's final {target:.2f} dB {when}; hash ends {gain:+.2f} dB vs mlp at equal "
                    "time.")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="city")
    p.add_argument("--minutes", type=float, default=8)
    p.add_argument("--fields", nargs="+", default=["mlp", "hash"])
    p.add_argument("--cell", type=int, default=0)
    p.add_argument("--grid_dim", type=int, nargs=2, default=[2, 2])
    p.add_argument("--work", type=Path, default=Path("bench-work"))
    p.add_argument("--eval_every", type=float, default=30.0,
                   help="seconds of training between val evaluations in the first minute (8 times that later)")
    p.add_argument("--val_rays", type=int, default=16384)
    p.add_argument("--extra", default="", help="further training options for both fields (e.g. smoke tests)")
    p.add_argument("--history_out", type=Path, default=None, help="write the raw results as JSON")
    p.add_argument("--compare_with", type=Path, default=None, help="JSON of an earlier call's results")
    p.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    args = p.parse_args()
    dataset = ensure_city(args.preset, args.work)
    masks = ensure_partition(dataset, args.work, tuple(args.grid_dim))
    results = json.loads(args.compare_with.read_text()) if args.compare_with else {}
    for field in args.fields:
        base = cell_args(dataset, masks, args.work, args.cell, f"exp-{field}")
        base += SETTINGS[field] + args.extra.split()
        results[field] = run_field(field, base, args.minutes, args.eval_every, args.val_rays)
        print(json.dumps({k: v for k, v in results[field].items() if k != "history"}))
    if args.history_out:
        args.history_out.write_text(json.dumps(results))
    append_results(args.results, f"Training speed, {args.preset} preset, cell {args.cell}, {args.minutes:g} min each",
                   "python " + " ".join(sys.argv), table(results))


if __name__ == "__main__":
    main()
