"""Options shared by every entry point, with Mega-NeRF's names so that its users' YAML configs carry over."""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import re
import sys
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import configargparse
import yaml

from mega_nerf.bounds import FOREGROUND_SCALE
from mega_nerf.data.dataset import Coordinates, check_not_in_dataset
from mega_nerf.errors import UserError, write_line
from mega_nerf.io import atomic_write
from mega_nerf.rays import SceneBounds

Config = TypeVar("Config")


def base_parser(description: str) -> configargparse.ArgParser:
    """A parser with the dataset and scene options. Mega-NeRF's own configs parse unchanged: keys we do not use
    are ignored, each reported in one line (MegaNerfParser)."""
    parser = MegaNerfParser(
        description=description,
        formatter_class=HelpFormatter,
        config_file_parser_class=configargparse.YAMLConfigFileParser,
        ignore_unknown_config_file_keys=True,
    )
    parser.add_argument("--config_file", "--config", is_config_file=True, help="YAML config file")
    parser.add_argument("--dataset_path", type=str, help="dataset in Mega-NeRF's layout")
    parser.add_argument("--ray_altitude_range", type=float, nargs=2, default=None,
                        help="[top, ground] in real-world down-coordinates; clips rays to this slab")
    parser.add_argument("--near", type=float, default=1.0, help="ray near bound, real-world units")
    parser.add_argument("--far", type=float, default=None,
                        help="ray far bound, real-world units (default: 1000 normalised units, i.e. unbounded)")
    parser.add_argument("--boundary_margin", type=float, default=1.15,
                        help="a point belongs to every cell within this factor of its nearest centroid's distance")
    parser.add_argument("--cluster_2d", action="store_true", help="partition on horizontal distance only")
    parser.add_argument("--foreground_scale", type=float, default=FOREGROUND_SCALE,
                        help="the foreground box's horizontal extent over the cameras' (full field resolution "
                             "inside, the world beyond contracted); partition and training must agree")
    return parser


# Scene options that the container carries from training and merging (ContainerInfo), so that a command
# rendering through it never reads them: a shared config file may hold them, a command line that gives them is
# refused (`parse_through_container`) rather than ignored.
CONTAINER_OPTIONS = ("near", "far", "ray_altitude_range", "boundary_margin", "cluster_2d", "foreground_scale")


def parse_through_container(parser: MegaNerfParser, argv: list[str] | None, command: str
                            ) -> configargparse.Namespace:
    """`parser`'s options from `argv` (None: sys.argv's) for a command that renders through a container, with
    one UserError line when the command line gives one of CONTAINER_OPTIONS; `command` names what uses the
    container (e.g. 'rendering')."""
    args = parser.parse_args(argv)
    given = parser.command_line_dests()
    for dest in CONTAINER_OPTIONS:
        if dest in given:
            raise UserError(f"{given[dest]}: {command} uses the container's own near/far bounds, altitude range "
                            "and partition (stored when it was merged); leave it out")
    return args


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


# ---- Mega-NeRF's option names (issue 22) -----------------------------------------------------------------------
# Its users' configs and command lines carry over: a Mega-NeRF name with our meaning is an alias of our option;
# one we do not implement is accepted and reported in one line naming it and why, never dropped without a word.

def _dataset_type(value: str) -> str:
    """Mega-NeRF's --dataset_type value as our --data_mode's: its 'filesystem' streams chunks from disk."""
    return "disk" if value == "filesystem" else value


# Mega-NeRF's name -> (our option, value conversion or None); added where the command has our option.
MEGA_NERF_ALIASES: dict[str, tuple[str, Any]] = {
    "coarse_samples": ("samples", None),
    "random_seed": ("seed", None),
    "dataset_type": ("data_mode", _dataset_type),
    "image_pixel_batch_size": ("ray_chunk", None),
}

