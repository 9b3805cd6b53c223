"""The bundled configs/ against Mega-NeRF's current ones, and Mega-NeRF's option names (aliases, ignored keys)."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest
import torch
import yaml

from mega_nerf.cli.convert import default_images_path
from mega_nerf.cli.eval import eval_parser
from mega_nerf.cli.options import EVERY_COMMAND_OPTION, MEGA_NERF_IGNORED, _option_names, record_options
from mega_nerf.cli.partition import partition_parser
from mega_nerf.cli.train import train_config, train_parser
from mega_nerf.fields import build_field, config_differences
from mega_nerf.training.trainer import field_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# Mega-NeRF's configs/mega-nerf/<scene>.yaml at cmusatyalab/mega-nerf commit
# 76d8d76b66d70f8a0819defc0cef4fb9aa251672 (2022-07-21; the values date from 49058d7, "New poses"), read with git show.
MEGA_NERF = {
    "building": {"ray_altitude_range": [8, 50]},
    "rubble": {"ray_altitude_range": [11, 38]},
    "campus": {"ray_altitude_range": [3, 132]},
    "residence": {"ray_altitude_range": [30, 118]},
    "sci-art": {"ray_altitude_range": [-14, 70]},
    "quad": {"ray_altitude_range": [-55, 10], "val_scale_factor": 1, "near": 0, "cluster_2d": True},
}


def test_every_bundled_config_is_in_the_table() -> None:
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted(MEGA_NERF)


@pytest.mark.parametrize("scene", sorted(MEGA_NERF))
def test_bundled_config_has_mega_nerfs_current_values(scene: str) -> None:
    config = str(CONFIGS / f"{scene}.yaml")
    expected = {"near": 1.0, "cluster_2d": False, **MEGA_NERF[scene]}
    train = train_parser().parse_args(["--config_file", config])
    partition = partition_parser().parse_args(["--config_file", config])
    for args in (train, partition):
        assert args.ray_altitude_range == [float(v) for v in expected["ray_altitude_range"]]
        assert args.near == expected["near"] and args.cluster_2d == expected["cluster_2d"]
    assert train.train_scale_factor == 4
    evaluation = eval_parser().parse_args(["--config_file", config])
    assert evaluation.val_scale_factor == expected.get("val_scale_factor", 4)
    assert evaluation.train_scale_factor == 4


# Every key of Mega-NeRF's 48 configs (its configs/*/*.yaml at the commit above), with a value each.
MEGA_NERF_KEYS = {"ray_altitude_range": [8, 50], "val_scale_factor": 1, "near": 0, "all_val": True, "cluster_2d": True,
                  "layer_dim": 2048, "bg_layer_dim": 2048, "no_ellipse_bounds": True, "no_bg_nerf": True,
                  "appearance_dim": 0, "use_cascade": True, "sh_deg": 2, "pos_dir_dim": 0}


def write_config(path: Path, values: dict) -> str:
    path.write_text(yaml.safe_dump(values))
    return str(path)


@pytest.mark.parametrize(("alias", "ours", "value", "expected"), [
    ("coarse_samples", "samples", "64", 64), ("random_seed", "seed", "7", 7),
    ("dataset_type", "data_mode", "filesystem", "disk"), ("dataset_type", "data_mode", "memory", "memory")])
def test_mega_nerf_alias_parses_to_our_option(alias: str, ours: str, value: str, expected: object,
                                               tmp_path: Path) -> None:
    ours_value = "disk" if value == "filesystem" else value
    direct = getattr(train_parser().parse_args([f"--{ours}", ours_value]), ours)
    on_line = getattr(train_parser().parse_args([f"--{alias}", value]), ours)
    config = write_config(tmp_path / "c.yaml", {alias: value})
    in_config = getattr(train_parser().parse_args(["--config_file", config]), ours)
    assert direct == on_line == in_config == expected
    # the command line wins over the config, whichever name either uses
    assert getattr(train_parser().parse_args(["--config_file", config, f"--{ours}", ours_value]), ours) == expected


def test_image_pixel_batch_size_is_evals_ray_chunk() -> None:
    assert eval_parser().parse_args(["--image_pixel_batch_size", "4096"]).ray_chunk == 4096


@pytest.mark.parametrize("name", sorted(MEGA_NERF_IGNORED))
def test_each_ignored_option_prints_one_line(name: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    takes_value, why = MEGA_NERF_IGNORED[name]
    words = [f"--{name}", "3"] if takes_value else [f"--{name}"]
    config = write_config(tmp_path / "c.yaml", {name: 3 if takes_value else True})
    for argv in (words, ["--config_file", config]):
        train_parser().parse_args(argv)
        lines = capsys.readouterr().err.splitlines()
        assert lines == [f"ignoring --{name} (Mega-NeRF's): {why}"]
    if not takes_value:  # a flag set to false in a config is off, not ignored
        train_parser().parse_args(["--config_file", write_config(tmp_path / "off.yaml", {name: False})])
        assert capsys.readouterr().err == ""


def test_a_mega_nerf_config_is_used_or_reported_key_by_key(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = write_config(tmp_path / "all.yaml", {**MEGA_NERF_KEYS, "unknown_key": 1, "dataset_path": "d",
                                                  "exp_name": "e"})
    args = train_parser().parse_args(["--config_file", config, "--field", "mlp"])
    train_config(args)
    err = capsys.readouterr().err
    assert args.ray_altitude_range == [8.0, 50.0] and args.near == 0 and args.cluster_2d
    assert args.layer_dim == 2048 and args.pos_dir_dim == 0 and args.appearance_dim == 0
    reported = {"unknown_key", "all_val", "bg_layer_dim", "no_ellipse_bounds", "no_bg_nerf",
                "use_cascade", "sh_deg"}
    assert len(err.splitlines()) == len(reported)
    for key in reported:
        assert key in err
    assert "val_scale_factor" not in err  # eval's option: not ignored
    train_config(train_parser().parse_args(["--config_file", config, "--field", "hash"]))
    assert "ignoring --layer_dim: it sizes the mlp field" in capsys.readouterr().err
    train_config(train_parser().parse_args(["--dataset_path", "d", "--exp_name", "e", "--field", "mlp",
                                            "--sh_degree", "1"]))
    assert "ignoring --sh_degree: it sets the hash field's direction encoding" in capsys.readouterr().err


def test_mega_nerf_network_options_size_the_mlp_field(tmp_path: Path) -> None:
    config = train_config(train_parser().parse_args(
        ["--dataset_path", "d", "--exp_name", "e", "--field", "mlp", "--layers", "3", "--layer_dim", "32",
         "--pos_xyz_dim", "5", "--pos_dir_dim", "2", "--affine_appearance", "--no_amp", "--ckpt_path", "c.pt"]))
    assert not config.amp and config.ckpt_path == "c.pt"
    cfg = field_config(config, (torch.zeros(3), torch.ones(3)), [False] * 3, 4, 0.0)
    field = build_field(cfg)
    assert len(field.layers) == 3 and field.layers[0].weight.shape == (32, 3 * (1 + 2 * 5))
    assert field.color[0].in_features == 32 + 3 * (1 + 2 * 2)  # no embedding: it drives the affine transform
    assert field.affine.out_features == 12


def test_sh_degree_is_stored_only_when_set_so_older_checkpoints_still_match() -> None:
    """A hash field's config dict at the default degree is the one saved before --sh_degree existed (a resumed
    checkpoint or a merge compares the dicts whole); another degree is stored and rebuilds that field."""
    def config_of(*argv: str) -> dict:
        config = train_config(train_parser().parse_args(["--dataset_path", "d", "--exp_name", "e", *argv]))
        return field_config(config, (torch.zeros(3), torch.ones(3)), [False] * 3, 4, 0.0)

    assert "sh_degree" not in config_of() and "sh_degree" not in config_of("--sh_degree", "3")
    cfg = config_of("--sh_degree", "1", "--log2_hashmap_size", "10", "--max_resolution", "32")
    assert cfg["sh_degree"] == 1 and build_field(cfg).color_ray.in_features == 4 + 8  # + the embedding


def test_the_hash_fields_appearance_width_is_8_and_a_saved_config_without_one_means_32() -> None:
    """The hash field's embedding is 8 wide unless --appearance_dim says otherwise, and its config says so; a config
    dict without appearance_dim was saved when the default was 32: it builds a 32-wide field and compares equal to
    a config that says 32 (a resumed checkpoint, a merge). The mlp field keeps its 48."""
    def config_of(*argv: str) -> dict:
        config = train_config(train_parser().parse_args(["--dataset_path", "d", "--exp_name", "e", *argv]))
        return field_config(config, (torch.zeros(3), torch.ones(3)), [False] * 3, 4, 0.0)

    small = ("--log2_hashmap_size", "10", "--max_resolution", "32")
    assert config_of(*small)["appearance_dim"] == 8
    assert build_field(config_of(*small)).appearance.weight.shape == (4, 8)
    wide = config_of(*small, "--appearance_dim", "32")
    old = {k: v for k, v in wide.items() if k != "appearance_dim"}
    assert build_field(old).appearance.weight.shape == (4, 32)
    assert config_differences(old, wide) == [] and config_differences(wide, old) == []
    assert config_differences(old, config_of(*small)) == ["appearance_dim (32, 8)"]
    mlp = config_of("--field", "mlp")
    assert "appearance_dim" not in mlp and build_field(mlp).appearance.weight.shape == (4, 48)
    assert config_differences(mlp, config_of("--field", "mlp", "--appearance_dim", "48")) == []
    assert config_differences(mlp, config_of("--field", "mlp", "--appearance_dim", "16")) == ["appearance_dim (48, 16)"]


def test_recorded_options_read_back_as_the_same_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["--dataset_path", "d", "--exp_name", str(tmp_path / "exp"), "--field", "mlp", "--no_amp", "--no_progress",
            "--chunk_paths", "a", "b", "--ray_altitude_range", "-30", "2", "--layer_dim", "64"]
    config = train_config(train_parser().parse_args(argv))
    saved = record_options(config, tmp_path / "exp")
    assert f"(saved to {saved})" in capsys.readouterr().out
    again = train_config(train_parser().parse_args(["--config_file", str(saved)]))
    assert again == config and capsys.readouterr().err == ""


def test_saved_options_leave_what_the_machine_filled_to_the_next_machine(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU run's config.yaml names neither its device nor the CPU's smaller batch, so the same file trains with
    the GPU's defaults on a GPU machine; options the user gave are kept."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu = train_config(train_parser().parse_args(["--dataset_path", "d", "--exp_name", str(tmp_path / "a")]))
    assert (cpu.device, cpu.batch_size) == ("cpu", 4096)
    saved = yaml.safe_load(record_options(cpu, tmp_path / "a").read_text())
    assert "device" not in saved and "batch_size" not in saved and "machine_filled" not in saved
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu = train_config(train_parser().parse_args(["--config_file", str(tmp_path / "a" / "config.yaml")]))
    assert (gpu.device, gpu.batch_size) == ("cuda", 32768)
    given = train_config(train_parser().parse_args(["--dataset_path", "d", "--exp_name", str(tmp_path / "b"),
                                                    "--device", "cpu", "--batch_size", "512"]))
    saved = yaml.safe_load(record_options(given, tmp_path / "b").read_text())
    assert (saved["device"], saved["batch_size"]) == ("cpu", 512)


def test_colmap_images_default_beside_sparse(tmp_path: Path) -> None:
    assert default_images_path(str(tmp_path / "scene" / "sparse" / "0")) == (tmp_path / "scene" / "images").resolve()
    assert default_images_path(str(tmp_path / "model")) == (tmp_path / "images").resolve()


def test_an_alias_of_an_option_another_command_has_is_accepted_and_said_to_be_ignored(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Mega-NeRF's --image_pixel_batch_size is eval's --ray_chunk; train.py has no --ray_chunk, so it takes the
    name and says in one line that it ignores it, on the command line and in a config file alike."""
    parsed = train_parser().parse_args(["--image_pixel_batch_size", "4096"])
    assert "ignoring --image_pixel_batch_size (Mega-NeRF's name for --ray_chunk" in capsys.readouterr().err
    assert not hasattr(parsed, "ray_chunk")
    config = tmp_path / "c.yaml"
    config.write_text("image_pixel_batch_size: 4096\n")
    train_parser().parse_args(["--config_file", str(config)])
    err = capsys.readouterr().err
    assert err.count("image_pixel_batch_size") == 1 and "no command reads it" not in err


