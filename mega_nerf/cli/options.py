"""Options shared by every entry point, with Mega-NeRF's names so that its users' YAML configs carry over."""
from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

import configargparse

from mega_nerf.bounds import FOREGROUND_SCALE
from mega_nerf.data.dataset import Coordinates
from mega_nerf.errors import UserError
from mega_nerf.rays import SceneBounds

Config = TypeVar("Config")


def base_parser(description: str) -> configargparse.ArgParser:
    """A parser with the dataset and scene options. Unknown keys in a config file are ignored, so Mega-NeRF's
    own configs (which carry options we do not have) parse unchanged."""
    parser = configargparse.ArgParser(
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
