"""Bad input to the converters and the preview commands: each ends in one line `error: ...` naming the bad file
or option (errors.run_cli, exit code 2), never a traceback, and writes nothing; small valid inputs still convert.

The commands run in this process as their console scripts run them (run_cli around main). The valid inputs are
test_convert.py's synthetic scene (a COLMAP binary model, a transforms.json) and test_preview.py's dataset.
"""
from __future__ import annotations

import json
import shlex
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml
from plyfile import PlyData, PlyElement
from test_convert import H, W, colmap_model, make_scene, to_source, write_images
from test_preview import make_dataset

from mega_nerf.cli.convert import colmap_main, transforms_main
from mega_nerf.cli.preview import cameras_main
from mega_nerf.cli.preview import main as preview_main
from mega_nerf.data.colmap import write_model
from mega_nerf.data.convert import SceneInput, convert_poses
from mega_nerf.data.dataset import load_dataset
from mega_nerf.errors import UserError, run_cli

FRAMES_MESSAGE = "'frames' must be a list of objects, each with 'file_path' and 'transform_matrix'"


def error_of(main: Callable[[list[str]], None], argv: list[str], capsys: pytest.CaptureFixture) -> str:
    """What `main(argv)` writes on stderr, run as its console script runs it; it must exit with code 2."""
    with pytest.raises(SystemExit) as ended:
        run_cli(lambda: main(argv))
    assert ended.value.code == 2
    return capsys.readouterr().err


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("preview") / "data")


@pytest.fixture
def colmap_input(tmp_path: Path) -> tuple[Path, Path]:
    """A binary COLMAP model of test_convert's 12-image scene, and its images: (model, images)."""
    scene = make_scene()
    write_model(colmap_model(scene, *to_source(scene, np.eye(3), 1.0, np.zeros(3))), tmp_path / "sparse",
                binary=True)
    write_images(scene, tmp_path / "images")
    return tmp_path / "sparse", tmp_path / "images"


def write_transforms(folder: Path, frames: object, **top: object) -> Path:
    """A transforms.json with shared intrinsics, the `top` level keys and `frames` as given."""
    file = folder / "transforms.json"
    file.write_text(json.dumps({"w": 32, "h": 24, "fl_x": 30.0, **top, "frames": frames}))
    return file


@pytest.mark.parametrize("size", ["0", "-10", "50"])
def test_preview_size_must_leave_room_for_its_views(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                    size: str) -> None:
    """Below 100 rows the side view has little or nothing left under its title (with cells drawn, --size 50 divided
    by zero): one line before anything is drawn."""
    out = tmp_path / "preview.png"
    assert (error_of(preview_main, [str(dataset), "--output", str(out), "--size", size], capsys)
            == f"error: --size must be at least 100, got {size}\n")
    assert not out.exists()


@pytest.mark.parametrize("depth", ["-1", "nan", "inf", "0"])
def test_frustum_depth_must_be_positive_and_finite(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                   depth: str) -> None:
    out = tmp_path / "cameras.ply"
    argv = ["--dataset_path", str(dataset), "--output", str(out), "--frusta", "--frustum_depth", depth]
    assert (error_of(cameras_main, argv, capsys)
            == f"error: --frustum_depth must be a positive finite number, got {depth}\n")
    assert not out.exists()


@pytest.mark.parametrize(("frames", "problem"), [
    (3, FRAMES_MESSAGE), ([3], FRAMES_MESSAGE), ("images/a.png", FRAMES_MESSAGE),
    ({"file_path": "images/a.png"}, FRAMES_MESSAGE), ([{"file_path": 3}], "every frame needs a 'file_path' string"),
], ids=["number", "list_of_numbers", "text", "one_object", "file_path_number"])
def test_transforms_frames_of_the_wrong_shape_name_the_file(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                            frames: object, problem: str) -> None:
    file = write_transforms(tmp_path, frames)
    argv = ["--transforms", str(file), "--output", str(tmp_path / "out")]
    assert error_of(transforms_main, argv, capsys) == f"error: {file}: {problem}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["transforms.json"]


def test_a_frame_whose_transform_matrix_is_an_object_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    file = write_transforms(tmp_path, [{"file_path": "a.png", "transform_matrix": {"rows": 4}}])
    (tmp_path / "a.png").write_bytes(b"")  # not read: the intrinsics are in the json
    argv = ["--transforms", str(file), "--output", str(tmp_path / "out")]
    assert error_of(transforms_main, argv, capsys) == f"error: {file}: frame a.png: needs a 4x4 'transform_matrix'\n"
    assert not (tmp_path / "out").exists()


