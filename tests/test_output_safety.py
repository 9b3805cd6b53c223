"""An --output never destroys an input: the merge and the PLY export refuse, before anything is written, an output
path that is one of their inputs or an existing file of another kind, and still overwrite their own earlier
output (a rerun). Rendering refuses an --output whose camera_path.json would replace its --path, or that lies in a
dataset, and a rerun replaces the previous rendering whole; bad frame sizes, rates and options are one line before
anything is written.

The partitions are 2 x 2 grids of small random hash fields (test_container.write_partition): merging and exporting
need no training. The dataset is a copy of the tiny city, so that a refusal that failed would not damage the
session's fixture.
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import test_safety
import torch
from test_container import random_field, write_partition
from test_video import decode

from mega_nerf import camera_path, io
from mega_nerf.cli import eval as eval_cli
from mega_nerf.cli import export as export_cli
from mega_nerf.cli import merge as merge_cli
from mega_nerf.cli import render as render_cli
from mega_nerf.cli import train as train_cli
from mega_nerf.cli.preview import cameras_main
from mega_nerf.errors import UserError, run_cli
from mega_nerf.merging.container import load_container

EXPORT = ["--resolution", "12", "--no_progress"]  # a few hundred points of the random fields: well under a second


@pytest.fixture
def scene(tiny_city: Path, tmp_path: Path) -> Path:
    """tmp_path holding city/ (a copy of the tiny city, its config.yaml naming the copy) and X/ (params.pt and
    exp-<k>/checkpoints/ of four random submodules)."""
    city = tmp_path / "city"
    shutil.copytree(tiny_city, city)
    (city / "config.yaml").write_text(f'dataset_path: "{city}"\n')
    write_partition(tmp_path / "X", [random_field(k) for k in range(4)])
    return tmp_path


def merge_args(root: Path, output: Path, partition: str = "X") -> list[str]:
    return ["--config_file", str(root / "city" / "config.yaml"), "--ckpt_prefix", str(root / partition / "exp-"),
            "--centroid_path", str(root / partition / "params.pt"), "--output", str(output)]


def refusal(main: Callable[[list[str]], object], argv: list[str], capsys: pytest.CaptureFixture) -> str:
    """Run a command's main as its console script does: it must exit 2 with one error line, its last."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        run_cli(lambda: main(argv))
    lines = capsys.readouterr().err.splitlines()
    assert exit_.value.code == 2 and [line for line in lines if line.startswith("error: ")] == lines[-1:], lines
    return lines[-1]


def refuses_and_keeps(main: Callable[[list[str]], object], argv: list[str], target: Path,
                      capsys: pytest.CaptureFixture) -> str:
    """The refusal's line, after checking that `target` (the --output named in argv) is byte-identical and that
    nothing was left beside it (no temp file, no lock)."""
    before, beside = target.read_bytes(), sorted(target.parent.iterdir())
    line = refusal(main, argv, capsys)
    assert target.read_bytes() == before and sorted(target.parent.iterdir()) == beside
    return line


@pytest.mark.parametrize("name, option", [("X/params.pt", "--centroid_path"), ("city/config.yaml", "--config_file"),
                                          ("X/exp-1/checkpoints/00000101.pt", "--ckpt_prefix"),
                                          ("city/coordinates.pt", "--dataset_path")])
def test_merge_refuses_an_input_as_its_output(scene: Path, name: str, option: str,
                                               capsys: pytest.CaptureFixture) -> None:
    line = refuses_and_keeps(merge_cli.main, merge_args(scene, scene / name), scene / name, capsys)
    assert line.startswith(f"error: --output {scene / name} ") and f"one of this command's inputs ({option}); " \
        "choose another path" in line, line


def test_merge_refuses_a_file_or_folder_that_is_not_a_container(scene: Path, capsys: pytest.CaptureFixture) -> None:
    notes = scene / "notes.txt"
    notes.write_text("not a container\n")
    line = refuses_and_keeps(merge_cli.main, merge_args(scene, notes), notes, capsys)
    assert line == f"error: --output {notes}: exists and is not a merged container; remove it or choose another path"
    (scene / "folder").mkdir()
    line = refusal(merge_cli.main, merge_args(scene, scene / "folder"), capsys)
    assert line == f"error: --output {scene / 'folder'} is a folder; choose a file path"


def test_a_merge_reruns_over_its_container(scene: Path) -> None:
    """Merging another partition over an existing container replaces it with what a fresh merge writes."""
    write_partition(scene / "Y", [random_field(10 + k) for k in range(4)])
    merged, fresh = scene / "merged.pt", scene / "fresh.pt"
    merge_cli.main(merge_args(scene, merged))
    merge_cli.main(merge_args(scene, fresh, partition="Y"))
    assert merged.read_bytes() != fresh.read_bytes()
    merge_cli.main(merge_args(scene, merged, partition="Y"))
    assert merged.read_bytes() == fresh.read_bytes()
    load_container(merged)


