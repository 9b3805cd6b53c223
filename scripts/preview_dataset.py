"""Draw a dataset before training: cameras (train and val), sparse points, the altitude slab and, optionally,
the cells of a partition. Prints what looks wrong (cameras below the ground, cameras looking up, ...).

    python scripts/preview_dataset.py data/scene [--partition masks] [--output preview.png]
    python scripts/preview_dataset.py --config configs/scene.yaml
"""
from __future__ import annotations

from pathlib import Path

from mega_nerf.cli.options import base_parser, require
from mega_nerf.errors import run_cli
from mega_nerf.preview import write_preview


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("dataset", nargs="?", default=None, help="dataset folder (or --dataset_path)")
    parser.add_argument("--partition", default=None, help="masks folder (or its params.pt) to draw the cells of")
    parser.add_argument("--output", default=None, help="PNG to write (default: <dataset>/preview.png)")
    parser.add_argument("--size", type=int, default=800, help="height of the image; its width is twice that")
    args = parser.parse_args()
    dataset = args.dataset or args.dataset_path
    require(dataset, "dataset_path")
    output = Path(args.output or Path(dataset) / "preview.png")
    lines = write_preview(dataset, output, args.partition, args.ray_altitude_range, args.size)
    print("\n".join(lines))
    print(f"wrote {output}")


if __name__ == "__main__":
    run_cli(main)
