"""Nothing lost, nothing silent: full disks, killed runs and concurrent runs on the commands that write outputs
(render, eval, train), each checked against the files it leaves and the one line it prints.

The container is a 1 x 1 partition of the tiny city trained for two steps: enough to render, cheap to make.
"""
from __future__ import annotations

import errno
import io as io_module
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import OTHER_HOST, dead_pid
from test_video import decode

from mega_nerf import errors, io
from mega_nerf import lock as lock_module
from mega_nerf.cli import eval as eval_cli
from mega_nerf.cli import partition as partition_cli
from mega_nerf.cli import render as render_cli
from mega_nerf.cli import train as train_cli
from mega_nerf.data.chunks import masks_fingerprint
from mega_nerf.data.dataset import load_dataset
from mega_nerf.errors import UserError, run_cli, run_command, stop_on_signal
from mega_nerf.evaluation.evaluate import evaluate
from mega_nerf.lock import Held, lock_path
from mega_nerf.merging.merge import merge_submodules
from mega_nerf.training.log import Logger

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
SMALL = ["--data_mode", "memory", "--batch_size", "256", "--samples", "8", "--bg_samples", "4",
         "--log2_hashmap_size", "10", "--max_resolution", "32", "--occupancy_resolution", "8", "--no_progress",
         "--val_interval", "100000", "--val_images", "0"]