@pytest.fixture
def container(scene: Path) -> Path:
    merge_cli.main(merge_args(scene, scene / "merged.pt"))
    return scene / "merged.pt"


@pytest.mark.parametrize("name, option", [("merged.pt", "--container_path"), ("city/config.yaml", "--config_file"),
                                          ("city/coordinates.pt", "--dataset_path")])
def test_export_refuses_an_input_as_its_output(scene: Path, container: Path, name: str, option: str,
                                                capsys: pytest.CaptureFixture) -> None:
    argv = ["--config_file", str(scene / "city" / "config.yaml"), "--container_path", str(container),
            "--output", str(scene / name), *EXPORT]
    line = refuses_and_keeps(export_cli.main, argv, scene / name, capsys)
    assert line.startswith(f"error: --output {scene / name} ") and f"one of this command's inputs ({option}); " \
        "choose another path" in line, line


def test_export_refuses_a_file_that_is_not_a_ply(scene: Path, container: Path, capsys: pytest.CaptureFixture) -> None:
    notes = scene / "notes.txt"
    notes.write_text("ply but not a PLY\n")
    argv = ["--container_path", str(container), "--output", str(notes), *EXPORT]
    line = refuses_and_keeps(export_cli.main, argv, notes, capsys)
    assert line == f"error: --output {notes}: exists and is not a PLY file; remove it or choose another path"


def test_an_export_reruns_over_its_ply(scene: Path, container: Path) -> None:
    """Exporting again at another resolution over an existing PLY replaces it with what a fresh export writes."""
    ply, fresh = scene / "scene.ply", scene / "fresh.ply"
    export_cli.main(["--container_path", str(container), "--output", str(ply), *EXPORT])
    export_cli.main(["--container_path", str(container), "--output", str(fresh), *EXPORT, "--resolution", "8"])
    assert ply.read_bytes() != fresh.read_bytes()
    export_cli.main(["--container_path", str(container), "--output", str(ply), *EXPORT, "--resolution", "8"])
    assert ply.read_bytes() == fresh.read_bytes()


@pytest.mark.parametrize("place", ["train", "val/rgbs", ""])
def test_merge_and_export_refuse_a_file_in_a_dataset(scene: Path, container: Path, place: str,
                                                      capsys: pytest.CaptureFixture) -> None:
    """A container or a PLY written into the dataset's folder or its train/ or val/ images (folder outputs were
    refused there, single files were not) is one line naming it, before anything is written (no lock file
    either); a file in a folder of the user's own inside the dataset passes."""
    city = scene / "city"
    before = listing(city)
    where = f"{place.split('/')[0]} images" if place else "own folder"
    merged, ply = city / place / "merged.pt", city / place / "scene.ply"
    line = refusal(merge_cli.main, merge_args(scene, merged), capsys)
    assert line == f"error: --output {merged}: inside the dataset {city}'s {where}; choose another path"
    line = refusal(export_cli.main, ["--container_path", str(container), "--output", str(ply), *EXPORT], capsys)
    assert line == f"error: --output {ply}: inside the dataset {city}'s {where}; choose another path"
    assert listing(city) == before
    (city / "runs").mkdir()
    export_cli.main(["--container_path", str(container), "--output", str(city / "runs" / "scene.ply"), *EXPORT])


def test_the_cameras_export_refuses_a_dataset_file(scene: Path, capsys: pytest.CaptureFixture) -> None:
    target = scene / "city" / "coordinates.pt"
    line = refuses_and_keeps(cameras_main, ["--dataset_path", str(scene / "city"), "--output", str(target)], target,
                             capsys)
    assert line == f"error: --output {target} lies inside {scene / 'city'}, one of this command's inputs " \
                   "(--dataset_path); choose another path"


@pytest.mark.parametrize("place", ["train", "val/rgbs", ""])
def test_the_cameras_export_refuses_a_new_file_in_a_dataset(scene: Path, place: str,
                                                            capsys: pytest.CaptureFixture) -> None:
    """The cameras' PLY written as a new file into the dataset's folder or its train/ or val/ images (only its
    existing files were refused, as inputs) is one line naming it, before anything is written; a file in a folder
    of the user's own inside the dataset passes."""
    city = scene / "city"
    before = listing(city)
    where = f"{place.split('/')[0]} images" if place else "own folder"
    ply = city / place / "cameras.ply"
    line = refusal(cameras_main, ["--dataset_path", str(city), "--output", str(ply)], capsys)
    assert line == f"error: --output {ply}: inside the dataset {city}'s {where}; choose another path"
    assert listing(city) == before
    (city / "runs").mkdir()
    cameras_main(["--dataset_path", str(city), "--output", str(city / "runs" / "cameras.ply")])


