"""Options shared by every entry point, with Mega-NeRF's names so that its users' YAML configs carry over."""
from __future__ import annotations

import dataclasses
import difflib
import math
import sys
from pathlib import Path
from typing import Any, TypeVar

import configargparse
import yaml

from mega_nerf.bounds import FOREGROUND_SCALE
from mega_nerf.data.dataset import Coordinates
from mega_nerf.errors import UserError
from mega_nerf.rays import SceneBounds

Config = TypeVar("Config")


def base_parser(description: str) -> configargparse.ArgParser:
    """A parser with the dataset and scene options. Unknown keys in a config file are ignored, so Mega-NeRF's
    own configs (which carry options we do not have) parse unchanged."""
    parser = _CheckedParser(
        description=description,
        config_file_parser_class=configargparse.YAMLConfigFileParser,
        ignore_unknown_config_file_keys=True,
    )
    parser.add_argument("--config_file", "--config", is_config_file=True, help="YAML config file")
    parser.add_argument("--dataset_path", type=str, help="dataset in Mega-NeRF's layout")
    parser.add_argument("--ray_altitude_range", type=float, nargs=2, default=None,
                        help="[top, ground] in real-world down-coordinates; clips rays to this slab")
    parser.add_argument("--near", type=float, default=1.0, help="ray near bound, real-world units")
    parser.add_argument("--far", type=float, default=None,
                        help="ray far bound, real-world units (default: 2 in normalised units)")
    parser.add_argument("--boundary_margin", type=float, default=1.15,
                        help="a point belongs to every cell within this factor of its nearest centroid's distance")
    parser.add_argument("--cluster_2d", action="store_true", help="partition on horizontal distance only")
    parser.add_argument("--foreground_scale", type=float, default=FOREGROUND_SCALE,
                        help="the foreground box's horizontal extent over the cameras' (full field resolution "
                             "inside, the world beyond contracted); partition and training must agree")
    return parser


def require(value: object, option: str) -> None:
    """One-line error when a required option is missing."""
    if value is None:
        raise UserError(f"missing option --{option}")


def scene_bounds(args: configargparse.Namespace, coordinates: Coordinates) -> SceneBounds:
    """The normalised scene bounds from the real-world options --near, --far and --ray_altitude_range."""
    return SceneBounds.from_real(args.near, args.far, args.ray_altitude_range, coordinates)


def config_from_args(cls: type[Config], args: configargparse.Namespace, required: tuple[str, ...] = (),
                     **values: Any) -> Config:
    """A config dataclass `cls` from the parsed options of the same names (`progress` is the opposite of
    --no_progress), `values` taking precedence; a missing `required` option is a one-line error."""
    for option in required:
        require(getattr(args, option), option)
    names = {f.name for f in dataclasses.fields(cls)}
    given = {name: getattr(args, name) for name in names if hasattr(args, name)}
    if "progress" in names:
        given["progress"] = not args.no_progress
    return cls(**{**given, **values})


# Ranges of options, wherever they appear: (lowest allowed, whether the lowest itself is allowed).
POSITIVE = ("batch_size", "micro_batch", "train_iterations", "chunk_rays", "samples", "ckpt_interval",
            "val_interval", "log_interval", "hash_levels", "log2_hashmap_size", "max_resolution",
            "occupancy_resolution", "occupancy_interval", "ray_chunk", "dist_chunk", "ray_samples", "frames", "fps",
            "lr", "lr_decay_factor", "foreground_scale", "timeout_minutes", "train_scale_factor", "val_scale_factor")
NON_NEGATIVE = ("near", "far", "fine_samples", "bg_samples", "appearance_dim", "val_images", "occupancy_warmup",
                "lr_decay_epochs", "seed")
AT_LEAST_ONE = ("boundary_margin",)


def _option_names() -> set[str]:
    """Every option of every command that reads config files (a key another command uses is not a typo)."""
    from mega_nerf.cli import eval, merge, partition, render, train  # here: they import this module
    parsers = (eval.eval_parser(), merge.merge_parser(), partition.partition_parser(), render.render_parser(),
               train.train_parser())
    return {a.dest for p in parsers for a in p._actions}


def validate_config_file(parser: configargparse.ArgParser, file: str) -> None:
    """One line naming the key and `file` for a key that looks like a typo of one of our options, a value of the
    wrong type, or the wrong number of values. Other unknown keys (Mega-NeRF's own options) are ignored."""
    try:
        data = yaml.safe_load(Path(file).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise UserError(f"{file}: not a readable YAML config ({type(e).__name__})") from None
    if data is None:
        return
    if not isinstance(data, dict):
        raise UserError(f"{file}: a config file holds 'key: value' lines")
    actions = {a.dest: a for a in parser._actions}
    known = _option_names() | set(actions)
    for key, value in data.items():
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.8)
            if close:
                raise UserError(f"{file}: unknown key '{key}' (did you mean '{close[0]}'?)")
            continue
        action = actions.get(key)
        if action is None or value is None:
            continue
        values = value if isinstance(value, list) else [value]
        if action.nargs is None and isinstance(value, list):
            raise UserError(f"{file}: {key} takes one value, got {len(value)}")
        if isinstance(action.nargs, int) and len(values) != action.nargs:
            raise UserError(f"{file}: {key} needs {action.nargs} values, got {len(values)}")
        for v in values:
            if action.type in (int, float):
                try:
                    action.type(v)
                except (TypeError, ValueError):
                    kind = "an integer" if action.type is int else "a number"
                    raise UserError(f"{file}: {key} must be {kind}, got {v!r}") from None


def validate_values(args: configargparse.Namespace) -> None:
    """One line naming the option for a non-finite number or a value out of its range (POSITIVE, ...)."""
    for name, value in vars(args).items():
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise UserError(f"--{name} must be finite, got {' '.join(map(str, values))}")
        if value is None or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if name in POSITIVE and value <= 0:
            raise UserError(f"--{name} must be positive, got {value}")
        if name in NON_NEGATIVE and value < 0:
            raise UserError(f"--{name} must not be negative, got {value}")
        if name in AT_LEAST_ONE and value < 1:
            raise UserError(f"--{name} must be at least 1, got {value}")


class _CheckedParser(configargparse.ArgParser):
    """configargparse's parser with the config file checked before parsing and the values after."""

    def parse_known_args(self, args: Any = None, namespace: Any = None, **kwargs: Any) -> Any:
        words = list(sys.argv[1:] if args is None else args)
        for i, word in enumerate(words):
            if word in ("--config_file", "--config") and i + 1 < len(words):
                validate_config_file(self, words[i + 1])
            elif word.startswith(("--config_file=", "--config=")):
                validate_config_file(self, word.split("=", 1)[1])
        parsed, rest = super().parse_known_args(args, namespace, **kwargs)
        validate_values(parsed)
        return parsed, rest
