"""`mega-nerf-eval` (and `python mega_nerf/eval.py`): evaluate a merged container on the val images.

Distributed: `python -m torch.distributed.run --standalone --nproc_per_node N mega_nerf/eval.py ...`
"""
from __future__ import annotations

from pathlib import Path

import configargparse

from mega_nerf.cli.options import base_parser, config_from_args, parse_through_container, record_options
from mega_nerf.clock import PartsClock, process_start
from mega_nerf.data.dataset import MEGA_NERF, PROTOCOLS, check_not_in_dataset
from mega_nerf.evaluation.evaluate import EvalConfig, evaluate
from mega_nerf.lock import locked


def eval_parser() -> configargparse.ArgParser:
    p = base_parser("Evaluate a merged container on the val images, optionally distributed. Rays use "
                    "the near/far/altitude range stored in the container: --near, --far, --ray_altitude_range, "
                    "--boundary_margin, --cluster_2d and --foreground_scale are read from a shared config file "
                    "but refused on the command line.")
    p.add_argument("--exp_name", type=str, help="output directory (renders and metrics.json)")
    p.add_argument("--container_path", type=str, help="container file from scripts/merge_submodules.py")
    p.add_argument("--val_scale_factor", type=int, default=4,
                   help="downsample val images by this (Mega-NeRF's default, 4; the synthetic city's config sets 1)")
    p.add_argument("--train_scale_factor", type=int, default=1,
                   help="the scale the submodules were trained at (to check the container's dataset)")
    p.add_argument("--eval_protocol", choices=PROTOCOLS, default=MEGA_NERF,
                   help="mega-nerf: score the right half of each val image (its left half trained its appearance); "
                        "strict: score whole val images, never trained, with the nearest training image's "
                        "appearance (train with the same option)")
    p.add_argument("--lpips_weights_dir", type=str, default=None,
                   help="folder of torchvision's AlexNet / VGG16 weights for LPIPS, never downloaded (linear "
                        "layers: the lpips package's; see mega_nerf/evaluation/lpips.py; default "
                        "~/.cache/mega_nerf/lpips); without them LPIPS is reported as null")
    p.add_argument("--ray_chunk", type=int, default=None,
                   help="rays rendered at once, bounds memory (default: 262144 on a GPU, 8192 on a CPU)")
    p.add_argument("--timeout_minutes", type=float, default=10,
                   help="how long a rank waits for the others before the job fails")
    p.add_argument("--no_progress", action="store_true", help="no progress bar (logs, benchmarks)")
    return p


def eval_config(args: configargparse.Namespace) -> EvalConfig:
    """The options as an EvalConfig (one-line errors for missing ones)."""
    return config_from_args(EvalConfig, args, ("dataset_path", "exp_name", "container_path"))


def config_from_argv(argv: list[str] | None) -> EvalConfig:
    """An EvalConfig from command-line words (None: sys.argv's), as `mega-nerf-eval` builds it; the scene
    options the container carries are refused on the command line (options.parse_through_container)."""
    return eval_config(parse_through_container(eval_parser(), argv, "evaluation"))


def main(argv: list[str] | None = None) -> None:
    """Evaluate as the options say; rank 0 prints where the time went since its process started (from the call
    when /proc is missing)."""
    clock = PartsClock(process_start())
    clock.mark("start-up")  # the interpreter and the imports
    config = config_from_argv(argv)
    check_not_in_dataset(config.exp_name)  # before the lock, whose file lies beside the folder
    with locked({"--exp_name": [config.exp_name]}):
        evaluate(config, on_ready=lambda: record_options(config, Path(config.exp_name)), clock=clock)
