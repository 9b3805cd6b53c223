"""`mega-nerf-train` (and `python mega_nerf/train.py`): train one submodule (one cell's rays) or one model of the
whole scene. Builds a TrainConfig from the options and hands it to the Trainer."""
from __future__ import annotations

import configargparse

from mega_nerf.cli.options import base_parser, config_from_args
from mega_nerf.errors import run_cli
from mega_nerf.fields import FIELDS
from mega_nerf.lock import locked
from mega_nerf.training.config import TrainConfig
from mega_nerf.training.trainer import Trainer


def train_parser() -> configargparse.ArgParser:
    p = base_parser("Train one submodule (one cell's rays) or, without a mask, one model of the whole scene.")
    p.add_argument("--exp_name", type=str, help="experiment directory (checkpoints, logs, renders)")
    p.add_argument("--chunk_paths", type=str, nargs="+", help="directories for the shuffled ray chunks")
    p.add_argument("--cluster_mask_path", type=str, default=None, help="this cell's mask directory (M/<k>)")
    p.add_argument("--data_mode", choices=("disk", "memory"), default="disk",
                   help="disk: stream shuffled chunks from --chunk_paths; memory: keep every ray in RAM")
    p.add_argument("--chunk_rays", type=int, default=2 ** 26, help="rays per chunk: bounds the shuffle's memory")
    p.add_argument("--train_scale_factor", type=int, default=1, help="downsample training images by this")
    p.add_argument("--field", type=str, default="hash", help=f"one of {', '.join(FIELDS)}")
    p.add_argument("--batch_size", type=int, default=None,
                   help="rays per step (hash 32768 on a GPU and 4096 on a CPU, mlp 1024)")
    p.add_argument("--micro_batch", type=int, default=None,
                   help="rays per forward/backward pass, bounding a step's memory (gradients of the passes add "
                        "up; default: as many as fit in 3/4 of the GPU's memory, or in 1 GiB on a CPU)")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (hash 1e-2, mlp 5e-4)")
    p.add_argument("--lr_decay_factor", type=float, default=0.1,
                   help="lr multiplier per --lr_decay_epochs (or, with 0 there, reached at the last step)")
    p.add_argument("--lr_decay_epochs", type=float, default=None,
                   help="epochs (passes over the cell's rays) per lr decay; 0: decay once over the run, as Mega-NeRF "
                        "(hash 30, mlp 0)")
    p.add_argument("--train_iterations", type=int, default=None,
                   help="steps (hash: two lr decays, 60 epochs of the cell's rays; mlp 30000)")
    p.add_argument("--samples", type=int, default=None, help="samples per ray (mlp: coarse samples)")
    p.add_argument("--fine_samples", type=int, default=None, help="hierarchical fine samples (mlp: 512)")
    p.add_argument("--bg_samples", type=int, default=32,
                   help="samples per ray beyond the foreground box (the contracted far world; 0: none)")
    p.add_argument("--appearance_dim", type=int, default=None)
    p.add_argument("--hash_levels", type=int, default=16, help="hash-grid levels")
    p.add_argument("--log2_hashmap_size", type=int, default=19)
    p.add_argument("--max_resolution", type=int, default=2048, help="finest hash-grid resolution")
    p.add_argument("--occupancy_resolution", type=int, default=128)
    p.add_argument("--occupancy_interval", type=int, default=8,
                   help="steps between occupancy updates (every 262,144 rays at the hash default batch)")
    p.add_argument("--occupancy_warmup", type=int, default=32, help="steps before the first update")
    p.add_argument("--ckpt_interval", type=int, default=2000)
    p.add_argument("--val_interval", type=int, default=5000)
    p.add_argument("--val_images", type=int, default=2, help="validation images rendered at each interval")
    p.add_argument("--log_interval", type=int, default=100)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", type=str, default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--no_progress", action="store_true")
    return p


def train_config(args: configargparse.Namespace) -> TrainConfig:
    """The options as a TrainConfig (which fills what a user leaves unset with the field's own defaults)."""
    altitude = None if args.ray_altitude_range is None else tuple(args.ray_altitude_range)
    return config_from_args(TrainConfig, args, ("dataset_path", "exp_name"),
                            chunk_paths=tuple(args.chunk_paths or ()), ray_altitude_range=altitude)


def config_from_argv(argv: list[str]) -> TrainConfig:
    """A TrainConfig from command-line words, as `mega-nerf-train` would build it (tests, benchmarks)."""
    return train_config(train_parser().parse_args(argv))


def main(argv: list[str] | None = None) -> None:
    config = train_config(train_parser().parse_args(argv))
    with locked({"--exp_name": [config.exp_name], "--chunk_paths": list(config.chunk_paths)}):
        final = Trainer(config).run()
    print(f"done: {final}")


def console() -> None:
    run_cli(main)
