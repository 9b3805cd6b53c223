"""`mega-nerf-train` (and `python mega_nerf/train.py`): train one submodule (one cell's rays) or one model of the
whole scene. Builds a TrainConfig from the options and hands it to the Trainer."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import configargparse

from mega_nerf.cli.options import base_parser, config_from_args, record_options, true_or_false
from mega_nerf.clock import process_start
from mega_nerf.data.dataset import MEGA_NERF, PROTOCOLS, check_not_in_dataset
from mega_nerf.errors import UserError
from mega_nerf.fields import FIELDS
from mega_nerf.fields.encoding import SH_DEGREE
from mega_nerf.lock import locked
from mega_nerf.training.config import TrainConfig
from mega_nerf.training.trainer import Trainer


def train_parser() -> configargparse.ArgParser:
    p = base_parser("Train one submodule (one cell's rays) or, without a mask, one model of the whole scene.")
    p.add_argument("--exp_name", type=str, help="experiment directory (checkpoints, logs, renders)")
    p.add_argument("--chunk_paths", type=str, nargs="+", help="directories for the shuffled ray chunks")
    p.add_argument("--cluster_mask_path", type=str, default=None, help="this cell's mask directory (M/<k>)")
    add_training_options(p)
    p.add_argument("--viewer", type=int, nargs="?", const=7007, default=None, metavar="PORT",
                   help="serve the field being trained to the browser on PORT (7007 when none is given), rendering "
                        "at most 3%% of the time and never holding up a step (mega_nerf/viewer/watch.py)")
    return p


def add_training_options(p: configargparse.ArgParser) -> None:
    """How to train a model (every option of train.py but where its files go): train.py's and train_cells.py's."""
    p.add_argument("--data_mode", choices=("disk", "memory"), default="disk",
                   help="disk: stream shuffled chunks from --chunk_paths; memory: keep every ray in RAM")
    p.add_argument("--chunk_rays", type=int, default=2 ** 22,
                   help="rays per chunk: what the stream loads at once (a random sample of the cell)")
    p.add_argument("--image_store", type=str, default=None,
                   help="folder of the decoded images every cell's chunks share (default: image_store/ beside the "
                        "first --chunk_paths directory)")
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
    p.add_argument("--bg_samples", type=int, default=96,
                   help="samples per ray beyond the foreground box (the contracted far world; 0: none). 96 against 64 "
                        "with the default table: city +0.18 dB at 3000 steps, 5 %% fewer rays/s (bench/RESULTS.md)")
    p.add_argument("--distortion_loss", type=float, default=0.0,
                   help="weight of mip-NeRF 360's distortion loss, which gathers each ray's weight in one span "
                        "(0: off)")
    p.add_argument("--hash_decay", type=float, default=0.0,
                   help="weight of the hash grid's normalised weight decay (Zip-NeRF's; 0: off)")
    p.add_argument("--near_gradient_distance", type=float, default=None,
                   help="samples nearer their camera than this (real-world units, as --near) keep (distance / "
                        "this)^2 of their gradient, so that few views cannot build floaters in front of it (0: off; "
                        "hash: 1.5x the median distance between neighbouring cameras; mlp: 0). street +1.2-1.6 dB "
                        "at 3000 steps, oblique and city level (bench/RESULTS.md)")
    p.add_argument("--val_embeddings_only", action="store_true",
                   help="val images' left halves train only their own appearance embeddings, not the field (Mega-NeRF "
                        "trains both): the field cannot then fit itself to them; costs about 15%% of a step on an H200")
    p.add_argument("--appearance_dim", type=int, default=None, help="appearance embedding width (hash 8, mlp 48)")
    p.add_argument("--affine_appearance", action="store_true",
                   help="appearance as a per-image affine transform of the colour (Mega-NeRF's option), not an "
                        "input of the colour MLP")
    p.add_argument("--no_horizon_background", dest="horizon_background", action="store_false",
                   help="show a ray heading down the background of its own direction (default, with "
                        "--ray_altitude_range: the background at the horizon of its heading, since such a ray ends "
                        "on the ground; one colour per heading that the sky there shares, it paints less of the "
                        "ground through a transparent field: oblique preset, 3000 steps, +0.48 dB over three seeds, "
                        "city level; README)")
    # Before it became the default: `--horizon_background` on command lines, `horizon_background: BOOL` in saved
    # config.yaml files
    p.add_argument("--horizon_background", dest="horizon_background", nargs="?", const=True, type=true_or_false,
                   default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.add_argument("--layers", type=int, default=None, help="mlp field: layers of the density MLP (8)")
    p.add_argument("--layer_dim", type=int, default=None, help="mlp field: their width (256)")
    p.add_argument("--pos_xyz_dim", type=int, default=None, help="mlp field: position encoding frequencies (12)")
    p.add_argument("--pos_dir_dim", type=int, default=None, help="mlp field: direction encoding frequencies (4)")
    p.add_argument("--hash_levels", type=int, default=16, help="hash-grid levels")
    p.add_argument("--log2_hashmap_size", type=int, default=22,
                   help="hash-table entries per level, as a power of two (22 against 21 at 3000 steps: city +0.14 "
                        "dB, 6 %% fewer rays/s; with 96 --bg_samples against 21 and 64, oblique_aa +0.36 and +0.40 dB "
                        "after 8 minutes, two seeds; 79 M parameters, 301 MiB a submodule; 19 on a small GPU; README)")
    p.add_argument("--max_resolution", type=int, default=2048, help="finest hash-grid resolution")
    p.add_argument("--sh_degree", type=int, default=SH_DEGREE, choices=range(SH_DEGREE + 1),
                   help="hash field: degree of the view direction's spherical harmonics in the colour (0: a colour "
                        "independent of the view direction)")
    p.add_argument("--occupancy_resolution", type=int, default=128, help="occupancy-grid cells along each axis")
    p.add_argument("--occupancy_interval", type=int, default=8,
                   help="steps between occupancy updates (every 262,144 rays at the hash default batch)")
    p.add_argument("--occupancy_warmup", type=int, default=32, help="steps before the first update")
    p.add_argument("--ckpt_interval", type=int, default=2000, help="steps between checkpoints")
    p.add_argument("--keep_checkpoints", type=int, default=3,
                   help="checkpoints kept, the latest; each save deletes older ones (0: keep all). One is about 0.5 "
                        "GB at the hash field's defaults")
    p.add_argument("--val_interval", type=int, default=5000, help="steps between validation renders")
    p.add_argument("--val_images", type=int, default=2, help="validation images rendered at each interval")
    p.add_argument("--log_interval", type=int, default=100, help="steps between logged scalars")
    p.add_argument("--eval_protocol", choices=PROTOCOLS, default=MEGA_NERF,
                   help="mega-nerf: val images train their left halves (their right halves are scored); strict: "
                        "no pixel of a val image trains (evaluate with the same option)")
    p.add_argument("--seed", type=int, default=42, help="seeds the field, the shuffle and the samples")
    p.add_argument("--no_amp", dest="amp", action="store_false",
                   help="train in float32 on a GPU (default: bfloat16 autocast)")
    p.add_argument("--no_cuda_graphs", dest="cuda_graphs", action="store_false",
                   help="issue every kernel of a GPU step from Python (default: replay the shading, backward and "
                        "update as CUDA graphs, about twice as fast where the host is the bottleneck)")
    p.add_argument("--ckpt_path", type=str, default=None,
                   help="start from this checkpoint (same dataset and field) when --exp_name holds none")
    p.add_argument("--device", type=str, default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--no_progress", action="store_true")


MLP_SIZES = ("layers", "layer_dim", "pos_xyz_dim", "pos_dir_dim")


def train_config(args: configargparse.Namespace, **values: Any) -> TrainConfig:
    """The options as a TrainConfig (which fills what a user leaves unset with the field's own defaults);
    `values` take precedence (train_cells gives each cell's directories)."""
    if args.field != "mlp":
        for option in MLP_SIZES:
            if getattr(args, option) is not None:
                print(f"ignoring --{option}: it sizes the mlp field (Mega-NeRF's network), not --field {args.field}",
                      file=sys.stderr)
    if args.field != "hash" and args.sh_degree != SH_DEGREE:
        print(f"ignoring --sh_degree: it sets the hash field's direction encoding; --field {args.field} encodes "
              "directions by --pos_dir_dim", file=sys.stderr)
    if not args.horizon_background and args.ray_altitude_range is None:
        print("ignoring --no_horizon_background: only with --ray_altitude_range does a ray heading down see the "
              "horizon's background (it ends on its ground plane only there)", file=sys.stderr)
    altitude = None if args.ray_altitude_range is None else tuple(args.ray_altitude_range)
    required = tuple(option for option in ("dataset_path", "exp_name") if option not in values)
    given = {"chunk_paths": tuple(getattr(args, "chunk_paths", None) or ()), "ray_altitude_range": altitude}
    return config_from_args(TrainConfig, args, required, **{**given, **values})


def config_from_argv(argv: list[str]) -> TrainConfig:
    """A TrainConfig from command-line words, as `mega-nerf-train` would build it (tests, benchmarks)."""
    return train_config(train_parser().parse_args(argv))


def check_not_in_partition(config: TrainConfig) -> None:
    """One UserError line when the run's folder or chunks would lie in its masks' folder, or in the partition's
    that holds it (`--exp_name masks/0` trained into cell 0's masks)."""
    if not config.cluster_mask_path:
        return
    masks = Path(config.cluster_mask_path).resolve()  # a link's own parent is not the partition's folder
    root = masks.parent if (masks.parent / "params.pt").is_file() else masks
    for option, path in [("--exp_name", config.exp_name), *(("--chunk_paths", c) for c in config.chunk_paths)]:
        if Path(path).resolve().is_relative_to(root):
            raise UserError(f"{option} {path}: inside the partition's folder {root}; give this run a folder of its "
                            "own")


def main(argv: list[str] | None = None) -> None:
    args = train_parser().parse_args(argv)
    config = train_config(args)
    if args.viewer is not None:  # viser only when asked for
        from mega_nerf.viewer.server import check_address
        from mega_nerf.viewer.watch import HOST, watch

        check_address(HOST, args.viewer, "--viewer")  # one line now, not after the start-up
    check_not_in_dataset(config.exp_name)  # before the lock, whose file lies beside the folder
    check_not_in_partition(config)
    with locked({"--exp_name": [config.exp_name], "--chunk_paths": list(config.chunk_paths)}):
        trainer = Trainer(config, started=process_start(),
                          on_ready=lambda: record_options(config, Path(config.exp_name)))
        if args.viewer is not None:
            trainer.on_step = watch(trainer, args.viewer).on_step
        final = trainer.run()
    print(f"done: {final}")