# ---- render_images.py's --output folder ----

city_container = test_safety.merged  # the fixture: a 1 x 1 partition of the tiny city trained two steps, merged


def listing(folder: Path) -> list[str]:
    """Every path under `folder` and beside it, relative to its parent."""
    return sorted(str(p.relative_to(folder.parent)) for p in folder.parent.rglob("*"))


def test_render_refuses_an_output_whose_camera_path_is_its_input(
        tiny_city: Path, city_container: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`--path X/camera_path.json --output X` would replace nerfstudio's file (its keyframes, its other fields)
    with ours: refused before anything is written; the same file rendered into another folder is read."""
    render_cli.main(test_safety.render_args(tiny_city, city_container, tmp_path / "first", frames=1))
    ours = json.loads((tmp_path / "first" / "camera_path.json").read_text())
    given = tmp_path / "X" / "camera_path.json"
    given.parent.mkdir()
    given.write_text(json.dumps({**ours, "keyframes": [{"fov": 50}]}))
    before = listing(tmp_path / "X")
    argv = [*test_safety.render_args(tiny_city, city_container, tmp_path / "X"), "--path", str(given)]
    line = refusal(render_cli.main, argv, capsys)
    assert line == (f"error: --output {tmp_path / 'X'}: this rendering's camera_path.json would overwrite --path "
                    f"{given}; choose another --output")
    assert "keyframes" in json.loads(given.read_text()) and listing(tmp_path / "X") == before
    render_cli.main([*test_safety.render_args(tiny_city, city_container, tmp_path / "Y"), "--path", str(given)])


def test_a_rerun_replaces_the_previous_rendering_and_nothing_else(
        tiny_city: Path, city_container: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Two frames rendered over three leave two frames beside a two-frame video, and the files of other names."""
    out = tmp_path / "render"
    render_cli.main(test_safety.render_args(tiny_city, city_container, out, frames=3))
    others = [out / "notes.txt", out / "frames" / "keep.png", out / "frames" / "0001.png"]
    for path in others:
        path.write_bytes(b"not ours")
    capsys.readouterr()
    video = render_cli.main(test_safety.render_args(tiny_city, city_container, out, frames=2))
    assert f"{out}: removed the previous rendering (camera_path.json, video.mp4, 3 frames)" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "frames").iterdir()) == ["00000.png", "00001.png", "0001.png", "keep.png"]
    assert decode(video)[1].shape[0] == 2 and len(json.loads((out / "camera_path.json").read_text())
                                                   ["camera_path"]) == 2
    assert all(path.read_bytes() == b"not ours" for path in others)


def test_a_folder_of_another_tools_frames_and_video_is_refused_untouched(
        tiny_city: Path, city_container: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """ffmpeg's numbered frames and a video of our names, without the config.yaml a rendering of ours saves beside
    them, are another tool's: refused in one line before anything is written, every file as it was."""
    out = tmp_path / "render"
    theirs = [out / "frames" / "00001.png", out / "video.mp4"]
    for path in theirs:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"theirs")
    line = refusal(render_cli.main, test_safety.render_args(tiny_city, city_container, out, frames=2), capsys)
    assert line == (f"error: --output {out}: holds video.mp4 and other files of a rendering's names that no "
                    "rendering of ours wrote (no config.yaml); choose another --output")
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["frames", "frames/00001.png",
                                                                               "video.mp4"]
    assert all(path.read_bytes() == b"theirs" for path in theirs)


def test_an_interrupted_rerun_leaves_no_old_frame_or_video_and_says_so(
        tiny_city: Path, city_container: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "render"
    render_cli.main(test_safety.render_args(tiny_city, city_container, out, frames=3))
    real = camera_path.write_png

    def stopped(path: Path, rgb: object) -> None:  # Ctrl-C while the rerun writes its second frame
        if path.name == "00001.png":
            raise KeyboardInterrupt
        real(path, rgb)
    monkeypatch.setattr(camera_path, "write_png", stopped)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        run_cli(lambda: render_cli.main(test_safety.render_args(tiny_city, city_container, out, frames=2)))
    assert exit_.value.code == 130
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: interrupted: {out / 'frames'} holds the first 1 of 2 frames; no video.mp4 or camera_path.json was "
        "written")
    assert sorted(p.name for p in out.rglob("*")) == ["00000.png", "config.yaml", "frames"]