def test_a_ply_file_path_that_is_not_text_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    file = write_transforms(tmp_path, [{"file_path": "a.png", "transform_matrix": np.eye(4).tolist()}],
                            ply_file_path=3)
    (tmp_path / "a.png").write_bytes(b"")  # not read: the intrinsics are in the json
    argv = ["--transforms", str(file), "--output", str(tmp_path / "out")]
    assert error_of(transforms_main, argv, capsys) == f"error: {file}: 'ply_file_path' must be a path, got 3\n"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damaged", ["cameras.bin", "images.bin", "points3D.bin"])
def test_random_bytes_as_a_colmap_file_are_one_line(colmap_input: tuple[Path, Path], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture, damaged: str) -> None:
    """Random bytes claim some 10^19 records: named before any allocation, not numpy's EiB MemoryError."""
    sparse, images = colmap_input
    data = np.random.default_rng(0).bytes(4096)
    (sparse / damaged).write_bytes(data)
    claimed = struct.unpack("<Q", data[:8])[0]
    argv = ["--model_path", str(sparse), "--images_path", str(images), "--output", str(tmp_path / "out")]
    assert (error_of(colmap_main, argv, capsys)
            == f"error: {sparse / damaged}: not a COLMAP binary model ({claimed} records claimed, 4096 bytes)\n")
    assert not (tmp_path / "out").exists()


def one_point(track_length: int) -> bytes:
    """points3D.bin of one point whose track claims `track_length` (image id, keypoint index) pairs and has one."""
    return (struct.pack("<Q", 1) + struct.pack("<q3d3BdQ", 0, 1.0, 2.0, 3.0, 255, 0, 0, 0.5, track_length)
            + struct.pack("<2i", 1, 0))


@pytest.mark.parametrize(("damaged", "data", "problem"), [
    ("points3D.bin", one_point(1 << 40), f"not a COLMAP binary model ({1 << 40} records claimed, 67 bytes)"),
    ("images.bin", struct.pack("<Q", 1) + struct.pack("<i7di", 1, 1, 0, 0, 0, 0, 0, 0, 1) + b"\xff\xfe.png\x00"
     + struct.pack("<Q", 0), "truncated or not a COLMAP binary file"),
], ids=["track_past_the_end", "name_not_utf8"])
def test_a_damaged_record_is_one_line(colmap_input: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture,
                                      damaged: str, data: bytes, problem: str) -> None:
    """A track length past the file's end; an image name that is not UTF-8."""
    sparse, images = colmap_input
    (sparse / damaged).write_bytes(data)
    argv = ["--model_path", str(sparse), "--images_path", str(images), "--output", str(tmp_path / "out")]
    assert error_of(colmap_main, argv, capsys) == f"error: {sparse / damaged}: {problem}\n"
    assert not (tmp_path / "out").exists()


def test_valid_small_inputs_still_convert(colmap_input: tuple[Path, Path], tmp_path: Path) -> None:
    sparse, images = colmap_input
    colmap_main(["--model_path", str(sparse), "--images_path", str(images), "--output", str(tmp_path / "colmap")])
    assert len(load_dataset(tmp_path / "colmap").images) == 12
    scene = make_scene()
    c2w, _ = to_source(scene, np.eye(3), 1.0, np.zeros(3))
    frames = [{"file_path": f"images/{name}.png", "transform_matrix": np.vstack([c2w[i], [0, 0, 0, 1]]).tolist()}
              for i, name in enumerate(scene.names)]
    transforms_main(["--transforms", str(write_transforms(tmp_path, frames)), "--output", str(tmp_path / "json")])
    assert len(load_dataset(tmp_path / "json").images) == 12


# ---- non-finite and implausible values in the sources (sweep of the importers) ----

@pytest.fixture
def colmap_text(tmp_path: Path) -> tuple[Path, Path]:
    """colmap_input's model as text files, whose lines the tests edit: (model, images)."""
    scene = make_scene()
    write_model(colmap_model(scene, *to_source(scene, np.eye(3), 1.0, np.zeros(3))), tmp_path / "sparse")
    write_images(scene, tmp_path / "images")
    return tmp_path / "sparse", tmp_path / "images"