def test_every_command_option_is_the_union_of_every_commands_options() -> None:
    """Reading a config checks its keys against EVERY_COMMAND_OPTION, a list kept beside the parsers so that no
    other command is imported: an option added to a parser and not to the list would be called a typo there."""
    from mega_nerf.cli import export, merge, preview, render, train_cells, view

    parsers = (train_parser(), train_cells.train_cells_parser(), eval_parser(), partition_parser(),
               render.render_parser(), export.export_parser(), merge.merge_parser(), view.view_parser(),
               preview.preview_parser())
    names = set().union(*map(_option_names, parsers))
    assert names == EVERY_COMMAND_OPTION, (f"missing from the list: {sorted(names - EVERY_COMMAND_OPTION)}; "
                                           f"no longer an option: {sorted(EVERY_COMMAND_OPTION - names)}")


def test_every_command_default_equals_its_config_default() -> None:
    """Parsers repeat their config dataclass's defaults (so that --help shows them); an option whose parser
    default differs from the dataclass's would act one way from the command line and another from code (tests,
    benchmarks). Options without a parser default (None: required, or filled in later; suppressed: an old spelling
    beside the option that holds it) are left out."""
    from mega_nerf.camera_path import PathConfig
    from mega_nerf.cli.render import render_parser
    from mega_nerf.cli.view import view_parser
    from mega_nerf.evaluation.evaluate import EvalConfig
    from mega_nerf.training.config import TrainConfig
    from mega_nerf.viewer.app import ViewerConfig

    compared = 0
    for parser, config in ((train_parser(), TrainConfig), (eval_parser(), EvalConfig), (view_parser(), ViewerConfig),
                           (render_parser(), PathConfig)):
        fields = {f.name: f for f in dataclasses.fields(config)}
        for action in parser._actions:
            field = fields.get(action.dest)
            if field is None or action.default in (None, argparse.SUPPRESS):
                continue
            assert field.default is not dataclasses.MISSING, f"{config.__name__}.{field.name} has no default"
            assert action.default == field.default, f"--{action.dest}: {action.default} against {field.default}"
            compared += 1
    assert compared >= 40  # most options are compared, not skipped
