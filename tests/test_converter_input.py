"""Bad input to the converters and the preview commands: each ends in one line `error: ...` naming the bad file
or option (errors.run_cli, exit code 2), never a traceback, and writes nothing; small valid inputs still convert.

The commands run in this process as their console scripts run them (run_cli around main). The valid inputs are
test_convert.py's synthetic scene (a COLMAP binary model, a transforms.json) and test_preview.py's dataset.
"""
from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from test_convert import colmap_model, make_scene, to_source, write_images
from test_preview import make_dataset

from mega_nerf.cli.convert import colmap_main, transforms_main
from mega_nerf.cli.preview import cameras_main
from mega_nerf.cli.preview import main as preview_main
from mega_nerf.data.colmap import write_model
from mega_nerf.data.dataset import load_dataset
from mega_nerf.errors import run_cli

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


@pytest.mark.parametrize("size", ["0", "-10"])
def test_preview_size_must_be_positive(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                       size: str) -> None:
    out = tmp_path / "preview.png"
    assert (error_of(preview_main, [str(dataset), "--output", str(out), "--size", size], capsys)
            == f"error: --size must be positive, got {size}\n")
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
