"""Chunk writing in one process: `prepare_chunks` on one cell of a preset (its keys and the image store, into a
fresh folder each time), then the two passes over the images it is made of, each alone: reading the cell's masks
and decoding the image store. This is the trainer's "chunks" part of start-up without the process around it; to
compare trees, run it from each.

    python bench/chunk_write.py --preset survey256 --repeats 3
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_results, ensure_city, ensure_partition  # noqa: E402

from mega_nerf.data.chunks import prepare_chunks, training_mask  # noqa: E402
from mega_nerf.data.dataset import load_dataset  # noqa: E402
from mega_nerf.data.store import ordered_map, workers, write_store  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="survey256")
    p.add_argument("--work", type=Path, default=Path("bench-work"))
    p.add_argument("--cell", type=int, default=0, help="a cell of the preset's 2x2 partition")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--chunk_rays", type=int, default=2 ** 22)
    p.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    args = p.parse_args()
    data = ensure_city(args.preset, args.work)
    masks = ensure_partition(data, args.work, (2, 2)) / str(args.cell)
    dataset = load_dataset(data)
    out = args.work / "chunk-write"
    seconds = []
    for _ in range(args.repeats):
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        manifest = prepare_chunks(dataset, masks, [out / "chunks"], args.chunk_rays, store_dir=out / "store")
        seconds.append(time.perf_counter() - start)
    start = time.perf_counter()
    sum(ordered_map(lambda m: int(training_mask(m, masks).sum()), dataset.images))
    masks_alone = time.perf_counter() - start
    shutil.rmtree(out)
    out.mkdir(parents=True)
    start = time.perf_counter()
    write_store(out / "store.rgb", dataset)
    store_alone = time.perf_counter() - start
    shutil.rmtree(out)
    table = ("| rays | threads | `prepare_chunks` (s) | rays/s | masks alone (s) | image store alone (s) |\n"
             "|---|---|---|---|---|---|\n"
             f"| {manifest.count:,} | {workers()} | {', '.join(f'{s:.3f}' for s in seconds)} | "
             f"{', '.join(f'{manifest.count / s / 1e6:.1f} M' for s in seconds)} | {masks_alone:.3f} | "
             f"{store_alone:.3f} |")
    append_results(args.results, f"Chunk writing, {args.preset} preset, cell {args.cell}",
                   "python " + " ".join(sys.argv), table)


if __name__ == "__main__":
    main()
