"""Data path speed: chunk writing (rays/s, bytes per ray on disk: the cell's keys plus its share of the image
store, divided over the partition's cells) for one cell, and how fast the stream hands out batches with no
training in the way (so it can be compared with the trainer's consumption in train_speed.py, which also reports
the time training spent waiting on data). The image store is rewritten too, so the write time is a first cell's.

    python bench/data_speed.py --preset city [--batch_size 32768] [--chunk_rays 4194304]
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_results, ensure_city, ensure_partition  # noqa: E402

from mega_nerf.data.chunks import ChunkReader, prepare_chunks  # noqa: E402
from mega_nerf.data.dataset import load_dataset  # noqa: E402
from mega_nerf.data.stream import RayStream  # noqa: E402
from mega_nerf.partition.cells import load_params  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="city")
    p.add_argument("--work", type=Path, default=Path("bench-work"))
    p.add_argument("--cell", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=32768)
    p.add_argument("--chunk_rays", type=int, default=2 ** 22)
    p.add_argument("--batches", type=int, default=2000)
    p.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    args = p.parse_args()
    data = ensure_city(args.preset, args.work)
    masks = ensure_partition(data, args.work, (2, 2))
    out, store = args.work / "data-speed" / "chunks", args.work / "data-speed" / "image_store"
    shutil.rmtree(out.parent, ignore_errors=True)
    dataset = load_dataset(data)
    start = time.perf_counter()
    manifest = prepare_chunks(dataset, masks / str(args.cell), [out], args.chunk_rays,
                              store_dir=store)
    write_seconds = time.perf_counter() - start
    cells = load_params(masks).num_cells
    on_disk = (sum((out / name).stat().st_size for _, name, _ in manifest.chunks)
               + (store / manifest.store).stat().st_size / cells)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reader = ChunkReader(manifest, [out], dataset, store)
    stream = RayStream(reader, reader.counts, args.batch_size, seed=0, device=device)
    stream.next_batch()
    start = time.perf_counter()
    for _ in range(args.batches):
        stream.next_batch()
    if device.type == "cuda":
        torch.cuda.synchronize()
    stream_seconds = time.perf_counter() - start
    table = ("| rays | chunks | write s | write rays/s | bytes/ray on disk | stream rays/s (no training) | "
             "stream waits |\n|---|---|---|---|---|---|---|\n"
             f"| {manifest.count:,} | {len(manifest.chunks)} | {write_seconds:.1f} | "
             f"{manifest.count / write_seconds:,.0f} | {on_disk / manifest.count:.2f} | "
             f"{args.batches * args.batch_size / stream_seconds:,.0f} | {stream.waits} |")
    append_results(args.results, f"Data speed, {args.preset} preset, cell {args.cell}", "python " + " ".join(sys.argv),
                   table)


if __name__ == "__main__":
    main()