# Mega-NeRF's options we do not implement -> (takes a value, why it is ignored).
MEGA_NERF_IGNORED: dict[str, tuple[bool, str]] = {
    "bg_layer_dim": (True, "no background NeRF: the world beyond the foreground box is contracted into the same "
                           "field (--bg_samples) and the sky is a direction-only colour"),
    "no_bg_nerf": (False, "no background NeRF to turn off (--bg_samples 0 drops the contracted far world)"),
    "use_cascade": (False, "the mlp field shades coarse and fine samples with one network"),
    "sh_deg": (True, "directions are encoded by spherical harmonics up to degree 3 (hash field) or "
                     "--pos_dir_dim frequencies (mlp field)"),
    "no_ellipse_bounds": (False, "the foreground is a box over the cameras' extent and the altitude slab "
                                 "(--foreground_scale), never an ellipsoid"),
    "ellipse_scale_factor": (True, "the foreground is a box; its size is --foreground_scale"),
    "all_val": (False, "evaluation scores the whole right half of every val image; validation during training, "
                       "its part inside the cell"),
    "skip_layers": (True, "the mlp field has one skip connection, at layer 4"),
    "no_center_pixels": (False, "rays always pass through pixel centres (+0.5)"),
    "no_shifted_softplus": (False, "each field has its own fixed density activation"),
    "model_chunk_size": (True, "samples are shaded per ray chunk; see --ray_chunk where a command has it"),
    "perturb": (True, "training always jitters samples within their intervals, rendering never"),
    "noise_std": (True, "no noise is added to densities"),
    "num_chunks": (True, "chunks hold --chunk_rays rays each"),
    "disk_flush_size": (True, "chunks hold --chunk_rays rays each"),
    "train_every": (True, "every training image is used"),
    "train_mega_nerf": (True, "one process trains one cell (--cluster_mask_path); merge_submodules joins them"),
    "no_resume_ckpt_state": (False, "a resumed run restores the whole state (model, optimiser, step, data)"),
    "detect_anomalies": (False, "a non-finite loss stops the run and names the step instead"),
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows every option's default and keeps the description's and epilog's line breaks. An option whose
    help already says its default in words (one that depends on the device or field), or whose default is None,
    is left as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.help and ("default" in action.help or action.default is None):
            return action.help
        return super()._get_help_string(action)


class MegaNerfParser(configargparse.ArgParser):
    """A parser that also takes Mega-NeRF's names (added when it first parses, once the command's options exist),
    checks a config file before parsing and the values after (`validate_config_file`, `validate_values`), and
    prints one line per option or config key it ignores."""

    def parse_args(self, args: Any = None, namespace: Any = None, **kwargs: Any) -> configargparse.Namespace:
        if not getattr(self, "_has_mega_nerf_names", False):
            add_mega_nerf_names(self)
            self._has_mega_nerf_names = True
        parsed = super().parse_args(args, namespace, **kwargs)
        for line in ignored_options(self, parsed):
            write_line(line)
        return parsed

    def error(self, message: str) -> NoReturn:
        """A bad command line in one line (argparse would print the whole usage first: dozens of lines); a value
        of the wrong type that came from a config file is named by the file and its key instead."""
        bad = re.match(r"argument (--\w+)[^:]*: (invalid .*)", message)
        if bad:
            dest = next((a.dest for a in self._actions if bad.group(1) in a.option_strings), None)
            source = self.config_file_sources().get(dest)
            if source is not None:
                write_line(f"error: {source}: {bad.group(2)}")
                self.exit(2)
        write_line(f"error: {message} (see {self.prog} --help)")
        self.exit(2)

    def parse_known_args(self, args: Any = None, namespace: Any = None, **kwargs: Any) -> Any:
        words = list(sys.argv[1:] if args is None else args)
        for i, word in enumerate(words):
            if word in ("--config_file", "--config") and i + 1 < len(words):
                validate_config_file(self, words[i + 1])
            elif word.startswith(("--config_file=", "--config=")):
                validate_config_file(self, word.split("=", 1)[1])
        parsed, rest = super().parse_known_args(args, namespace, **kwargs)
        validate_values(parsed, self.config_file_sources())
        return parsed, rest

    def command_line_dests(self) -> dict[str, str]:
        """The options the last parse took from the command line, under any spelling (a Mega-NeRF name, an
        unambiguous prefix): dest -> the word as typed."""
        sources = self.get_source_to_settings_dict()
        words = [w.split("=", 1)[0] for w in sources.get("command_line", {}).get("", (None, []))[1]
                 if w.startswith("--") and w != "--"]
        return {action.dest: w for action in self._actions for name in action.option_strings for w in words
                if name.startswith(w)}

    def config_file_sources(self) -> dict[str, str]:
        """'<file>: <key>' for each option the last parse took from a config file, so that an error names the line
        to mend. The command line wins over the file under any spelling of the option (a Mega-NeRF name writes the
        same value as ours, and argparse takes an unambiguous prefix), so such an option is left out."""
        sources = self.get_source_to_settings_dict()
        given = self.command_line_dests()
        return {action.dest: f"{source.split('|', 1)[1]}: {key}"
                for source, settings in sources.items() if source.startswith("config_file|")
                for key, (action, _) in settings.items() if action is not None and action.dest not in given}


def add_mega_nerf_names(parser: configargparse.ArgParser) -> None:
    """Add Mega-NeRF's aliases of the parser's options and its ignored options (call once all options exist)."""
    dests = {action.dest for action in parser._actions}
    names = {s for action in parser._actions for s in action.option_strings}
    for alias, (ours, convert) in MEGA_NERF_ALIASES.items():
        if ours in dests and f"--{alias}" not in names:
            parser.add_argument(f"--{alias}", dest=ours, default=argparse.SUPPRESS,
                                type=convert or _type_of(parser, ours), help=f"Mega-NeRF's name for --{ours}")
        elif f"--{alias}" not in names:  # e.g. train.py's --image_pixel_batch_size: accepted, said to be ignored
            parser.add_argument(f"--{alias}", dest=f"ignored_{alias}", default=None, nargs="+",
                                help=f"Mega-NeRF's name for --{ours}, which this command does not have; ignored")
    for name, (takes_value, why) in MEGA_NERF_IGNORED.items():
        if f"--{name}" not in names:
            arity = {"nargs": "+"} if takes_value else {"action": "store_const", "const": True}
            parser.add_argument(f"--{name}", dest=f"ignored_{name}", default=None, **arity,
                                help=f"Mega-NeRF's; ignored: {why}")


def _type_of(parser: configargparse.ArgParser, dest: str) -> Any:
    return next(action.type for action in parser._actions if action.dest == dest)


def true_or_false(text: str) -> bool:
    """A boolean option's value as a config file or a command line writes it (true / false, yes / no, 1 / 0)."""
    value = str(text).strip().lower()
    if value in ("true", "yes", "1"):
        return True
    if value in ("false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _option_names(parser: configargparse.ArgParser) -> set[str]:
    return {s.lstrip("-") for action in parser._actions for s in action.option_strings}


# Every option name of our configargparse commands (train, train_cells, eval, partition, render, export, merge,
# view, preview): a config shared by them holds keys for each. Listed, not collected from their parsers, so that
# reading a config imports no other command (0.11-0.15 s a process on a 2-core CPU, 0.02-0.03 s on an H200
# machine, bench/RESULTS.md, twenty-eighth session; tests/test_configs.py checks the list against the parsers).
EVERY_COMMAND_OPTION = frozenset({
    "affine_appearance", "allow_empty_cells", "appearance", "appearance_dim", "batch_size", "bg_samples",
    "boundary_margin", "centroid_path", "chunk", "chunk_paths", "chunk_prefix", "chunk_rays", "ckpt_interval",
    "ckpt_path", "ckpt_prefix", "cluster_2d", "cluster_mask_path", "config", "config_file", "container_path",
    "data_mode", "dataparser_transforms", "dataset_path", "density_threshold", "device", "dist_chunk",
    "distortion_loss", "eval_protocol", "exp_name", "exp_prefix", "far", "field", "fine_samples",
    "foreground_scale", "fps", "frames", "grid_dim", "h", "hash_decay", "hash_levels", "height", "help",
    "horizon_background", "host", "image_store", "keep_checkpoints", "layer_dim", "layers", "log2_hashmap_size",
    "log_interval", "lpips_weights_dir", "lr", "lr_decay_epochs", "lr_decay_factor", "mask_path", "max_points",
    "max_resolution", "merge_output", "micro_batch", "min_views", "near", "near_gradient_distance", "no_amp",
    "no_cuda_graphs", "no_horizon_background", "no_progress", "occupancy_interval", "occupancy_resolution",
    "occupancy_warmup", "output", "partition", "path", "path_file", "point_resolution", "port", "pos_dir_dim",
    "pos_xyz_dim", "preview_samples", "ray_altitude_range", "ray_chunk", "ray_samples", "real_units", "resolution",
    "resume", "samples", "seed", "sh_degree", "size", "source_frame", "target_fps", "timeout_minutes",
    "train_iterations", "train_scale_factor", "val_embeddings_only", "val_images", "val_interval",
    "val_scale_factor", "viewer",
})


# Ranges of options, wherever they appear: (lowest allowed, whether the lowest itself is allowed).
POSITIVE = ("batch_size", "micro_batch", "train_iterations", "chunk_rays", "samples", "ckpt_interval",
            "val_interval", "log_interval", "hash_levels", "log2_hashmap_size", "max_resolution",
            "occupancy_resolution", "occupancy_interval", "ray_chunk", "dist_chunk", "ray_samples", "frames", "fps",
            "lr", "lr_decay_factor", "foreground_scale", "timeout_minutes", "train_scale_factor", "val_scale_factor")
NON_NEGATIVE = ("near", "far", "fine_samples", "bg_samples", "appearance_dim", "val_images", "occupancy_warmup",
                "lr_decay_epochs", "seed", "distortion_loss", "hash_decay", "keep_checkpoints",
                "near_gradient_distance")
AT_LEAST_ONE = ("boundary_margin",)


def validate_config_file(parser: configargparse.ArgParser, file: str) -> None:
    """One line naming the key and `file` for a key that looks like a typo of one of our options, a value of the
    wrong type, or the wrong number of values. Other unknown keys (Mega-NeRF's own options among them) are
    reported by `ignored_options`."""
    try:
        data = yaml.safe_load(Path(file).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise UserError(f"{file}: not a readable YAML config ({type(e).__name__})") from None
    if data is None:
        return
    if not isinstance(data, dict):
        raise UserError(f"{file}: a config file holds 'key: value' lines")
    actions = {s.lstrip("-"): a for a in parser._actions for s in a.option_strings}
    ours = EVERY_COMMAND_OPTION | set(actions)
    known = ours | set(MEGA_NERF_ALIASES) | set(MEGA_NERF_IGNORED)
    for key, value in data.items():
        if key not in known:  # a near miss of one of our names is a typo; anything else is reported as ignored
            close = difflib.get_close_matches(str(key), ours, n=1, cutoff=0.8)
            if close:
                raise UserError(f"{file}: unknown key '{key}' (did you mean '{close[0]}'?)")
            continue
        action = actions.get(key)
        if action is None or value is None or action.nargs == 0:  # a flag: configargparse reads true / false
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


def validate_values(args: configargparse.Namespace, sources: dict[str, str] | None = None) -> None:
    """One line naming the option for a non-finite number or a value out of its range (POSITIVE, ...): as
    `sources` gives it for a value from a config file ('<file>: <key>'), else as --name."""
    sources = sources or {}
    for name, value in vars(args).items():
        option = sources.get(name, f"--{name}")
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise UserError(f"{option} must be finite, got {' '.join(map(str, values))}")
        if value is None or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if name in POSITIVE and value <= 0:
            raise UserError(f"{option} must be positive, got {value}")
        if name in NON_NEGATIVE and value < 0:
            raise UserError(f"{option} must not be negative, got {value}")
        if name in AT_LEAST_ONE and value < 1:
            raise UserError(f"{option} must be at least 1, got {value}")


def ignored_options(parser: configargparse.ArgParser, args: configargparse.Namespace) -> list[str]:
    """One line per Mega-NeRF option given but ignored, and per config-file key that no command of ours reads
    (a key another command reads, e.g. eval's val_scale_factor in a config train is given, is for that one)."""
    lines = [f"ignoring --{name} (Mega-NeRF's): {why}" for name, (_, why) in MEGA_NERF_IGNORED.items()
             if getattr(args, f"ignored_{name}", None) is not None]
    lines += [f"ignoring --{alias} (Mega-NeRF's name for --{ours}, which this command does not have)"
              for alias, (ours, _) in MEGA_NERF_ALIASES.items() if getattr(args, f"ignored_{alias}", None) is not None]
    config = getattr(args, "config_file", None)
    if config:
        keys = [k for k in (yaml.safe_load(Path(config).read_text()) or {}) if k not in _option_names(parser)]
        if keys:
            known = EVERY_COMMAND_OPTION | {alias for alias, (ours, _) in MEGA_NERF_ALIASES.items()
                                            if ours in EVERY_COMMAND_OPTION}
            lines += [f"ignoring '{key}' in {config}: no command reads it" for key in keys if key not in known]
    return lines


# ---- the resolved options of a run (issue 22) ------------------------------------------------------------------

# config fields whose option is their negation
INVERTED = {"progress": "no_progress", "amp": "no_amp", "cuda_graphs": "no_cuda_graphs",
            "horizon_background": "no_horizon_background"}


def check_own_config(path: Path, keys: set[str]) -> None:
    """Refuse to replace a config.yaml that another command or a dataset wrote (one-line UserError): a run's
    output folder given as a dataset's, or a training run's given to eval, would lose the options kept there.
    Another command's is one holding options that another of our commands has and this one (`keys`) lacks; an
    option since removed, or an unreadable file, does not make it so. A dataset's folder, or one inside it, is
    refused too (data.dataset.check_not_in_dataset)."""
    check_not_in_dataset(path.parent)
    if not path.is_file():
        return
    try:
        saved = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return
    extra = set(saved) - keys if isinstance(saved, dict) else set()
    foreign = sorted(extra & EVERY_COMMAND_OPTION)
    if foreign:
        raise UserError(f"{path}: holds another command's options ({', '.join(map(str, foreign[:3]))}"
                        f"{', ...' if len(foreign) > 3 else ''}); give this run's output a folder of its own")


def record_options(config: Any, folder: Path) -> Path:
    """Save a run's resolved options as `folder/config.yaml`, which the same command reads back through
    --config_file (nerfstudio's config.yml habit), and print them in one line. Unset (None or empty) options are
    left out, and so are those whose default was filled for this machine (TrainConfig.machine_filled)."""
    values: dict[str, Any] = {}
    machine = getattr(config, "machine_filled", ())  # filled for this machine: another one fills its own
    for key, value in dataclasses.asdict(config).items():
        if key in machine or key == "machine_filled":
            continue
        if key in INVERTED:
            key, value = INVERTED[key], not value
        if value is not None and value != ():  # an empty list would read back as an option without values
            values[key] = list(value) if isinstance(value, tuple) else value
    path = folder / "config.yaml"
    check_own_config(path, set(values) | {f.name for f in dataclasses.fields(config)} | set(INVERTED.values()))
    atomic_write(path, yaml.safe_dump(values, sort_keys=False).encode())
    print("options: " + ", ".join(f"{k}={v}" for k, v in values.items()) + f" (saved to {path})")
    return path
