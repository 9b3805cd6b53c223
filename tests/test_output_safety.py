"""An --output never destroys an input: the merge and the PLY export refuse, before anything is written, an output
path that is one of their inputs or an existing file of another kind, and still overwrite their own earlier
output (a rerun).

The partitions are 2 x 2 grids of small random hash fields (test_container.write_partition): merging and exporting
need no training. The dataset is a copy of the tiny city, so that a refusal that failed would not damage the
session's fixture.
"""
from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from test_container import random_field, write_partition

from mega_nerf.cli import export as export_cli
from mega_nerf.cli import merge as merge_cli
from mega_nerf.cli.preview import cameras_main
from mega_nerf.errors import run_cli
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


def test_the_cameras_export_refuses_a_dataset_file(scene: Path, capsys: pytest.CaptureFixture) -> None:
    target = scene / "city" / "coordinates.pt"
    line = refuses_and_keeps(cameras_main, ["--dataset_path", str(scene / "city"), "--output", str(target)], target,
                             capsys)
    assert line == f"error: --output {target} lies inside {scene / 'city'}, one of this command's inputs " \
                   "(--dataset_path); choose another path"