def edit_line(file: Path, number: int, edit: Callable[[list[str]], list[str]]) -> None:
    """Replace the fields of line `number` (from 1) of a text file by edit(fields)."""
    lines = file.read_text().splitlines()
    lines[number - 1] = " ".join(edit(lines[number - 1].split()))
    file.write_text("\n".join(lines) + "\n")


def colmap_error(model: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture, *extra: str) -> str:
    """colmap_main's one line for `model`, after checking that it wrote no output."""
    argv = ["--model_path", str(model[0]), "--images_path", str(model[1]), "--output", str(tmp_path / "out"), *extra]
    err = error_of(colmap_main, argv, capsys)
    assert not (tmp_path / "out").exists()
    return err


@pytest.mark.parametrize("binary", [False, True], ids=["txt", "bin"])
def test_a_nan_point_is_named_by_its_line(tmp_path: Path, capsys: pytest.CaptureFixture, binary: bool) -> None:
    """Was: exit 0 with `ray_altitude_range: [.nan, .nan]` in config.yaml. Point 5 is line 7 (one header line)."""
    scene = make_scene()
    model = colmap_model(scene, *to_source(scene, np.eye(3), 1.0, np.zeros(3)))
    model.points.xyz[5, 1] = np.nan
    write_model(model, tmp_path / "sparse", binary=binary)
    write_images(scene, tmp_path / "images")
    file = tmp_path / "sparse" / ("points3D.bin" if binary else "points3D.txt")
    where = f"{file}: point 5" if binary else f"{file}:7"
    x, z = model.points.xyz[5, [0, 2]].tolist()
    assert (colmap_error((tmp_path / "sparse", tmp_path / "images"), tmp_path, capsys)
            == f"error: {where}: non-finite point coordinates [{x!r}, nan, {z!r}] (1 such points)\n")


def write_ply(file: Path, xyz: np.ndarray) -> None:
    vertex = np.array([tuple(p) for p in xyz], dtype=[("x", "f8"), ("y", "f8"), ("z", "f8")])
    PlyData([PlyElement.describe(vertex, "vertex")]).write(str(file))


