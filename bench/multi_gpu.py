"""Several GPUs of one host: partition, evaluation and training every cell at N = 1 and N = 2 ranks (whole-process
wall times, speed-ups, identical outputs), and how a failing rank ends each stage.

    python bench/multi_gpu.py --work /tmp/mg --presets city oblique --stages floor partition train eval fail \\
        --results bench/RESULTS.md

Stages (run them in separate calls when a call's time is short; `--work` keeps what the earlier ones made):
  floor      a process's fixed cost: python + torch + a CUDA context, and torchrun starting N no-op ranks
  partition  create_cluster_masks.py, 1 process vs torchrun N; the two mask folders compared byte for byte
  train      the 4 cells: 4 separate train.py runs (their sum: the reference), parscript -g N (largest first),
             train_cells.py in 1 process and under torchrun N; the same final steps everywhere (GPU training
             is not bit-reproducible: the CPU test holds them bit-equal)
  eval       eval.py on the merged cells, 1 process vs torchrun N, after one untimed warm-up (Triton's kernels
             compile once per machine); metrics.json and every PNG compared
  fail       each stage under torchrun N with rank 1 failing part-way (tests/stage_worker.py's hook): seconds to
             end, exit code, the error lines
`--launcher mega_nerf.cli.launch` starts the N ranks with mega-nerf-launch instead of torchrun.
On a CPU everything runs at tiny scale, e.g. `--presets tiny --iterations 20 --train_args "--batch_size 512
--samples 32 --hash_levels 8 --log2_hashmap_size 15 --max_resolution 256"`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PARTITION, QUIET, ROOT, append_results, bytecode_env, ensure_city, partition_args, timed  # noqa: E402

PY = sys.executable
GRID = ("2", "2")


def env(work: Path, bytecode_cache: Path | None, **extra: str) -> dict[str, str]:
    """The children's environment: the repository importable, `python` meaning this interpreter (parscript's
    workers call `python`), multicast off, and bytecode as common.bytecode_env makes it."""
    shim = work / "bin"
    shim.mkdir(parents=True, exist_ok=True)
    if not (shim / "python").exists():  # a script, not a link: a link would lose a virtual environment
        (shim / "python").write_text(f'#!/bin/sh\nexec {shlex.quote(PY)} "$@"\n')
        (shim / "python").chmod(0o755)
    path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return {**bytecode_env(bytecode_cache), **QUIET, "PYTHONPATH": path,
            "PATH": f"{shim}{os.pathsep}{os.environ['PATH']}", **extra}


LAUNCHERS = ("torch.distributed.run", "mega_nerf.cli.launch")


def launcher(args: argparse.Namespace, n: int) -> list[str]:
    """One plain process, or n ranks under the --launcher module."""
    return [PY] if n == 1 else [PY, "-m", args.launcher, "--standalone", "--nproc_per_node", str(n)]


def digests(root: Path, pattern: str = "*") -> dict[str, str]:
    """Relative path -> SHA-1 of every file under `root` matching `pattern`."""
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob(pattern)) if p.is_file()}


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    return path


def speedup_row(name: str, t1: float, tn: float, same: bool | str) -> str:
    return f"| {name} | {t1:.1f} | {tn:.1f} | {t1 / tn:.2f}x | {same} |"


def stage_floor(args: argparse.Namespace, environ: dict[str, str]) -> str:
    script = args.work / "noop.py"
    script.write_text("import torch\nif torch.cuda.is_available():\n    torch.zeros(1, device='cuda')\n")
    one, _ = timed([PY, str(script)], environ)
    many, _ = timed([*launcher(args, args.n), str(script)], environ)
    return ("| fixed cost | seconds |\n|---|---|\n"
            f"| python + torch + CUDA context, 1 process | {one:.1f} |\n"
            f"| {args.launcher}, {args.n} such ranks | {many:.1f} |")


def scene(data: Path) -> list[str]:
    return ["--config_file", str(data / "config.yaml"), "--dataset_path", str(data)]


def masks_of(args: argparse.Namespace, preset: str) -> Path:
    return args.work / f"{preset}-masks"


def stage_partition(args: argparse.Namespace, preset: str, data: Path, environ: dict[str, str]) -> str:
    times: dict[int, list[float]] = {1: [], args.n: []}
    lines: dict[int, str] = {}  # the last run's line of where rank 0's time went
    for _ in range(args.repeats):
        for n in times:
            out = fresh(args.work / f"{preset}-partition-n{n}")
            seconds, result = timed([*launcher(args, n), str(PARTITION),
                                     *partition_args(data, out, GRID, args.ray_samples)], environ)
            times[n].append(seconds)
            lines[n] = next((x for x in result.stdout.splitlines() if x.startswith("partition: ")), "")
    one, many = (args.work / f"{preset}-partition-n{n}" for n in times)
    same = digests(one) == digests(many)
    if not (masks_of(args, preset) / "params.pt").exists():
        shutil.copytree(one, fresh(masks_of(args, preset)))
    row = speedup_row(f"partition, {preset}", min(times[1]), min(times[args.n]), same)
    return row + "\n" + "\n".join(f"|   {n} rank(s): {line} | | | | |" for n, line in lines.items())


def train_options(args: argparse.Namespace) -> list[str]:
    return ["--train_iterations", str(args.iterations), "--val_interval", str(10 ** 9), "--no_progress",
            *shlex.split(args.train_args)]


def final_steps(prefix: Path) -> list[int]:
    return [int(sorted((Path(f"{prefix}{k}") / "checkpoints").glob("*.pt"))[-1].stem) for k in range(4)]


def stage_train(args: argparse.Namespace, preset: str, data: Path, environ: dict[str, str]) -> str:
    masks = masks_of(args, preset)
    rows, root = [], args.work / f"{preset}-train"

    def add(row: str) -> None:  # printed at once: a stage cut short by its call's time still reports its rows
        rows.append(row)
        print(row, flush=True)
    # An untimed short run first, past the occupancy warm-up: Triton's kernels compile once per machine.
    warm = fresh(root / "warm")
    timed([PY, "mega_nerf/train.py", *scene(data), "--exp_name", str(warm / "exp"), "--chunk_paths",
           str(warm / "chunks"), "--cluster_mask_path", str(masks / "0"), *train_options(args),
           "--train_iterations", "50"], environ)
    separate = fresh(root / "separate")
    cell_times = []
    for k in range(4):
        seconds, _ = timed([PY, "mega_nerf/train.py", *scene(data), "--exp_name", str(separate / f"exp-{k}"),
                            "--chunk_paths", str(separate / f"chunks-{k}"), "--cluster_mask_path", str(masks / str(k)),
                            *train_options(args)], environ)
        cell_times.append(seconds)
    total = sum(cell_times)
    add(f"| 4 separate train.py runs (cells {', '.join(f'{t:.0f}' for t in cell_times)} s) | 1 | "
                f"{total:.1f} | 1.00 | {final_steps(separate / 'exp-')} |")
    par = fresh(root / "parscript")
    jobs = par / f"run_4_{args.n}.txt"
    timed([PY, "scripts/make_parscript.py", "--cells", "4", "--output", str(jobs), "--mask_path", str(masks)], environ)
    job_env = {**environ, "CONFIG_FILE": str(data / "config.yaml"), "EXP_PREFIX": f"{par}/exp-",
               "DATASET_PATH": str(data), "CHUNK_PREFIX": f"{par}/chunks-", "MASK_PATH": str(masks),
               "TRAIN_ARGS": shlex.join(train_options(args))}
    timed([PY, "-m", "parscript.dispatcher", str(jobs), "-r"], job_env)
    seconds, _ = timed([PY, "-m", "parscript.dispatcher", str(jobs), "-g", str(args.n)], job_env)
    add(f"| parscript -g {args.n} | {args.n} | {seconds:.1f} | {seconds / total:.2f} | "
                f"{final_steps(par / 'exp-')} |")
    for n in (1, args.n):
        out = fresh(root / f"cells-n{n}")
        seconds, _ = timed([*launcher(args, n), "scripts/train_cells.py", *scene(data), "--mask_path", str(masks),
                            "--exp_prefix", f"{out}/exp-", "--chunk_prefix", f"{out}/chunks-", *train_options(args)],
                           environ)
        add(f"| train_cells.py, {n} rank(s) | {n} | {seconds:.1f} | {seconds / total:.2f} | "
                    f"{final_steps(out / 'exp-')} |")
    return "\n".join([f"| all 4 cells, {preset}, {args.iterations} steps each | GPUs | wall s | / sum of cells "
                      "| final steps |", "|---|---|---|---|---|", *rows])


def merged_of(args: argparse.Namespace, preset: str, data: Path, environ: dict[str, str]) -> Path:
    """The merged container of the train stage's cells (trained here by train_cells.py when missing)."""
    merged, cells = args.work / f"{preset}-merged.pt", args.work / f"{preset}-train" / f"cells-n{args.n}"
    if not merged.exists():
        if not (cells / "exp-3").exists():
            timed([*launcher(args, args.n), "scripts/train_cells.py", *scene(data), "--mask_path",
                   str(masks_of(args, preset)), "--exp_prefix", f"{cells}/exp-", "--chunk_prefix",
                   f"{cells}/chunks-", *train_options(args)], environ)
        timed([PY, "scripts/merge_submodules.py", "--config_file", str(data / "config.yaml"), "--ckpt_prefix",
               f"{cells}/exp-", "--centroid_path", str(masks_of(args, preset) / "params.pt"), "--output",
               str(merged)], environ)
    return merged


