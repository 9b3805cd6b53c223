"""Where a training step's GPU time goes: run a cell for a while (so the occupancy grid has settled), then
profile a few steps with torch.profiler and print the kernels that take the most time.

    python bench/profile_step.py --preset city --warmup_seconds 60 --extra "--batch_size 65536"
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
from mega_nerf.training.trainer import Trainer  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="city")
    p.add_argument("--work", type=Path, default=Path("bench-work"))
    p.add_argument("--warmup_seconds", type=float, default=60)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--extra", default="")
    args = p.parse_args()
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
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            trainer.train_step(stream)
        torch.cuda.synchronize()
    elapsed = (time.perf_counter() - t0) / args.steps
    batch = trainer.config.batch_size
    print(f"after {steps} warm-up steps: {elapsed * 1e3:.1f} ms/step (profiled), "
          f"{batch / elapsed:,.0f} rays/s, {int(trainer.last_samples) / batch:.1f} "
          f"samples/ray, occupied {trainer.field.occupancy.occupied_fraction:.3f}")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))


if __name__ == "__main__":
    main()
