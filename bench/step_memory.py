"""Memory of one training step per shaded sample: calibrates Field.train_bytes_per_sample, which sets how many
rays a forward/backward pass may hold (--micro_batch's default).

Each measurement runs in a fresh process (peak memory is per process): one step of `--rays` rays on the tiny city,
unsplit; the step's memory is the peak after it minus the peak before it (ru_maxrss on a CPU, max_memory_allocated
on a GPU). Prints the measured bytes per sample next to the field's estimate.

    python bench/step_memory.py --field hash --rays 256 1024      # CPU, tens of seconds
    python bench/step_memory.py --field hash --rays 8192 32768    # GPU
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ONE_STEP = """
import resource, sys, torch
from mega_nerf.cli.train import config_from_argv
from mega_nerf.training.trainer import Trainer
rays, field, city, exp = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
t = Trainer(config_from_argv(["--config_file", city + "/config.yaml", "--exp_name", exp, "--data_mode", "memory",
                              "--batch_size", str(rays), "--micro_batch", str(rays), "--field", field,
                              "--no_progress"]))
stream = t.prepare_data()
cuda = t.device.type == "cuda"
before = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t.train_step(stream)
after = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
samples = t.config.samples + t.config.bg_samples + t.config.fine_samples
print(after - before, samples, t.field.train_bytes_per_sample())
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--field", default="hash")
    parser.add_argument("--rays", type=int, nargs="+", default=[256, 1024])
    args = parser.parse_args()
    from mega_nerf.synthetic import generate_city
    with tempfile.TemporaryDirectory() as work:
        city = Path(work) / "tiny"
        generate_city(city, "tiny", seed=0, device="cpu", progress=False)
        for rays in args.rays:
            out = subprocess.run([sys.executable, "-c", ONE_STEP, str(rays), args.field, str(city),
                                  str(Path(work) / f"exp{rays}")], capture_output=True, text=True, check=True,
                                 cwd=ROOT).stdout.split()
            used, samples, estimate = map(int, out[-3:])
            print(f"{args.field} {rays:>6} rays x {samples} samples: {used / 2 ** 20:8.1f} MiB, "
                  f"{used / (rays * samples):7.0f} B/sample measured, {estimate} estimated")


if __name__ == "__main__":
    main()