def eval_options(data: Path, merged: Path, out: Path) -> list[str]:
    return [*scene(data), "--container_path", str(merged), "--exp_name", str(out), "--no_progress"]


def stage_eval(args: argparse.Namespace, preset: str, data: Path, environ: dict[str, str]) -> str:
    merged = merged_of(args, preset, data, environ)
    cold, _ = timed([PY, "mega_nerf/eval.py", *eval_options(data, merged, fresh(args.work / "eval-warm"))], environ)
    times: dict[int, list[float]] = {1: [], args.n: []}
    rank0 = {}
    for _ in range(args.repeats):
        for n in times:
            out = fresh(args.work / f"{preset}-eval-n{n}")
            seconds, result = timed([*launcher(args, n), "mega_nerf/eval.py", *eval_options(data, merged, out)],
                                    environ)
            times[n].append(seconds)
            rank0[n] = "; ".join(line for line in result.stdout.splitlines() if line.startswith(("rank 0:", "eval:")))
    one, many = (args.work / f"{preset}-eval-n{n}" for n in times)
    same_metrics = json.loads((one / "metrics.json").read_text()) == json.loads((many / "metrics.json").read_text())
    same_png = digests(one, "*.png") == digests(many, "*.png")
    row = speedup_row(f"eval, {preset} (first run, cold: {cold:.1f} s)", min(times[1]), min(times[args.n]),
                      f"metrics {same_metrics}, PNGs {same_png}")
    return row + "\n" + "\n".join(f"|   {n} rank(s): {line} | | | | |" for n, line in rank0.items())


