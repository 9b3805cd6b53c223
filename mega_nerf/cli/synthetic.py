"""Generate the synthetic city as a Mega-NeRF dataset (with ground-truth depth, a config and an overview).

The command of `scripts/make_synthetic_scene.py`:

    python scripts/make_synthetic_scene.py --preset small --output out/small [--seed 0] [--no_depth] [--overwrite]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from mega_nerf.errors import UserError
from mega_nerf.synthetic import PRESETS, generate_city
from mega_nerf.synthetic.generate import clear_output


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--output", type=Path, required=True, help="dataset directory to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no_depth", action="store_true", help="skip the ground-truth depth maps")
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset already in --output")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = args.output
    if (out / "coordinates.pt").exists():
        if not args.overwrite:
            raise UserError(f"{out}: already holds a dataset (pass --overwrite to replace it)")
        clear_output(out)
    start = time.perf_counter()
    s = generate_city(out, args.preset, args.seed, args.device, write_depth=not args.no_depth)
    seconds = time.perf_counter() - start
    out = out.absolute()
    print(f"synthetic city '{s['preset']}' (seed {s['seed']}) in {seconds:.1f} s -> {out}")
    pixel = "one ray through its centre" if s["rays_per_pixel"] == 1 else f"the mean of {s['rays_per_pixel']} rays"
    print(f"  images        {s['train_images']} train + {s['val_images']} val, {s['W']}x{s['H']} px, "
          f"focal {s['focal']:.1f} px, a pixel {pixel}")
    low, high = s["flight_altitudes"]
    flown = f"{low:.1f} m" if low == high else f"{low:.1f}-{high:.1f} m"
    print(f"  city          {s['blocks'][0]}x{s['blocks'][1]} blocks, {s['num_buildings']} buildings, "
          f"{s['num_trees']} trees, tallest {s['max_height']:.1f} m, flown at {flown}")
    print(f"  terrain       ground square to +-{s['terrain_half']:.2f} (normalised), {len(s['hills'])} hills")
    print(f"  altitude      ray_altitude_range {s['ray_altitude_range']} (metres, down-coordinates)")
    print(f"  coordinates   origin_drb {[round(v, 3) for v in s['origin_drb']]}, "
          f"pose_scale_factor {s['pose_scale_factor']:.3f}")
    print(f"  files         {out}/{{train,val}}/{{rgbs,metadata}}"
          + ("" if args.no_depth else f", depth in {out}/depth"))
    print(f"                {out}/config.yaml (use with --config_file), scene.json, overview.png")
    return s