@pytest.fixture(scope="module")
def merged(tiny_city: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("safety")
    config = str(tiny_city / "config.yaml")
    partition_cli.main(["--config_file", config, "--output", str(root / "masks"), "--grid_dim", "1", "1",
                        "--ray_samples", "8", "--no_progress"])
    train_cli.main(["--config_file", config, "--exp_name", str(root / "exp-0"), "--train_iterations", "2",
                    "--cluster_mask_path", str(root / "masks" / "0"), *SMALL])
    merge_submodules(f"{root}/exp-", root / "masks" / "params.pt", root / "merged.pt", False, 1.15)
    return root / "merged.pt"


def fails_in_one_line(main, argv: list[str], capsys: pytest.CaptureFixture) -> str:
    """Run a command's main as its console script would; it must exit 2 with one error line on stderr, its last
    (warnings may come before it), and no traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        run_cli(lambda: main(argv))
    lines = capsys.readouterr().err.splitlines()
    assert exit_.value.code == 2 and [line for line in lines if not line.startswith("warning: ")] == lines[-1:]
    assert lines[-1].startswith("error: "), lines
    return lines[-1]


def render_args(tiny_city: Path, merged: Path, out: Path, frames: int = 3) -> list[str]:
    return ["--config_file", str(tiny_city / "config.yaml"), "--container_path", str(merged), "--output", str(out),
            "--frames", str(frames), "--height", "12", "--no_progress"]


def leftovers(folder: Path) -> list[str]:
    """Temp files and locks under `folder` and beside it."""
    return sorted(p.name for p in [*folder.rglob("*"), *folder.parent.iterdir()]
                  if ".tmp" in p.name or p.name.endswith(".lock"))


def test_render_onto_a_full_disk_fails_in_one_line_and_leaves_no_partial_frame(
        tiny_city: Path, merged: Path, tmp_path: Path, full_disk, capsys: pytest.CaptureFixture) -> None:
    render_cli.main(render_args(tiny_city, merged, tmp_path / "whole"))
    sizes = [p.stat().st_size for p in sorted((tmp_path / "whole" / "frames").iterdir())]
    # config.yaml (written first, and a byte shorter for "full" than for "whole") and the first frame fit, the
    # second frame does not
    full_disk((tmp_path / "whole" / "config.yaml").stat().st_size + sizes[0] + sizes[1] // 2)
    out = tmp_path / "full"
    err = fails_in_one_line(render_cli.main, render_args(tiny_city, merged, out), capsys)
    assert err.startswith(f"error: {out / 'frames' / '00001.png'}: could not write (no space left on device; ")
    assert sorted(p.name for p in (out / "frames").iterdir()) == ["00000.png"]
    assert (out / "config.yaml").is_file()
    assert (out / "frames" / "00000.png").read_bytes() == (tmp_path / "whole" / "frames" / "00000.png").read_bytes()
    assert not (out / "video.mp4").exists() and leftovers(out) == []


def test_eval_onto_a_full_disk_leaves_no_zero_byte_or_truncated_png(
        tiny_city: Path, merged: Path, tmp_path: Path, full_disk, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "eval"
    full_disk(3000)
    err = fails_in_one_line(eval_cli.main, ["--config_file", str(tiny_city / "config.yaml"), "--exp_name", str(out),
                                            "--container_path", str(merged), "--no_progress"], capsys)
    assert "could not write (no space left on device; " in err
    pngs = list(out.rglob("*.png"))
    assert all(cv2.imread(str(p)) is not None for p in pngs)  # every PNG there is whole
    assert not (out / "metrics.json").exists() and leftovers(out) == []


def test_a_failed_write_stops_eval_before_it_renders_the_rest(tiny_city: Path, merged: Path, tmp_path: Path,
                                                             full_disk) -> None:
    """PNGs are written on worker threads beside the renders: a write that fails on the first image stops the rank
    before it renders more than the image or two in progress beside it, not after its whole share (8 images)."""
    rendered: list[int] = []
    full_disk(3000)
    config = eval_cli.config_from_argv(["--config_file", str(tiny_city / "config.yaml"), "--exp_name",
                                        str(tmp_path / "eval"), "--container_path", str(merged), "--no_progress"])
    with pytest.raises(UserError, match="no space left on device"):
        evaluate(config, on_image=rendered.append)
    assert 1 <= len(rendered) <= 3


def test_eval_removes_what_killed_runs_left_mid_write(tiny_city: Path, merged: Path, tmp_path: Path) -> None:
    """Temp PNGs of a dead process go at the next evaluation into the same folder; a live process's stay."""
    dead = dead_pid()
    out = tmp_path / "eval"
    stale, live = out / "rgb" / f"not-an-image.png.{dead}.tmp", out / "depth" / f"not-an-image.png.{os.getpid()}.tmp"
    for path in (stale, live):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half a PNG")
    evaluate(eval_cli.config_from_argv(["--config_file", str(tiny_city / "config.yaml"), "--exp_name", str(out),
                                        "--container_path", str(merged), "--no_progress"]))
    assert not stale.exists() and live.exists()


def test_killed_render_reruns_and_its_video_is_never_partial(tiny_city: Path, merged: Path, tmp_path: Path) -> None:
    out = tmp_path / "render"
    args = render_args(tiny_city, merged, out)
    result = subprocess.run([sys.executable, "-c", (
        "import os, signal, sys\nimport mega_nerf.camera_path as cp\nfrom mega_nerf.cli import render\n"
        "from mega_nerf.errors import run_cli\n"
        "real = cp.write_png\n"
        "def dying(path, rgb):\n    if path.name == '00002.png':\n        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    real(path, rgb)\n"
        f"cp.write_png = dying\nsys.argv = ['render', *{args!r}]\nrun_cli(render.main)\n")],
        env=ENV, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == -signal.SIGKILL
    assert not (out / "video.mp4").exists()  # the killed run's MP4 is only under its temp name
    assert leftovers(out) != []  # and its lock and temp video are still there
    video = render_cli.main(args)
    assert decode(video)[1].shape[0] == 3  # every frame, decoded by ffmpeg
    assert len(list((out / "frames").iterdir())) == 3 and leftovers(out) == []


def wait_for(path: Path, process: subprocess.Popen, seconds: float = 120) -> None:
    start = time.monotonic()
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() - start < seconds
        time.sleep(0.1)


def test_a_second_run_on_the_same_outputs_stops_at_once(tiny_city: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    exp, chunks = tmp_path / "exp", tmp_path / "chunks"
    args = ["--config_file", str(tiny_city / "config.yaml"), "--exp_name", str(exp), "--chunk_paths", str(chunks),
            *SMALL[2:], "--train_iterations", "100000"]
    first = subprocess.Popen([sys.executable, str(REPO / "mega_nerf" / "train.py"), *args], env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        wait_for(lock_path(exp), first)
        wait_for(lock_path(chunks), first)
        host = socket.gethostname()
        start = time.monotonic()
        err = fails_in_one_line(train_cli.main, args, capsys)
        assert time.monotonic() - start < 5
        assert err == (f"error: --exp_name {exp}: in use by another run (pid {first.pid} on {host}); wait for it to "
                       "finish or use another --exp_name")
        other = [*args[:4], "--exp_name", str(tmp_path / "exp2"), *args[4:]][2:]  # same chunks, another exp
        err = fails_in_one_line(train_cli.main, ["--config_file", str(tiny_city / "config.yaml"), *other], capsys)
        assert err.startswith(f"error: --chunk_paths {chunks}: in use by another run (pid {first.pid} on {host})")
    finally:
        first.kill()
        first.wait()


def test_a_stale_lock_is_taken_over_and_a_foreign_host_is_named(tiny_city: Path, merged: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "render"
    dead = dead_pid()
    lock_path(out).write_text(f"{dead} {socket.gethostname()}\n")  # a run killed with -9
    render_cli.main(render_args(tiny_city, merged, out, frames=1))
    assert not lock_path(out).exists()
    lock_path(out).write_text(f"{dead} {socket.gethostname()} {io.HOST}\n")  # today's form, stale too
    render_cli.main(render_args(tiny_city, merged, out, frames=1))
    assert not lock_path(out).exists()
    for holder, host in (("4242 elsewhere", "elsewhere"),  # another host; and another container of this host
                         (f"{dead} {socket.gethostname()} {OTHER_HOST}", socket.gethostname())):
        lock_path(out).write_text(f"{holder}\n")
        err = fails_in_one_line(render_cli.main, render_args(tiny_city, merged, out, frames=1), capsys)
        pid = holder.split()[0]
        assert err == (f"error: --output {out}: in use by another run (pid {pid} on {host}); wait for it to finish "
                       f"or use another --output (if that run is gone, delete {lock_path(out)})")


def test_a_lock_another_run_took_over_meanwhile_is_not_removed(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Two runs find one dead run's lock: the first replaces it with its own while the second still holds what it
    read. The second must leave the first's lock (before, it deleted it and both held the output)."""
    out = tmp_path / "exp"
    dead = dead_pid()
    lock_path(out).write_text(f"{dead} {socket.gethostname()} {io.HOST}\n")
    first = f"{os.getpid()} {socket.gethostname()} {io.HOST}\n"  # the run that took it over (this process stands in)
    real_alive = lock_module.process_alive

    def first_run_takes_over(pid: int) -> bool:
        if pid == dead and lock_path(out).read_text() != first:
            lock_path(out).unlink()
            lock_path(out).write_text(first)
        return real_alive(pid)
    monkeypatch.setattr(lock_module, "process_alive", first_run_takes_over)
    with pytest.raises(Held, match=rf"in use by another run \(pid {os.getpid()} on "):
        lock_module.acquire(out, "--exp_name")
    assert lock_path(out).read_text() == first and [p.name for p in tmp_path.iterdir()] == [lock_path(out).name]


@pytest.mark.parametrize(("words", "message"), [
    (["--boundary_margin", "nan"], "--boundary_margin must be finite, got nan"),
    (["--ray_altitude_range", "nan", "2"], "--ray_altitude_range must be finite, got nan 2.0"),
    (["--lr", "nan"], "--lr must be finite, got nan"),
    (["--lr=-1e-3"], "--lr must be positive, got -0.001"),
    (["--batch_size", "0"], "--batch_size must be positive, got 0"),
    (["--train_iterations", "0"], "--train_iterations must be positive, got 0"),
    (["--near", "-1"], "--near must not be negative, got -1.0"),
    (["--keep_checkpoints", "-1"], "--keep_checkpoints must not be negative, got -1"),
    (["--near_gradient_distance", "-0.2"], "--near_gradient_distance must not be negative, got -0.2"),
    (["--boundary_margin", "0.5"], "--boundary_margin must be at least 1, got 0.5"),
])
def test_options_that_cannot_be_right_are_one_line(words: list[str], message: str) -> None:
    with pytest.raises(UserError, match=f"^{re.escape(message)}$"):
        train_cli.train_parser().parse_args(words)


@pytest.mark.parametrize("words", [["--dataset_pth", "d"], ["--batch_size", "many"], ["--grid_dim"]])
def test_a_bad_command_line_is_one_line_not_the_usage(words: list[str], capsys: pytest.CaptureFixture) -> None:
    """argparse's own errors (an unknown option, a value of the wrong type) print one line, not the whole usage."""
    with pytest.raises(SystemExit) as exit_:
        train_cli.train_parser().parse_args(words)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ") and "--help" in err, err


@pytest.mark.parametrize(("config", "message"), [
    ("ray_altitude_rnage: [-29, 2]\n", "unknown key 'ray_altitude_rnage' (did you mean 'ray_altitude_range'?)"),
    ("ray_altitude_range: [-29, 2, 5.0]\n", "ray_altitude_range needs 2 values, got 3"),
    ("batch_size: abc\n", "batch_size must be an integer, got 'abc'"),
    ("lr: [1, 2]\n", "lr takes one value, got 2"),
    ("- a list\n", "a config file holds 'key: value' lines"),
    ("keep_checkpoints: -1\n", "keep_checkpoints must not be negative, got -1"),
    ("lr: .nan\n", "lr must be finite, got nan"),
    ("coarse_samples: 0\n", "coarse_samples must be positive, got 0"),  # Mega-NeRF's name, as the file spells it
])
def test_config_file_mistakes_name_the_key_and_the_file(tmp_path: Path, config: str, message: str) -> None:
    (tmp_path / "c.yaml").write_text(config)
    with pytest.raises(UserError, match=f"^{re.escape(str(tmp_path / 'c.yaml'))}: {re.escape(message)}$"):
        train_cli.train_parser().parse_args(["--config_file", str(tmp_path / "c.yaml")])


def test_a_config_value_of_the_wrong_type_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """argparse's own type check, on a value from a file: the file and key, not an option the user never typed;
    given on the command line, the option."""
    (tmp_path / "c.yaml").write_text("samples: 3.5\n")
    for words, line in ((["--config_file", str(tmp_path / "c.yaml")],
                         f"error: {tmp_path / 'c.yaml'}: samples: invalid int value: '3.5'"),
                        (["--samples", "3.5"], "error: argument --samples: invalid int value: '3.5' (see "
                                                   f"{train_cli.train_parser().prog} --help)")):
        with pytest.raises(SystemExit):
            train_cli.train_parser().parse_args(words)
        assert capsys.readouterr().err.splitlines() == [line]


@pytest.mark.parametrize(("file", "words", "message"), [
    ("batch_size: 0\nkeep_checkpoints: 2\n", ["--batch_size", "8", "--keep_checkpoints", "-1"],
     "--keep_checkpoints must not be negative, got -1"),
    ("samples: 32\n", ["--coarse_samples", "0"], "--samples must be positive, got 0"),  # Mega-NeRF's name
    ("coarse_samples: 32\n", ["--samples=0"], "--samples must be positive, got 0"),
    ("keep_checkpoints: 2\n", ["--keep_check", "-1"], "--keep_checkpoints must not be negative, got -1"),  # prefix
])
def test_a_value_the_command_line_gives_over_a_config_file_is_named_as_an_option(
        tmp_path: Path, file: str, words: list[str], message: str) -> None:
    """Under any spelling of the option: the file's value, which it overrides, is not the one to mend."""
    (tmp_path / "c.yaml").write_text(file)
    with pytest.raises(UserError, match=f"^{re.escape(message)}$"):
        train_cli.train_parser().parse_args(["--config_file", str(tmp_path / "c.yaml"), *words])


def test_keys_of_other_commands_and_of_mega_nerf_are_accepted(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    """Keys of our other commands pass silently; Mega-NeRF's (flags too) and keys no command reads are each
    reported as ignored in one line, with the reason; only a near miss of one of our names is an error."""
    config = tmp_path / "c.yaml"
    config.write_text("grid_dim: [2, 2]\ncontainer_path: m.pt\ntrain_every: 1\nall_val: true\ncluster_2d: true\n"
                      "colour_space: srgb\nbatch_size: 64\n")
    assert train_cli.train_parser().parse_args(["--config_file", str(config)]).batch_size == 64
    assert capsys.readouterr().err.splitlines() == [
        "ignoring --all_val (Mega-NeRF's): evaluation scores the whole right half of every val image; validation "
        "during training, its part inside the cell",
        "ignoring --train_every (Mega-NeRF's): every training image is used",
        f"ignoring 'colour_space' in {config}: no command reads it"]


def test_an_output_folder_option_naming_a_file_is_one_line(tiny_city: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "file").write_text("not a folder")
    base = ["--config_file", str(tiny_city / "config.yaml"), *SMALL, "--train_iterations", "1"]
    err = fails_in_one_line(train_cli.main, [*base, "--exp_name", str(tmp_path / "file")], capsys)
    assert err == f"error: --exp_name {tmp_path / 'file'}: is a file, not a folder"
    err = fails_in_one_line(train_cli.main, [*base, "--exp_name", str(tmp_path / "exp"), "--chunk_paths",
                                             str(tmp_path / "file")], capsys)
    assert err == f"error: --chunk_paths {tmp_path / 'file'}: is a file, not a folder"


def test_a_grid_far_too_fine_for_the_scene_is_warned_about(tiny_city: Path) -> None:
    dataset = load_dataset(tiny_city)
    assert partition_cli.work_warning(dataset, (2, 2), 1000) is None
    warning = partition_cli.work_warning(dataset, (100, 100), 1000)
    assert warning == ("warning: --grid_dim 100 100: 10,000 cells for 40 images, 1.5e+12 point-centroid distances to "
                       "partition and 10,000 models to train; a smaller grid is usually what such a scene needs")
    assert partition_cli.work_warning(dataset, (7, 6), 8) is not None  # 42 cells for 40 images
    # the exact rule (no --ray_samples): 2K + 2 points per ray, 122,880 pixels
    assert partition_cli.work_warning(dataset, (2, 2), None) is None
    assert "2.5e+13 point-centroid distances" in partition_cli.work_warning(dataset, (100, 100), None)


def test_a_user_error_is_one_write(monkeypatch: pytest.MonkeyPatch) -> None:
    """run_cli writes the error line with its newline in one write, so that ranks sharing an unbuffered console
    (python -u) cannot interleave their lines."""
    writes: list[str] = []

    class Recorder:
        def write(self, text: str) -> int:
            writes.append(text)
            return len(text)

        def flush(self) -> None:
            pass

    def bad() -> None:
        raise UserError("--grid_dim: expected two numbers")
    monkeypatch.setattr(sys, "stderr", Recorder())
    with pytest.raises(SystemExit) as exit_info:
        run_cli(bad)
    assert exit_info.value.code == 2
    assert writes == ["error: --grid_dim: expected two numbers\n"]


# ---- bad input found by a new user's sweep (twenty-second session) ----------------------------------------------

def test_a_merged_container_given_as_a_checkpoint_is_one_line(merged: Path, tiny_city: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    line = fails_in_one_line(train_cli.main, ["--config_file", str(tiny_city / "config.yaml"), "--exp_name",
                                              str(tmp_path / "exp"), "--train_iterations", "4", "--ckpt_path",
                                              str(merged), *SMALL], capsys)
    assert line == f"error: {merged}: a merged container, not a training checkpoint (a run's checkpoints are its " \
                   "checkpoints/NNNNNNNN.pt)"


def test_a_checkpoint_whose_tensors_do_not_fit_its_field_is_one_line(merged: Path, tiny_city: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    state = torch.load(merged.parent / "exp-0" / "checkpoints" / "00000002.pt", weights_only=True)
    name = next(k for k, v in state["model"].items() if v.numel() > 1)
    state["model"][name] = state["model"][name].flatten()[:1]
    (tmp_path / "exp" / "checkpoints").mkdir(parents=True)
    torch.save(state, tmp_path / "exp" / "checkpoints" / "00000002.pt")
    line = fails_in_one_line(train_cli.main, ["--config_file", str(tiny_city / "config.yaml"), "--exp_name",
                                              str(tmp_path / "exp"), "--train_iterations", "4", "--cluster_mask_path",
                                              str(merged.parent / "masks" / "0"), *SMALL], capsys)
    assert line.startswith(f"error: {tmp_path / 'exp' / 'checkpoints' / '00000002.pt'}: its model does not fit its "
                           f"field config (size mismatch for {name}")


def test_a_checkpoint_without_what_a_resume_reads_is_one_line(merged: Path, tiny_city: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    state = torch.load(merged.parent / "exp-0" / "checkpoints" / "00000002.pt", weights_only=True)
    del state["optimizer"]
    (tmp_path / "exp" / "checkpoints").mkdir(parents=True)
    torch.save(state, tmp_path / "exp" / "checkpoints" / "00000002.pt")
    line = fails_in_one_line(train_cli.main, ["--config_file", str(tiny_city / "config.yaml"), "--exp_name",
                                              str(tmp_path / "exp"), "--train_iterations", "4", "--cluster_mask_path",
                                              str(merged.parent / "masks" / "0"), *SMALL], capsys)
    assert line == f"error: {tmp_path / 'exp' / 'checkpoints' / '00000002.pt'}: a checkpoint without optimizer: it " \
                   "cannot be resumed"


def test_a_partition_folder_given_for_one_cell_is_one_line(merged: Path, tiny_city: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    masks = merged.parent / "masks"
    line = fails_in_one_line(train_cli.main, ["--config_file", str(tiny_city / "config.yaml"), "--exp_name",
                                              str(tmp_path / "exp"), "--train_iterations", "4", "--cluster_mask_path",
                                              str(masks), *SMALL], capsys)
    assert line == f"error: --cluster_mask_path: {masks} is a whole partition's folder; give one cell's, " \
                   f"e.g. {masks / '0'}"


@pytest.mark.parametrize("option, inside", [("--exp_name", "0"), ("--exp_name", "exp-0"),
                                             ("--chunk_paths", "0/chunks")])
def test_a_run_inside_its_partitions_folder_is_one_line(merged: Path, tiny_city: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture, option: str,
                                                        inside: str) -> None:
    """`--exp_name masks/0` would train into cell 0's own masks: refused before anything is written."""
    masks = merged.parent / "masks"
    before = sorted(p.relative_to(masks) for p in masks.rglob("*"))
    path = masks / inside
    line = fails_in_one_line(train_cli.main, ["--config_file", str(tiny_city / "config.yaml"), "--exp_name",
                                              str(tmp_path / "exp"), "--chunk_paths", str(tmp_path / "chunks"),
                                              "--cluster_mask_path", str(masks / "0"), *SMALL, option, str(path)],
                             capsys)
    assert line == f"error: {option} {path}: inside the partition's folder {masks.resolve()}; give this run a " \
                   "folder of its own"
    assert sorted(p.relative_to(masks) for p in masks.rglob("*")) == before


def test_a_run_inside_its_partitions_folder_is_refused_through_a_link(merged: Path, tiny_city: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    """--cluster_mask_path a link to masks/0: the partition's folder is the link's target's parent."""
    masks = merged.parent / "masks"
    (tmp_path / "cell").symlink_to(masks / "0")
    line = fails_in_one_line(train_cli.main, ["--config_file", str(tiny_city / "config.yaml"), "--exp_name",
                                              str(masks / "exp-0"), "--cluster_mask_path", str(tmp_path / "cell"),
                                              *SMALL], capsys)
    assert line.startswith(f"error: --exp_name {masks / 'exp-0'}: inside the partition's folder "), line


def test_an_emptied_cell_folder_is_named(merged: Path, tiny_city: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture) -> None:
    """A cell's folder emptied after its chunks were written was blamed on the chunks ("of another masks")."""
    cell = tmp_path / "masks" / "0"
    shutil.copytree(merged.parent / "masks" / "0", cell)
    shutil.copy(merged.parent / "masks" / "params.pt", cell.parent / "params.pt")
    for mask in cell.iterdir():
        mask.unlink()
    line = fails_in_one_line(train_cli.main, ["--config_file", str(tiny_city / "config.yaml"), "--exp_name",
                                              str(tmp_path / "exp"), "--cluster_mask_path", str(cell), *SMALL], capsys)
    assert line == f"error: --cluster_mask_path: {cell} holds no masks (emptied, or not yet written: make the " \
                   "partition again with scripts/create_cluster_masks.py)"


def test_a_cell_folder_fingerprint_counts_its_files_only(tmp_path: Path) -> None:
    """Another tool's folder or a pipe beside the masks is no mask (reading a pipe would wait forever: an alarm
    interrupts that wait, so that such a fingerprint fails the test instead of hanging it)."""
    (tmp_path / "000000.mask").write_bytes(b"mask")
    before = masks_fingerprint(tmp_path)
    (tmp_path / ".ipynb_checkpoints").mkdir()
    os.mkfifo(tmp_path / "pipe")

    def waited(signum: int, frame: object) -> None:  # raised out of the open() that waits for the pipe's writer
        pytest.fail("masks_fingerprint waited 5 s: it opened the pipe beside the masks")

    previous = signal.signal(signal.SIGALRM, waited)
    signal.alarm(5)
    try:
        assert masks_fingerprint(tmp_path) == before
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    (tmp_path / "000001.mask").write_bytes(b"mask")
    assert masks_fingerprint(tmp_path) != before


def test_a_device_this_machine_lacks_is_one_line(tiny_city: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    line = fails_in_one_line(train_cli.main, ["--config_file", str(tiny_city / "config.yaml"), "--exp_name",
                                              str(tmp_path / "exp"), "--device", "cuda:99", *SMALL], capsys)
    assert line.startswith("error: --device cuda:99: this machine")
    assert not (tmp_path / "exp").exists()


def test_outputs_never_replace_a_dataset_or_another_commands_options(merged: Path, tiny_city: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    """eval given a training run's folder, or a dataset's, would overwrite the config.yaml kept there."""
    run = merged.parent / "exp-0" / "config.yaml"
    kept = run.read_bytes()
    line = fails_in_one_line(eval_cli.main, ["--config_file", str(tiny_city / "config.yaml"), "--container_path",
                                             str(merged), "--exp_name", str(run.parent)], capsys)
    assert line.startswith(f"error: {run}: holds another command's options (") and run.read_bytes() == kept
    data = tmp_path / "data"
    shutil.copytree(tiny_city, data)
    kept = (data / "config.yaml").read_bytes()
    line = fails_in_one_line(eval_cli.main, ["--config_file", str(data / "config.yaml"), "--container_path",
                                             str(merged), "--exp_name", str(data)], capsys)
    assert line == f"error: {data}: a dataset's folder; give this run's output a folder of its own"
    assert (data / "config.yaml").read_bytes() == kept
    eval_cli.main(["--config_file", str(tiny_city / "config.yaml"), "--container_path", str(merged), "--exp_name",
                   str(tmp_path / "eval")])
    eval_cli.main(["--config_file", str(tiny_city / "config.yaml"), "--container_path", str(merged), "--exp_name",
                   str(tmp_path / "eval")])  # its own options, replaced
    with open(tmp_path / "eval" / "config.yaml", "a") as f:  # an option no command has any more
        f.write("appearance_decay: 0.1\n")
    eval_cli.main(["--config_file", str(tiny_city / "config.yaml"), "--container_path", str(merged), "--exp_name",
                   str(tmp_path / "eval")])


def test_the_machines_errors_and_ctrl_c_are_one_line(capsys: pytest.CaptureFixture) -> None:
    def full() -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/runs/exp/log.jsonl")
    with pytest.raises(SystemExit) as exit_:
        run_cli(full)
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"error: /runs/exp/log.jsonl: {os.strerror(errno.ENOSPC)}\n"

    def written() -> None:  # a write's ENOSPC names no file
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with pytest.raises(SystemExit) as exit_:
        run_cli(written)
    assert exit_.value.code == 2 and capsys.readouterr().err == f"error: {os.strerror(errno.ENOSPC)}\n"

    def unnamed() -> None:  # a missing file the OS does not name: a program's, left as Python has it
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))
    with pytest.raises(FileNotFoundError):
        run_cli(unnamed)

    def interrupted() -> None:
        raise KeyboardInterrupt
    with pytest.raises(SystemExit) as exit_:
        run_cli(interrupted)
    assert exit_.value.code == 130 and capsys.readouterr().err == "error: interrupted\n"

    def bug() -> None:  # not the machine's: left as Python has it
        raise ConnectionRefusedError(errno.ECONNREFUSED, "refused")
    with pytest.raises(ConnectionRefusedError):
        run_cli(bug)


def test_a_log_that_cannot_close_leaves_the_error_that_stopped_the_run(tmp_path: Path) -> None:
    class Full:
        def close(self) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    log = Logger(tmp_path, 0)
    log.file.close()
    log.file = Full()
    with pytest.raises(UserError, match="log.jsonl: could not write"), log:
        raise UserError(f"{tmp_path / 'log.jsonl'}: could not write")
    with pytest.raises(OSError, match="No space left"), log:  # with nothing in flight, the close's own error
        pass


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_asks_a_loop_to_stop_unless_it_is_ignored(signum: int) -> None:
    """The first Ctrl-C or SIGTERM sets the request; SIGTERM after it changes nothing (a scheduler's and a
    launcher's both come), Ctrl-C after it acts at once; an ignored signal stays ignored; both handlers are back
    afterwards."""
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with stop_on_signal() as stop:
            os.kill(os.getpid(), signum)
            time.sleep(0.1)
            assert stop.signum == signum and signal.getsignal(signal.SIGINT) is previous[signal.SIGINT]
            os.kill(os.getpid(), signal.SIGTERM)  # ignored: this process lives on, the first signal kept
            time.sleep(0.1)
            assert stop.signum == signum
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)
        assert {s: signal.getsignal(s) for s in previous} == previous
        signal.signal(signum, signal.SIG_IGN)  # e.g. Ctrl-C to a job started in the background by a script
        with stop_on_signal() as stop:
            os.kill(os.getpid(), signum)
            time.sleep(0.1)
            assert not stop.is_set() and signal.getsignal(signum) is signal.SIG_IGN
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@pytest.mark.parametrize("ignored", [False, True])
def test_ctrl_c_while_a_command_imports_is_one_line(tmp_path: Path, ignored: bool) -> None:
    """Ctrl-C during a command's imports (torch's take seconds) ends it with run_cli's line and exit code 130, not a
    traceback from inside an import (errors.run_command, as every script and console script starts); a Ctrl-C
    ignored (a background job) stays ignored and the command runs."""
    (tmp_path / "slow_command.py").write_text(
        "import os, signal, time\nos.kill(os.getpid(), signal.SIGINT)\ntime.sleep(0.5)\n\n"
        "def main():\n    print('ran')\n")
    code = "from mega_nerf.errors import run_command\nrun_command('slow_command')\n"
    result = subprocess.run([sys.executable, "-c", code], env={**ENV, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"},
                            capture_output=True, text=True, timeout=120,
                            preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignored else None)
    if ignored:
        assert (result.returncode, result.stdout, result.stderr) == (0, "ran\n", ""), result
    else:
        assert (result.returncode, result.stdout, result.stderr) == (130, "", "error: interrupted\n"), result


@pytest.mark.parametrize("stdout_gone", [True, False])
def test_output_piped_to_a_reader_that_leaves_ends_quietly(tmp_path: Path, stdout_gone: bool) -> None:
    """`command | head -1`: once the reader of stdout has gone, the command ends as SIGPIPE would end it (141), with
    no traceback; a broken pipe of the command's own (stdout still read) is not hidden."""
    chatty = "def main():\n    for i in range(100_000):\n        print('line', i, 'of a long report')\n"
    own_pipe = "def main():\n    print('ran')\n    raise BrokenPipeError(32, 'a pipe of its own')\n"
    (tmp_path / "piped_command.py").write_text(chatty if stdout_gone else own_pipe)
    code = "from mega_nerf.errors import run_command\nrun_command('piped_command')\n"
    process = subprocess.Popen([sys.executable, "-c", code], env={**ENV, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = process.stdout.readline()
    if stdout_gone:
        process.stdout.close()  # as head does after its line
    _, stderr = process.communicate(timeout=120)
    if stdout_gone:
        assert (first, process.returncode, stderr) == ("line 0 of a long report\n", 141, "")
    else:
        assert (first, process.returncode) == ("ran\n", 1) and "BrokenPipeError: [Errno 32] a pipe of its own" in stderr


def test_run_command_gives_python_its_handler_back_however_the_imports_end(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The command runs under Python's own Ctrl-C handler (stop_on_signal records it to restore), and a failed
    import leaves that handler too, not the one that ends the process at once."""
    (tmp_path / "checks_handler.py").write_text(
        "import signal\n\ndef main():\n    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(SystemExit) as ended:
        run_command("checks_handler")
    assert ended.value.code == 0
    with pytest.raises(ModuleNotFoundError):
        run_command("no_such_command_module")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_field_too_large_for_memory_is_one_line(tiny_city: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    """Petabytes of hash table: refused by any machine's allocator at once."""
    line = fails_in_one_line(train_cli.main, ["--config_file", str(tiny_city / "config.yaml"), "--exp_name",
                                              str(tmp_path / "exp"), *SMALL, "--log2_hashmap_size", "44",
                                              "--max_resolution", "65536"], capsys)
    assert re.fullmatch(r"error: the hash field does not fit in host memory \(asked for .+\): lower "
                        r"--log2_hashmap_size \(44\), --max_resolution or --occupancy_resolution", line), line


def test_an_output_under_a_file_is_named_so(tiny_city: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "runs").write_text("a file where the runs' folder should be")
    exp = tmp_path / "runs" / "exp"
    line = fails_in_one_line(train_cli.main, ["--config_file", str(tiny_city / "config.yaml"), "--exp_name",
                                              str(exp), *SMALL], capsys)
    assert line.startswith("error: ") and line.endswith(f"cannot create the lock of --exp_name {exp} (a folder "
                                                        "above it is a file)"), line


def test_a_damaged_latest_checkpoint_names_the_older_ones(merged: Path, tiny_city: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    checkpoints = tmp_path / "exp" / "checkpoints"
    shutil.copytree(merged.parent / "exp-0" / "checkpoints", checkpoints)
    (checkpoints / "00000004.pt").write_bytes((checkpoints / "00000002.pt").read_bytes()[:1000])
    line = fails_in_one_line(train_cli.main, ["--config_file", str(tiny_city / "config.yaml"), "--exp_name",
                                              str(tmp_path / "exp"), "--train_iterations", "6", "--cluster_mask_path",
                                              str(merged.parent / "masks" / "0"), *SMALL], capsys)
    assert re.fullmatch(rf"error: {re.escape(str(checkpoints / '00000004.pt'))}: unreadable or truncated checkpoint "
                        r"\(\w+\); older checkpoints beside it: 00000002.pt \(move 00000004.pt away to resume from "
                        r"00000002.pt\)", line), line


def test_a_ckpt_path_of_another_cell_asks_for_another_checkpoint(merged: Path, tiny_city: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    """Not for another --exp_name, which is what a run's own checkpoint of another cell asks for."""
    source = merged.parent / "exp-0" / "checkpoints" / "00000002.pt"
    line = fails_in_one_line(train_cli.main, ["--config_file", str(tiny_city / "config.yaml"), "--exp_name",
                                              str(tmp_path / "exp"), "--train_iterations", "4", "--ckpt_path",
                                              str(source), *SMALL], capsys)
    assert line == f"error: {source}: checkpoint trained on cell 0's masks, but --cluster_mask_path gives no " \
                   "masks; give --ckpt_path another checkpoint or the masks it was trained with"


def test_a_merge_given_another_partitions_params_names_it(merged: Path, tiny_city: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    """The cell of the 1 x 1 partition merged with a 1 x 2 partition's params.pt: refused by its masks (not by the
    near/far range the two share, nor as a missing cell 1), naming the masks the cell was trained with."""
    from mega_nerf.cli import merge as merge_cli

    other = tmp_path / "other"
    partition_cli.main(["--config_file", str(tiny_city / "config.yaml"), "--output", str(other), "--grid_dim", "1",
                        "2", "--ray_samples", "8", "--no_progress"])
    root, output = merged.parent, tmp_path / "merged.pt"
    line = fails_in_one_line(merge_cli.main, ["--ckpt_prefix", f"{root}/exp-", "--centroid_path", str(other),
                                              "--output", str(output)], capsys)
    assert line == f"error: {other / 'params.pt'}: not the partition the submodules were trained on (submodule 0, " \
                   f"{root / 'exp-0' / 'checkpoints' / '00000002.pt'}, was trained with other masks than " \
                   f"{other / '0'}); it was trained with --cluster_mask_path {root / 'masks' / '0'}: give " \
                   f"--centroid_path {root / 'masks'}"
    assert not output.exists()


def moved_city(tiny_city: Path, folder: Path) -> Path:
    """A copy of the city at `folder` with every training camera moved: as many images, the same names and sizes,
    another dataset."""
    shutil.copytree(tiny_city, folder)
    for meta in (folder / "train" / "metadata").iterdir():
        data = torch.load(meta, weights_only=True)
        data["c2w"][:, 3] += 0.1
        torch.save(data, meta)
    return folder


@pytest.mark.parametrize("option, said", [("--min_views", "points seen by at least 1 training views"),
                                          ("--real_units", "real-world DRB metres"),
                                          ("--source_frame", "the source frame")])
def test_an_export_reading_another_dataset_of_as_many_images_is_one_line(merged: Path, tiny_city: Path,
                                                                         tmp_path: Path, option: str, said: str,
                                                                         capsys: pytest.CaptureFixture) -> None:
    """--min_views (the dataset's cameras), --real_units (its coordinates.pt) and --source_frame (its
    dataparser_transforms.json) read --dataset_path: a copy of the city with every training camera, its origin and
    its source frame moved (as many images, the same names and sizes) was read without a word, counting views,
    metres or the frame of another world. The container's dataset fingerprint refuses it in one line before
    anything is written; a copy of the city itself passes."""
    from mega_nerf.cli import export as export_cli
    from mega_nerf.data.frames import Similarity, write_source_frame

    moved, city = moved_city(tiny_city, tmp_path / "moved"), tmp_path / "city"
    shutil.copytree(tiny_city, city)
    coordinates = torch.load(moved / "coordinates.pt", weights_only=True)
    coordinates["origin_drb"] += 100.0
    torch.save(coordinates, moved / "coordinates.pt")
    for dataset, shift in ((moved, 1.0), (city, 0.0)):
        to_ours = Similarity(np.eye(3), np.array([1.0, 2, 3]) + shift, 0.5)
        write_source_frame(dataset, to_ours, 2.0, np.zeros(3), np.array([0.0, 0, 1]), "colmap")
    ply = tmp_path / "scene.ply"
    argv = ["--container_path", str(merged), "--output", str(ply), "--resolution", "8", option,
            *(["1"] if option == "--min_views" else []), "--no_progress"]
    line = fails_in_one_line(export_cli.main, [*argv, "--dataset_path", str(moved)], capsys)
    assert line == f"error: {merged}: trained on another dataset than {moved} (names, sizes or poses differ), or at " \
                   "another scale than --train_scale_factor 1"
    assert not ply.exists()
    export_cli.main([*argv, "--dataset_path", str(city)])
    assert said in capsys.readouterr().out and ply.is_file()


def test_a_launchs_ranks_say_a_line_once_whatever_its_characters(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """errors.write_line under mega-nerf-launch's folder: the first rank to write a line says it, the next saying
    the same does not, another line is said; a path's undecodable bytes (surrogates) are a line like any other."""
    monkeypatch.setenv(errors.SHARED_LINES, str(tmp_path))
    monkeypatch.setattr(sys, "stderr", io_module.StringIO())
    line = "error: /data/caf\udce9: dataset directory not found"
    for text in (line, line, "error: interrupted"):
        errors.write_line(text)
    assert sys.stderr.getvalue().splitlines() == [line, "error: interrupted"]
