"""The whole pipeline on the built-in synthetic city, each stage the command a user would type:
generate -> partition (2x2) -> train the 4 submodules through parscript -> merge -> evaluate.

    python scripts/demo.py --output demo [--preset small] [--iterations 300]

Stages whose outputs exist are skipped, so an interrupted demo resumes. Runs on a CPU in minutes; uses the GPU
when there is one.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from mega_nerf.errors import UserError, run_cli

ROOT = Path(__file__).resolve().parents[1]
GRID = (2, 2)
CPU_BATCH = 512  # rays a step on a CPU


def run(cmd: list[str], env: dict[str, str] | None = None) -> None:
    """Run one stage; a failed one ends the demo in one line (the stage printed its own error above it)."""
    print("\n$ " + " ".join(cmd), flush=True)
    code = subprocess.run(cmd, cwd=ROOT, env=env).returncode
    if code == 130:
        raise KeyboardInterrupt
    if code != 0:
        stage = cmd[2] if cmd[1] == "-m" else Path(cmd[1]).name
        raise UserError(f"the demo stopped: {stage} failed with exit code {code}; rerun the demo to resume from the "
                        "stages done")


def train_args(iterations: int, cuda: bool) -> str:
    """Short training for a demo: small hash grid and batches on a CPU, the defaults' shape on a GPU."""
    if cuda:
        return f"--train_iterations {iterations * 5} --val_interval {iterations * 5}"
    return (f"--train_iterations {iterations} --batch_size {CPU_BATCH} --samples 32 --bg_samples 32 --hash_levels 8 "
            f"--log2_hashmap_size 15 --max_resolution 256 --occupancy_resolution 32 --occupancy_warmup 100 "
            f"--val_interval {iterations} --ckpt_interval 100 --log_interval 50 --data_mode memory --no_progress")


def main() -> None:
    import torch  # here: Ctrl-C during its import is run_cli's one line

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=Path, default=ROOT / "demo")
    p.add_argument("--preset", default="small")
    p.add_argument("--iterations", type=int, default=300, help="training steps per submodule (x5 on a GPU)")
    args = p.parse_args()
    out = args.output.resolve()
    py = sys.executable
    data, masks, merged = out / "data", out / "masks", out / "merged.pt"
    cuda = torch.cuda.is_available()
    start = time.perf_counter()
    if not (data / "coordinates.pt").exists():
        run([py, "scripts/make_synthetic_scene.py", "--preset", args.preset, "--output", str(data)])
    config = str(data / "config.yaml")
    if not (masks / "params.pt").exists():
        run([py, "scripts/create_cluster_masks.py", "--config_file", config, "--dataset_path", str(data),
             "--output", str(masks), "--grid_dim", str(GRID[0]), str(GRID[1])])
    jobs = out / f"run_{GRID[0] * GRID[1]}.txt"
    if not merged.exists():
        run([py, "scripts/make_parscript.py", "--cells", str(GRID[0] * GRID[1]), "--output", str(jobs)])
        env = dict(os.environ, CONFIG_FILE=config, EXP_PREFIX=str(out / "exp-"), DATASET_PATH=str(data),
                   CHUNK_PREFIX=str(out / "chunks-"), MASK_PATH=str(masks),
                   TRAIN_ARGS=train_args(args.iterations, cuda),
                   PATH=f"{Path(py).parent}{os.pathsep}{os.environ['PATH']}", OMP_NUM_THREADS="1")
        workers = max(1, torch.cuda.device_count()) if cuda else 2
        run([py, "-m", "parscript.dispatcher", str(jobs), "-r"], env)
        run([py, "-m", "parscript.dispatcher", str(jobs), "-g", str(workers)], env)
        run([py, "scripts/merge_submodules.py", "--config_file", config, "--ckpt_prefix", str(out / "exp-"),
             "--centroid_path", str(masks / "params.pt"), "--output", str(merged)])
    run([py, "mega_nerf/eval.py", "--config_file", config, "--dataset_path", str(data), "--container_path",
         str(merged), "--exp_name", str(out / "eval")])
    print(f"\ndemo done in {time.perf_counter() - start:.0f} s: renders in {out / 'eval'}, "
          f"training logs and validation renders in {out}/exp-<cell>/")
    if not cuda:
        print(f"on a CPU each cell trained {args.iterations} steps of {CPU_BATCH} rays through a small hash grid: the "
              "demo shows the pipeline, not the quality (blurry renders, ground left transparent); see "
              "bench/RESULTS.md for GPU runs")


if __name__ == "__main__":
    run_cli(main)
