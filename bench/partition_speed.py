"""Partition speed: the whole `create_cluster_masks.py` process (imports, dataset, masks written, report), sampled
rule at Mega-NeRF's 1,000 samples against the exact rule, on the same scene and device; and what the exact rule
adds (it holds every sampled ray: checked here on every mask).

    python bench/partition_speed.py --preset survey256 [--grid 2 2] [--samples 1000] [--nproc 1] \
        [--bytecode_cache DIR]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PARTITION, QUIET, append_results, bytecode_env, ensure_city, partition_args, timed  # noqa: E402

from mega_nerf.partition.maskfile import read_mask  # noqa: E402


def run_partition(data: Path, output: Path, grid: list[int], samples: int | None, nproc: int,
                  environ: dict[str, str]) -> tuple[float, str]:
    """Seconds for the whole process, launched fresh in `environ`, and its line of where the time went (rank
    0's)."""
    shutil.rmtree(output, ignore_errors=True)
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    "--nproc_per_node", str(nproc)]
    seconds, result = timed([*launcher, str(PARTITION), *partition_args(data, output, grid, samples)], environ)
    return seconds, next(line for line in result.stdout.splitlines() if line.startswith("partition: "))


def extra_assignments(sampled: Path, exact: Path) -> tuple[int, int]:
    """(sampled rule's assignments the exact masks lack, assignments the exact rule adds), over every mask."""
    missing = added = 0
    for file in sorted(sampled.glob("*/*.mask")):
        a, b = read_mask(file), read_mask(exact / file.relative_to(sampled))
        missing += int((a & ~b).sum())
        added += int((b & ~a).sum())
    return missing, added


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="survey256")
    p.add_argument("--work", type=Path, default=Path("bench-work"))
    p.add_argument("--grid", type=int, nargs=2, default=[2, 2])
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--nproc", type=int, default=1, help="processes (torch.distributed.run), one GPU each")
    p.add_argument("--bytecode_cache", type=Path, default=None,
                   help="time both processes with bytecode compiled under this folder first (a normal install's)")
    p.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    args = p.parse_args()
    environ = {**bytecode_env(args.bytecode_cache), **QUIET}
    data = ensure_city(args.preset, args.work)
    out = {rule: args.work / f"partition-speed-{rule}" for rule in ("sampled", "exact")}
    runs = {"sampled": run_partition(data, out["sampled"], args.grid, args.samples, args.nproc, environ),
            "exact": run_partition(data, out["exact"], args.grid, None, args.nproc, environ)}
    seconds = {rule: run[0] for rule, run in runs.items()}
    reports = {rule: json.loads((path / "partition.json").read_text()) for rule, path in out.items()}
    missing, added = extra_assignments(out["sampled"], out["exact"])
    rows = [f"| {rule} | {seconds[rule]:.2f} | {reports[rule]['rays']:,} | {reports[rule]['overlap_factor']:.4f} | "
            f"{runs[rule][1].split(': ', 1)[1]} |" for rule in ("sampled", "exact")]
    table = ("| rule | whole process s | rays | overlap factor | where the time went |\n|---|---|---|---|---|\n"
             + "\n".join(rows)
             + f"\n\nSpeed-up {seconds['sampled'] / seconds['exact']:.1f}x; the exact masks lack {missing} of the "
             f"sampled rule's assignments (must be 0) and add {added:,} "
             f"({added / max(1, sum(reports['sampled']['rays_per_cell'])):.3%}).")
    append_results(args.results, f"Partition speed, {args.preset} preset, {args.grid[0]}x{args.grid[1]}, "
                   f"{args.nproc} process(es), sampled at {args.samples}"
                   + (", bytecode cached" if args.bytecode_cache else ""), "python " + " ".join(sys.argv), table)


if __name__ == "__main__":
    main()
