"""Where a training step's GPU time goes: run a cell for a while (so the occupancy grid has settled), time
--timed_steps steps without the profiler, then profile a few with torch.profiler and print the kernels that take
the most time. --compare_val_embeddings also times --val_embeddings_only's split backward against one backward.

    python bench/profile_step.py --preset city --warmup_seconds 60 "--extra=--batch_size 65536"
    python bench/profile_step.py --preset oblique --compare_val_embeddings "--extra=--val_embeddings_only"
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cell_args, ensure_city, ensure_partition  # noqa: E402

from mega_nerf.cli.train import config_from_argv  # noqa: E402
from mega_nerf.data.stream import RayStream  # noqa: E402
from mega_nerf.training.trainer import Trainer  # noqa: E402


def compare_val_embeddings(trainer: Trainer, stream: RayStream, steps: int, blocks: int = 6) -> None:
    """ms per step with --val_embeddings_only's split backward against one backward of the whole loss (what the
    trainer does without the option), in alternating blocks on the same trainer: the same occupancy and scene."""
    val_image, seconds = trainer.val_image, {True: 0.0, False: 0.0}
    for block in range(blocks):
        split = block % 2 == 0
        trainer.val_image = val_image if split else None
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps // blocks):
            trainer.train_step(stream)
        torch.cuda.synchronize()
        seconds[split] += time.perf_counter() - t0
    trainer.val_image = val_image
    share = float(val_image[stream.next_batch()[0]].float().mean())
    per_step = {split: t / (blocks // 2 * (steps // blocks)) * 1e3 for split, t in seconds.items()}
    print(f"--val_embeddings_only: {per_step[True]:.2f} ms/step split, {per_step[False]:.2f} ms/step one backward "
          f"({per_step[True] / per_step[False] - 1:+.1%}); val rays {share:.1%} of a batch; "
          f"{blocks} alternating blocks of {steps // blocks} steps")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="city")
    p.add_argument("--work", type=Path, default=Path("bench-work"))
    p.add_argument("--warmup_seconds", type=float, default=60)
    p.add_argument("--steps", type=int, default=10, help="profiled steps")
    p.add_argument("--timed_steps", type=int, default=200, help="steps timed without the profiler before it")
    p.add_argument("--extra", default="", help='options for train.py: "--extra=--opt value" for a leading dash')
    p.add_argument("--compare_val_embeddings", action="store_true",
                   help="with --extra=--val_embeddings_only: also time its split backward against one backward")
    args = p.parse_args()
    if args.compare_val_embeddings and ("--val_embeddings_only" not in args.extra.split() or args.timed_steps < 6):
        p.error("--compare_val_embeddings needs \"--extra=--val_embeddings_only\" and --timed_steps >= 6")
    dataset = ensure_city(args.preset, args.work)
    masks = ensure_partition(dataset, args.work, (2, 2))
    trainer = Trainer(config_from_argv([*cell_args(dataset, masks, args.work, 0, "exp-profile"),
                                        "--train_iterations", "20000", *args.extra.split()]))
    stream = trainer.prepare_data()
    start, steps = time.perf_counter(), 0
    while time.perf_counter() - start < args.warmup_seconds:
        trainer.train_step(stream)
        steps += 1
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.timed_steps):
        trainer.train_step(stream)
    torch.cuda.synchronize()
    plain = (time.perf_counter() - t0) / args.timed_steps
    if args.compare_val_embeddings:
        compare_val_embeddings(trainer, stream, args.timed_steps)
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            trainer.train_step(stream)
        torch.cuda.synchronize()
    elapsed = (time.perf_counter() - t0) / args.steps
    batch = trainer.config.batch_size
    print(f"after {steps} warm-up steps: {plain * 1e3:.2f} ms/step, {batch / plain:,.0f} rays/s over "
          f"{args.timed_steps} steps; {elapsed * 1e3:.1f} ms/step (profiled), "
          f"{batch / elapsed:,.0f} rays/s, {int(trainer.last_samples) / batch:.1f} "
          f"samples/ray, occupied {trainer.field.occupancy.occupied_fraction:.3f}")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))


if __name__ == "__main__":
    main()