def stage_fail(args: argparse.Namespace, preset: str, data: Path, environ: dict[str, str]) -> str:
    """Each stage with rank 1 failing part-way: a UserError in partition and eval, a crash (RuntimeError) in
    cell training (a cell's user error fails that cell only)."""
    merged = merged_of(args, preset, data, environ)
    cells = fresh(args.work / f"{preset}-fail-cells")
    cases = {
        "partition": ("user", "2", partition_args(data, fresh(args.work / f"{preset}-fail-masks"), GRID,
                                                  args.ray_samples)),
        "eval": ("user", "2", eval_options(data, merged, fresh(args.work / f"{preset}-fail-eval"))),
        "cells": ("crash", "20", [*scene(data), "--mask_path", str(masks_of(args, preset)), "--exp_prefix",
                                  f"{cells}/exp-", "--chunk_prefix", f"{cells}/chunks-", *train_options(args)]),
    }
    rows = ["| stage (rank 1 fails) | exit code | seconds to end | error lines |", "|---|---|---|---|"]
    for stage, (kind, trigger, options) in cases.items():
        command = [*launcher(args, args.n), "tests/stage_worker.py", stage, "1", kind, trigger,
                   "--timeout_minutes", "10"]
        seconds, result = timed([*command, *options], environ, check=False)
        errors = sorted({line for line in result.stderr.splitlines() if line.startswith(("error:", "RuntimeError:"))})
        rows.append(f"| {stage}, {preset} | {result.returncode} | {seconds:.1f} | {'<br>'.join(errors)} |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--presets", nargs="+", default=["city", "oblique"])
    p.add_argument("--stages", nargs="+", default=["floor", "partition", "train", "eval", "fail"])
    p.add_argument("--n", type=int, default=2, help="ranks (GPUs) to compare with one")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per N (the fastest is reported)")
    p.add_argument("--ray_samples", type=int, default=0, help="0: the exact rule (the default)")
    p.add_argument("--iterations", type=int, default=1000, help="training steps per cell")
    p.add_argument("--train_args", type=str, default="", help="further train.py options, e.g. for a CPU")
    p.add_argument("--launcher", default=LAUNCHERS[0], choices=LAUNCHERS, help="what starts the N ranks")
    p.add_argument("--bytecode_cache", type=Path, default=None,
                   help="time every command with bytecode compiled under this folder first (a normal install's)")
    p.add_argument("--results", type=Path, default=None)
    args = p.parse_args()
    args.work = args.work.resolve()
    environ = env(args.work, args.bytecode_cache)
    blocks = [stage_floor(args, environ)] if "floor" in args.stages else []
    for preset in args.presets:
        data = ensure_city(preset, args.work)
        if "partition" in args.stages or not (masks_of(args, preset) / "params.pt").exists():
            blocks.append("| stage | 1 process s | N ranks s | speed-up | identical |\n|---|---|---|---|---|\n"
                          + stage_partition(args, preset, data, environ))
        stages = {"train": stage_train, "eval": stage_eval, "fail": stage_fail}
        for name in (s for s in stages if s in args.stages):
            block = stages[name](args, preset, data, environ)
            if name == "eval":
                block = "| stage | 1 process s | N ranks s | speed-up | identical |\n|---|---|---|---|---|\n" + block
            blocks.append(block)
            print(block, flush=True)
    command = "python bench/multi_gpu.py " + shlex.join(sys.argv[1:])
    table = f"N = {args.n}; wall times of whole commands, process start included.\n\n" + "\n\n".join(blocks)
    if args.results:
        append_results(args.results, "Several GPUs: partition, eval, all cells", command, table)
    else:
        print(table)


if __name__ == "__main__":
    main()