def scene_transforms(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """test_convert's scene as a transforms.json with its images; (the json, the sparse points (P, 3))."""
    scene = make_scene()
    c2w, points = to_source(scene, np.eye(3), 1.0, np.zeros(3))
    write_images(scene, tmp_path / "images")
    frames = [{"file_path": f"images/{name}.png", "transform_matrix": np.vstack([c2w[i], [0, 0, 0, 1]]).tolist()}
              for i, name in enumerate(scene.names)]
    return write_transforms(tmp_path, frames), points


def test_nan_points_of_a_ply_are_dropped_with_a_count(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Was: config.yaml's `ray_altitude_range: [.nan, .nan]`. Now the conversion equals the one without them."""
    file, points = scene_transforms(tmp_path)
    write_ply(tmp_path / "clean.ply", points)
    write_ply(tmp_path / "nan.ply", np.insert(points, [3, 100], [[np.nan, 0, 0], [1, np.inf, 2]], axis=0))
    for name in ("clean", "nan"):
        transforms_main(["--transforms", str(file), "--output", str(tmp_path / name), "--points",
                         str(tmp_path / f"{name}.ply")])
    out = capsys.readouterr().out
    dropped = f"dropped 2 of {len(points) + 2} vertices with non-finite coordinates"
    assert f"warning: {tmp_path / 'nan.ply'}: {dropped}" in out
    config = yaml.safe_load((tmp_path / "nan" / "config.yaml").read_text())
    assert np.isfinite(config["ray_altitude_range"]).all()
    assert config["ray_altitude_range"] == yaml.safe_load((tmp_path / "clean" / "config.yaml").read_text())[
        "ray_altitude_range"]
    write_ply(tmp_path / "all_nan.ply", np.full((20, 3), np.nan))
    argv = ["--transforms", str(file), "--output", str(tmp_path / "out"), "--points", str(tmp_path / "all_nan.ply")]
    assert (error_of(transforms_main, argv, capsys)
            == f"error: {tmp_path / 'all_nan.ply'}: none of its 20 vertices has finite coordinates\n")
    assert not (tmp_path / "out").exists()


def test_a_scale_that_overflows_is_refused_before_writing() -> None:
    """Finite poses near the float limit: the scale overflows to inf; named before config.yaml is written."""
    scene = make_scene()
    c2w, points = to_source(scene, np.eye(3), 1.0, np.zeros(3))
    c2w[0, 1, 3], c2w[1, 1, 3] = 1e308, -1e308
    n = len(scene.names)
    source = SceneInput(scene.names, [Path(f"{name}.png") for name in scene.names], c2w,
                        np.tile([30.0, 30, 16, 12], (n, 1)), np.tile([W, H], (n, 1)), [None] * n, points, scene.rgb,
                        file="model.json")
    with pytest.raises(UserError, match=r"^model\.json: the poses and points give a non-finite scale"):
        convert_poses(source, np.array([-1.0, 0, 0]), 8)


def one_frame(tmp_path: Path, **intrinsics: object) -> Path:
    """A transforms.json of one frame a.png (an empty file: its intrinsics are in the json) and `intrinsics`."""
    (tmp_path / "a.png").write_bytes(b"")
    file = tmp_path / "transforms.json"
    frame = {"file_path": "a.png", "transform_matrix": np.eye(4).tolist()}
    file.write_text(json.dumps({"w": 32, "h": 24, **intrinsics, "frames": [frame]}))
    return file


@pytest.mark.parametrize(("intrinsics", "problem"), [
    ({"fl_x": 0}, "focal length fx must be positive and finite, got 0.0"),
    ({"fl_x": -30}, "focal length fx must be positive and finite, got -30.0"),
    ({"fl_x": float("nan")}, "'fl_x' must be a finite number, got nan"),
    ({"fl_x": float("inf")}, "'fl_x' must be a finite number, got inf"),
    ({"fl_x": 1e300}, "focal length fx = 1e+300 px is implausible for a 32x24 image (allowed: 0.32 to 3.2e+06 px)"),
    ({"fl_x": 30, "fl_y": 0}, "focal length fy must be positive and finite, got 0.0"),
    ({"camera_angle_x": 3.1415926}, "focal length fx = 4.287e-07 px is implausible for a 32x24 image "
                                    "(allowed: 0.32 to 3.2e+06 px)"),
    ({"camera_angle_x": 0}, "'camera_angle_x' must be an angle in radians between 0 and pi, got 0.0"),
    ({"camera_angle_x": 1.0, "camera_angle_y": -1}, "'camera_angle_y' must be an angle in radians between 0 and pi, "
                                                     "got -1.0"),
    ({"fl_x": 30, "cx": -1000}, "principal point (-1000, 12) lies more than 1 image size outside the 32x24 image"),
    ({"fl_x": 30, "cy": 60}, "principal point (16, 60) lies more than 1 image size outside the 32x24 image"),
    ({"fl_x": 30, "w": 64.9}, "'w' must be a positive whole number of pixels, got 64.9"),
    ({"fl_x": 30, "h": 0}, "'h' must be a positive whole number of pixels, got 0"),
], ids=["fl_x_0", "fl_x_negative", "fl_x_nan", "fl_x_inf", "fl_x_1e300", "fl_y_0", "angle_near_pi", "angle_0",
        "angle_y_negative", "cx_far_left", "cy_far_below", "w_fraction", "h_0"])
def test_implausible_transforms_intrinsics_name_the_frame(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                          intrinsics: dict, problem: str) -> None:
    file = one_frame(tmp_path, **intrinsics)
    argv = ["--transforms", str(file), "--output", str(tmp_path / "out")]
    assert error_of(transforms_main, argv, capsys) == f"error: {file}: frame a.png: {problem}\n"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("focal", "problem"), [
    ("0", "focal length fx must be positive and finite, got 0.0"),
    ("-28", "focal length fx must be positive and finite, got -28.0"),
    ("nan", "focal length fx must be positive and finite, got nan"),
    ("inf", "focal length fx must be positive and finite, got inf"),
])
def test_implausible_colmap_focal_lengths_name_the_camera_line(colmap_text: tuple[Path, Path], tmp_path: Path,
                                                               capsys: pytest.CaptureFixture, focal: str,
                                                               problem: str) -> None:
    """Camera 1 (PINHOLE: fx fy cx cy) is cameras.txt's line 2."""
    file = colmap_text[0] / "cameras.txt"
    edit_line(file, 2, lambda f: [*f[:4], focal, *f[5:]])
    assert colmap_error(colmap_text, tmp_path, capsys) == f"error: {file}:2: camera 1: {problem}\n"


def test_a_colmap_principal_point_far_off_and_a_binary_camera_are_named(colmap_text: tuple[Path, Path],
                                                                         tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    file = colmap_text[0] / "cameras.txt"
    edit_line(file, 2, lambda f: [*f[:6], "-1000", *f[7:]])
    assert (colmap_error(colmap_text, tmp_path, capsys) == f"error: {file}:2: camera 1: principal point (-1000, "
            f"11.7) lies more than 1 image size outside the {W}x{H} image\n")
    scene = make_scene()
    model = colmap_model(scene, *to_source(scene, np.eye(3), 1.0, np.zeros(3)))
    model.cameras[3].params[0] = 0.0
    write_model(model, tmp_path / "bin", binary=True)
    assert (colmap_error((tmp_path / "bin", colmap_text[1]), tmp_path, capsys)
            == f"error: {tmp_path / 'bin' / 'cameras.bin'}: camera 3: focal length fx must be positive and finite, "
            "got 0.0\n")


@pytest.mark.parametrize(("fields", "problem"), [
    (slice(1, 5), "qvec [0.0, 0.0, 0.0, 0.0] is not a rotation (needs 4 finite numbers, not all zero)"),
    (slice(2, 3), "qvec [{qw}, nan, {qy}, {qz}] is not a rotation (needs 4 finite numbers, not all zero)"),
    (slice(6, 7), "tvec [{tx}, nan, {tz}] must be finite"),
    (slice(7, 8), "tvec [{tx}, {ty}, inf] must be finite"),
], ids=["qvec_zero", "qvec_nan", "tvec_nan", "tvec_inf"])
def test_a_colmap_pose_that_is_not_one_names_its_line(colmap_text: tuple[Path, Path], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture, fields: slice,
                                                      problem: str) -> None:
    """Was: scipy's `Found zero norm quaternions` or numpy's LinAlgError. Image 1 is images.txt's line 3."""
    file = colmap_text[0] / "images.txt"
    original = file.read_text().splitlines()[2].split()
    value = {1: "0", 2: "nan", 6: "nan", 7: "inf"}[fields.start]
    edit_line(file, 3, lambda f: [*f[:fields.start], *[value] * (fields.stop - fields.start), *f[fields.stop:]])
    names = dict(zip(("qw", "qx", "qy", "qz", "tx", "ty", "tz"), map(repr, map(float, original[1:8])), strict=True))
    assert (colmap_error(colmap_text, tmp_path, capsys)
            == f"error: {file}:3: image img_000.png: {problem.format(**names)}\n")


def test_a_short_points3d_line_is_named(colmap_text: tuple[Path, Path], tmp_path: Path,
                                        capsys: pytest.CaptureFixture) -> None:
    """Was: numpy's reshape ValueError."""
    file = colmap_text[0] / "points3D.txt"
    edit_line(file, 4, lambda f: f[:3])
    assert (colmap_error(colmap_text, tmp_path, capsys)
            == f"error: {file}:4: expected 'POINT3D_ID X Y Z R G B ERROR TRACK...'\n")


def test_no_image_on_disk_is_one_line_even_when_missing_ones_are_allowed(
        colmap_text: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Was, for transforms.json: numpy's `need at least one array to stack`. Both importers say it alike."""
    file, _ = scene_transforms(tmp_path)
    for image in sorted((tmp_path / "images").iterdir()):
        image.unlink()
    argv = ["--transforms", str(file), "--output", str(tmp_path / "out"), "--allow_missing_images"]
    assert (error_of(transforms_main, argv, capsys)
            == f"error: {file}: none of its 12 images is there (first: {tmp_path / 'images' / 'img_000.png'})\n")
    assert (colmap_error(colmap_text, tmp_path, capsys, "--allow_missing_images")
            == f"error: {colmap_text[0]}: none of its 12 images is there (first: {colmap_text[1] / 'img_000.png'})\n")


def test_the_closing_hint_quotes_a_path_with_spaces(colmap_input: tuple[Path, Path], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "my data" / "city's scene"
    colmap_main(["--model_path", str(colmap_input[0]), "--images_path", str(colmap_input[1]), "--output", str(out)])
    hint = next(line for line in capsys.readouterr().out.splitlines() if "check it with: " in line)
    assert shlex.split(hint.split("check it with: ")[1]) == ["python", "scripts/preview_dataset.py", str(out)]
