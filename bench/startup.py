"""Start-up and time to quality for one cell: the trainer's start-up breakdown with chunks written and with chunks
present, bytes per ray on disk (the cell's keys plus its share of the image store, divided over the partition's
cells), chunk write and stream rates, training steps that waited on data, and the time from process start to a
stated validation PSNR.

    python bench/startup.py --preset survey256 --target_psnr 20 [--steps 2000] [--val_interval 250]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, append_results, bytecode_env, cell_args, ensure_city, ensure_partition  # noqa: E402

from mega_nerf.data.chunks import ChunkReader, _read_manifest, default_store_dir  # noqa: E402
from mega_nerf.data.dataset import load_dataset  # noqa: E402
from mega_nerf.data.stream import RayStream  # noqa: E402
from mega_nerf.partition.cells import load_params  # noqa: E402


def train(argv: list[str], exp: Path, environ: dict[str, str]) -> tuple[float, list[dict]]:
    """Run mega_nerf/train.py fresh; its wall time and log.jsonl lines."""
    shutil.rmtree(exp, ignore_errors=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "mega_nerf/train.py"), *argv], check=True, capture_output=True,
                   env=environ)
    seconds = time.perf_counter() - start
    return seconds, [json.loads(line) for line in (exp / "log.jsonl").read_text().splitlines()]


def startup_row(label: str, lines: list[dict]) -> str:
    record = next((x for x in lines if "startup" in x), None)
    if record is None:
        return f"| {label} | (no breakdown logged) |"
    parts = ", ".join(f"{k} {v:.2f}" for k, v in record["startup"].items() if k != "total")
    return f"| {label} | {record['startup']['total']:.2f} | {parts} |"


def stream_rate(reader: ChunkReader, batch_size: int, seconds: float = 5.0) -> float:
    """Rays per second the stream hands out with no training in the way."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    stream = RayStream(reader, reader.counts, batch_size, seed=0, device=device)
    stream.next_batch()
    start, rays = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        stream.next_batch()
        rays += batch_size
    return rays / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="survey256")
    p.add_argument("--work", type=Path, default=Path("bench-work"))
    p.add_argument("--cell", type=int, default=0)
    p.add_argument("--target_psnr", type=float, default=20.0, help="val PSNR (right halves, in the cell) to reach")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--val_interval", type=int, default=250)
    p.add_argument("--batch_size", type=int, default=32768)
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="further training options")
    p.add_argument("--bytecode_cache", type=Path, default=None,
                   help="time start-up with bytecode compiled under this folder first (a normal install's)")
    p.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    args = p.parse_args()
    environ = bytecode_env(args.bytecode_cache)
    data = ensure_city(args.preset, args.work)
    masks = ensure_partition(data, args.work, (2, 2))
    chunks = args.work / f"chunks-{args.cell}"
    shutil.rmtree(chunks, ignore_errors=True)
    shutil.rmtree(default_store_dir([chunks]), ignore_errors=True)
    common = ["--train_iterations", str(args.steps), "--val_interval", str(args.val_interval), "--val_images", "2",
              "--batch_size", str(args.batch_size), "--ckpt_interval", str(args.steps), *args.extra]
    runs = {}
    for label in ("chunks written", "chunks present"):
        exp = args.work / f"startup-{label.split()[1]}"
        argv = cell_args(data, masks, args.work, args.cell, exp.name) + common
        runs[label] = train(argv, exp, environ)
    dataset = load_dataset(data)
    manifest = _read_manifest(chunks)
    store = default_store_dir([chunks]) / manifest.store
    on_disk = sum((chunks / name).stat().st_size for _, name, _ in manifest.chunks)
    share = store.stat().st_size / load_params(masks).num_cells
    written = next(x for x in runs["chunks written"][1] if "startup" in x)["startup"]["chunks"]
    rate = stream_rate(ChunkReader(manifest, [chunks], dataset), args.batch_size)
    _, lines = runs["chunks present"]
    last = [x for x in lines if "data_waits" in x][-1]
    reached = next((x for x in lines if x.get("val_psnr", -1) >= args.target_psnr), None)
    vals = [x for x in lines if "val_psnr" in x]
    best = max(x["val_psnr"] for x in vals)
    quality = (f"{args.target_psnr} dB reached at step {reached['step']}, {reached['seconds']:.1f} s after process "
               "start" if reached else
               f"{args.target_psnr} dB not reached; best {best:.2f} dB in {runs['chunks present'][0]:.1f} s")
    table = ("| run | start-up s | parts (s) |\n|---|---|---|\n"
             + "\n".join(startup_row(label, lines) for label, (_, lines) in runs.items())
             + f"\n\n{manifest.count:,} rays in cell {args.cell}; {on_disk / manifest.count:.3f} bytes/ray of keys + "
             f"{share / manifest.count:.3f} bytes/ray of the image store (divided over the cells) = "
             f"{(on_disk + share) / manifest.count:.3f} bytes/ray; chunk (and store) writing "
             f"{manifest.count / written:,.0f} rays/s; stream {rate:,.0f} rays/s with no training; "
             f"{last['data_waits']} of {last['step']} steps waited on data ({last['data_wait_s']:.2f} s); {quality}.")
    append_results(args.results, f"Start-up and time to quality, {args.preset} preset, cell {args.cell}",
                   "python " + " ".join(sys.argv), table)


if __name__ == "__main__":
    main()