def test_render_and_eval_refuse_a_folder_inside_a_dataset(tiny_city: Path, city_container: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    """A dataset's split folders are refused as render's, eval's and train's outputs like its root, before a lock
    file is written beside them; the dataset is a copy, so that a refusal that failed would not damage the
    session's fixture."""
    data = tmp_path / "data"
    shutil.copytree(tiny_city, data)
    before = listing(data)
    argv = ["--dataset_path", str(data), *test_safety.render_args(tiny_city, city_container, data / "train" / "rgbs")]
    line = refusal(render_cli.main, argv, capsys)
    assert line == (f"error: {data / 'train' / 'rgbs'}: inside the dataset {data}'s train images; give this run's "
                    "output a folder of its own")
    argv = ["--config_file", str(tiny_city / "config.yaml"), "--dataset_path", str(data), "--container_path",
            str(city_container), "--exp_name", str(data / "val"), "--no_progress"]
    line = refusal(eval_cli.main, argv, capsys)
    assert line == f"error: {data / 'val'}: inside the dataset {data}'s val images; give this run's output a folder " \
                   "of its own"
    argv = ["--config_file", str(tiny_city / "config.yaml"), "--dataset_path", str(data), "--exp_name",
            str(data / "train" / "exp"), *test_safety.SMALL]
    line = refusal(train_cli.main, argv, capsys)
    assert line == f"error: {data / 'train' / 'exp'}: inside the dataset {data}'s train images; give this run's " \
                   "output a folder of its own"
    assert listing(data) == before


@pytest.mark.parametrize("words, message", [
    (["--height", "100000"], "--height 100000: an H.264 video frame is at most 16384 pixels a side"),
    (["--fps", "1e300"], "--fps 1e+300: the video's frame rate must lie between 0.0001 and 1,001,000"),
    (["--height", "48"], "frames of 64x48 (--height 48): rendering one needs about 3.0 GiB of memory, 1.0 GiB "
                         "available; choose a smaller size"),
    (["--path", "wide.json"], "frames of 20000x12 (--path {wide}): an H.264 video frame is at most 16384 pixels a "
                              "side"),
])
def test_a_frame_size_or_rate_the_render_cannot_write_is_refused_before_anything_is(
        tiny_city: Path, city_container: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture, words: list[str], message: str) -> None:
    """Torch's allocator error, or ffmpeg's after every frame was rendered, came after config.yaml was written.
    The memory is that of a machine where a pixel takes a MiB to render, with a GiB free."""
    monkeypatch.setattr(camera_path, "RENDER_BYTES_PER_PIXEL", 2 ** 20)
    monkeypatch.setattr(io, "available_memory", lambda: 2 ** 30)  # what io.free_memory reads for the host
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 ** 30, 2 ** 31))
    wide = tmp_path / "wide.json"
    wide.write_text(json.dumps({"render_width": 20000, "render_height": 12, "camera_path": [
        {"camera_to_world": [1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1], "fov": 50}]}))
    words = [str(wide) if w == "wide.json" else w for w in words]
    out = tmp_path / "render"
    argv = ["--config_file", str(tiny_city / "config.yaml"), "--container_path", str(city_container), "--output",
            str(out), "--frames", "1", "--no_progress", *words]
    line = refusal(render_cli.main, argv, capsys)
    assert line == "error: " + message.format(wide=wide) and not out.exists()


@pytest.mark.parametrize("main", [render_cli.main, eval_cli.main])
def test_the_containers_scene_options_are_refused_on_the_command_line_only(
        main: Callable[[list[str]], object], tiny_city: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--near and the like were accepted and ignored (the container carries its own); a shared config file may
    still hold them (the tiny city's holds ray_altitude_range)."""
    command = "rendering" if main is render_cli.main else "evaluation"
    argv = ["--config_file", str(tiny_city / "config.yaml"), "--container_path", str(tmp_path / "none.pt"),
            "--output" if main is render_cli.main else "--exp_name", str(tmp_path / "out")]
    line = refusal(main, [*argv, "--near", "5"], capsys)
    assert line == (f"error: --near: {command} uses the container's own near/far bounds, altitude range and "
                    "partition (stored when it was merged); leave it out")
    shared = tmp_path / "shared.yaml"
    shared.write_text((tiny_city / "config.yaml").read_text() + "near: 5\nfar: 100\ncluster_2d: true\n")
    with pytest.raises(UserError, match="none.pt: container file not found"):  # past the options
        main([*argv[2:], "--config_file", str(shared)])


def test_a_folder_or_a_partitions_params_given_as_the_container_is_named(city_container: Path) -> None:
    with pytest.raises(UserError) as refused:
        load_container(city_container.parent)
    assert str(refused.value) == (f"{city_container.parent}: a folder, not a container file (give the .pt that "
                                  "scripts/merge_submodules.py wrote)")
    params = city_container.parent / "masks" / "params.pt"
    with pytest.raises(UserError) as refused:
        load_container(params)
    assert str(refused.value) == (f"{params}: a partition's params.pt (from scripts/create_cluster_masks.py), not a "
                                  "container (merge the trained cells with scripts/merge_submodules.py)")
