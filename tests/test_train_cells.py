"""Training every cell (mega-nerf-train-cells): under torch.distributed.run with 2 ranks it trains the tiny city's
4 cells exactly as 4 separate train.py runs do (bit-equal checkpoints, one thread), a rerun after a kill resumes
the unfinished cells only, a failing cell is listed with its reason, and a crashing rank ends every rank with its
error; a cell whose directories another run holds is taken once that run lets it go; Ctrl-C ends the job, not
just its cell; each rank's device; the order (largest first) and the options' one-line errors."""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch
import yaml

from mega_nerf.cli.merge import check_merge_output
from mega_nerf.cli.parscript import main as parscript_main
from mega_nerf.cli.train import main as train_main
from mega_nerf.cli.train_cells import cells_config, train_cells_parser
from mega_nerf.cli.train_cells import main as train_cells_main
from mega_nerf.data.dataset import write_coordinates
from mega_nerf.errors import UserError, run_cli
from mega_nerf.training import all_cells
from mega_nerf.training.all_cells import cell_config, cell_sizes, largest_first

if TYPE_CHECKING:
    from conftest import Ranks

ROOT = Path(__file__).resolve().parents[1]
FINAL = "00000012.pt"
# A small hash grid on a few hundred rays a step, a checkpoint every 5 steps: what a CPU trains in a second.
TRAIN = ["--samples", "32", "--bg_samples", "32", "--hash_levels", "8", "--log2_hashmap_size", "14",
         "--max_resolution", "128", "--occupancy_resolution", "16", "--occupancy_warmup", "4", "--occupancy_interval",
         "2", "--batch_size", "256", "--train_iterations", "12", "--ckpt_interval", "5", "--val_interval", "1000",
         "--chunk_rays", "3000", "--no_progress"]


@pytest.fixture(scope="module")
def masks(tiny_city: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cells") / "masks"
    subprocess.run([sys.executable, "scripts/create_cluster_masks.py", "--config_file", str(tiny_city / "config.yaml"),
                    "--dataset_path", str(tiny_city), "--output", str(out), "--grid_dim", "2", "2", "--ray_samples",
                    "32", "--no_progress"], check=True, cwd=ROOT, capture_output=True)
    return out


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """CPU kernels split reductions across threads in varying ways; one thread makes runs bit-reproducible."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def scene(city: Path) -> list[str]:
    return ["--config_file", str(city / "config.yaml"), "--dataset_path", str(city)]


@pytest.fixture(scope="module")
def separate_runs(tiny_city: Path, masks: Path, tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> Path:
    """ref/exp-<k>: each cell trained by its own train.py run, as the parscript job list would."""
    root = tmp_path_factory.mktemp("separate")
    for k in range(4):
        train_main([*scene(tiny_city), "--exp_name", str(root / f"exp-{k}"), "--chunk_paths",
                    str(root / f"chunks-{k}"), "--cluster_mask_path", str(masks / str(k)), *TRAIN])
    return root


def cells_options(city: Path, masks: Path, root: Path, *extra: object) -> list[object]:
    return [*scene(city), "--mask_path", masks, "--exp_prefix", root / "exp-", "--chunk_prefix", root / "chunks-",
            "--timeout_minutes", 10, *TRAIN, *extra]


def same(a: Any, b: Any) -> bool:
    """Equal checkpoint contents: tensors bit for bit, containers item by item."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def assert_as_separate_runs(root: Path, separate_runs: Path) -> None:
    for k in range(4):
        ours = torch.load(root / f"exp-{k}" / "checkpoints" / FINAL, weights_only=True)
        reference = torch.load(separate_runs / f"exp-{k}" / "checkpoints" / FINAL, weights_only=True)
        assert same(ours, reference), f"cell {k}"


def test_the_job_list_replaces_only_a_job_list_of_its_own(tmp_path: Path) -> None:
    """make_parscript.py --output X/config.yaml replaced the config (and any other file), wrote into a dataset's
    folders, and --cells 100000000 nearly hung writing a 20 GB list; each is refused untouched, and a rerun over
    its own list replaces it."""
    data = tmp_path / "data"
    write_coordinates(data, torch.zeros(3), 1.0)
    config = tmp_path / "config.yaml"
    config.write_text("lr: 0.01\n")
    refused = {config: "exists and is not a job list", tmp_path: "is a folder",
               data / "jobs.txt": f"inside the dataset {data}'s own folder",
               data / "train" / "jobs.txt": f"inside the dataset {data}'s train images"}
    for output, message in refused.items():
        before = output.read_bytes() if output.is_file() else None
        with pytest.raises(UserError, match=message):
            parscript_main(["--cells", "4", "--output", str(output)])
        assert (output.read_bytes() if output.is_file() else None) == before
    assert not (data / "train").exists()
    jobs = tmp_path / "run.txt"
    with pytest.raises(UserError, match="--cells must be between 1 and 10,000 .*, got 100,000,000"):
        parscript_main(["--cells", "100000000", "--output", str(jobs)])
    assert not jobs.exists()
    for cells in (4, 2):
        parscript_main(["--cells", str(cells), "--output", str(jobs)])
        assert len(jobs.read_text().splitlines()) == cells


def test_cells_go_largest_first(masks: Path, tmp_path: Path) -> None:
    """Here and in the parscript job list (make_parscript.py --mask_path)."""
    sizes = cell_sizes(masks)
    assert len(sizes) == 4 and min(sizes) > 0
    assert [sizes[k] for k in largest_first(sizes)] == sorted(sizes, reverse=True)
    parscript_main(["--cells", "4", "--output", str(tmp_path / "run_4.txt"), "--mask_path", str(masks)])
    jobs = (tmp_path / "run_4.txt").read_text().splitlines()
    assert [int(line.split("}/")[1].split('"')[0]) for line in jobs] == largest_first(sizes)  # "${MASK_PATH..}/k"
    with pytest.raises(UserError, match="holds 4 cells, not --cells 8"):
        parscript_main(["--cells", "8", "--output", str(tmp_path / "run_8.txt"), "--mask_path", str(masks)])
    (masks / "partition.json").rename(masks / "partition.bak")  # as Mega-NeRF's masks: counted from the files
    try:
        assert cell_sizes(masks) == sizes
    finally:
        (masks / "partition.bak").rename(masks / "partition.json")
    assert largest_first([5, 9, 9, 1]) == [1, 2, 0, 3]


@pytest.mark.parametrize("launcher", ["torch.distributed.run", "mega_nerf.cli.launch"])
def test_two_ranks_train_every_cell_as_separate_runs(launcher: str, tiny_city: Path, masks: Path, separate_runs: Path,
                                                     tmp_path: Path, launch: Callable[..., Ranks]) -> None:
    """Under torchrun and under mega-nerf-launch (its own ranks and store on one machine)."""
    result = launch("cells", cells_options(tiny_city, masks, tmp_path), launcher=launcher)
    assert result.codes == [0], result.stderr[0][-3000:]
    assert "4 of 4 cells trained" in result.stdout[0]
    assert {f"rank {r}: cell" in result.stdout[0] for r in (0, 1)} == {True}  # both ranks took cells
    assert_as_separate_runs(tmp_path, separate_runs)
    for k in range(4):  # each cell's resolved options, saved where train.py would save them
        saved = yaml.safe_load((tmp_path / f"exp-{k}" / "config.yaml").read_text())
        assert (saved["exp_name"], saved["cluster_mask_path"]) == (str(tmp_path / f"exp-{k}"), str(masks / str(k)))


def test_a_rerun_after_a_kill_resumes_the_unfinished_cells_only(tiny_city: Path, masks: Path, separate_runs: Path,
                                                                tmp_path: Path,
                                                                launch: Callable[..., Ranks]) -> None:
    """The third cell handed out dies at step 8 (its last checkpoint: step 5) and takes the job down. The rerun
    leaves the cells trained before it alone (their final checkpoints untouched) and ends like separate runs."""
    options = cells_options(tiny_city, masks, tmp_path)
    killed_cell = largest_first(cell_sizes(masks))[2]
    killed = launch("cells", options, hook=(-1, "exit", f"{killed_cell},8"))
    assert killed.codes != [0]
    assert sorted(p.name for p in (tmp_path / f"exp-{killed_cell}" / "checkpoints").iterdir()) == ["00000005.pt"]
    finished = {k: (p.read_bytes(), p.stat().st_mtime_ns) for k in range(4)
                if (p := tmp_path / f"exp-{k}" / "checkpoints" / FINAL).exists()}
    assert finished, "a larger cell finished before the third one started"
    rerun = launch("cells", options)
    assert rerun.codes == [0], rerun.stderr[0][-3000:]
    for k, (data, mtime) in finished.items():
        path = tmp_path / f"exp-{k}" / "checkpoints" / FINAL
        assert (path.read_bytes(), path.stat().st_mtime_ns) == (data, mtime)
        assert f"cell {k}: ok: already trained" in rerun.stdout[0]
    assert f"cell {killed_cell}: ok: resumed at step 5, trained to step 12" in rerun.stdout[0]
    assert_as_separate_runs(tmp_path, separate_runs)


def test_a_rerun_with_other_options_leaves_the_trained_cells_alone(tiny_city: Path, masks: Path,
                                                                   separate_runs: Path, tmp_path: Path) -> None:
    """A rerun over finished cells with another training option (--lr) passes over them without saving that option
    as theirs. One with another render setting (--samples) fails the unfinished cell in one line naming the
    settings (the cells are merged together, and resumed with them it made the merge fail); the finished ones,
    which train no more, pass."""
    for k in range(4):
        shutil.copytree(separate_runs / f"exp-{k}", tmp_path / f"exp-{k}")
    saved = {k: (tmp_path / f"exp-{k}" / "config.yaml").read_bytes() for k in range(4)}
    options = [str(o) for o in cells_options(tiny_city, masks, tmp_path, "--data_mode", "memory")]
    train_cells_main([*options, "--lr", "0.5"])
    assert {k: (tmp_path / f"exp-{k}" / "config.yaml").read_bytes() for k in range(4)} == saved
    (tmp_path / "exp-2" / "checkpoints" / FINAL).unlink()  # cell 2 now stops at step 10 of 12
    with pytest.raises(UserError) as error:
        train_cells_main([*options, "--samples", "16"])
    reasons = str(error.value).split("cell ")[1:]
    assert len(reasons) == 1 and reasons[0].startswith("2: ") and "trained with render settings" in reasons[0] \
        and "this job gives" in reasons[0] and "give the options it was trained with" in reasons[0], error.value
    assert {k: (tmp_path / f"exp-{k}" / "config.yaml").read_bytes() for k in range(4)} == saved


def test_a_failing_cell_is_listed_and_the_others_are_trained(tiny_city: Path, masks: Path, tmp_path: Path,
                                                             launch: Callable[..., Ranks]) -> None:
    """A user error in one cell (as a non-finite loss would raise) fails that cell only."""
    first = largest_first(cell_sizes(masks))[0]
    result = launch("cells", cells_options(tiny_city, masks, tmp_path), hook=(-1, "user", f"{first},3"))
    assert result.codes != [0]
    assert (f"error: 1 of 4 cells failed (a rerun retries them only): cell {first}: fails on purpose (test hook)"
            in result.stderr[0].splitlines())
    assert sorted(k for k in range(4) if (tmp_path / f"exp-{k}" / "checkpoints" / FINAL).exists()) == \
        sorted(set(range(4)) - {first})


def test_a_crashing_rank_ends_every_rank_with_its_error(tiny_city: Path, masks: Path, tmp_path: Path,
                                                        launch: Callable[..., Ranks]) -> None:
    """Rank 1 crashes at step 3 of a cell; with no launcher to stop it (as on another node), rank 0 stops within
    seconds, not at the 10-minute timeout, with rank 1's error as its one line."""
    result = launch("cells", cells_options(tiny_city, masks, tmp_path), hook=(1, "crash", "3"), agent=False)
    assert result.codes == [2, 1]
    assert result.last_error_lines() == ["error: rank 1 failed: RuntimeError: fails on purpose (test hook)",
                                         "RuntimeError: fails on purpose (test hook)"]
    assert result.seconds < 60


def test_bad_options_are_one_line(tiny_city: Path, masks: Path, tmp_path: Path) -> None:
    base = [*scene(tiny_city), "--exp_prefix", str(tmp_path / "exp-")]
    with pytest.raises(UserError, match="missing option --mask_path"):
        train_cells_main(base)
    with pytest.raises(UserError, match="missing option --chunk_prefix"):
        train_cells_main([*base, "--mask_path", str(masks)])
    with pytest.raises(UserError, match="nowhere is not a directory"):
        train_cells_main([*base, "--mask_path", str(tmp_path / "nowhere"), "--data_mode", "memory"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="params.pt: partition parameters missing"):
        train_cells_main([*base, "--mask_path", str(tmp_path / "empty"), "--data_mode", "memory"])
    for option, prefix in (("--exp_prefix", f"{masks}/"), ("--exp_prefix", f"{masks}/exp-"),
                           ("--chunk_prefix", f"{masks}/0/chunks-")):  # `<masks>/` would train into cell k's masks
        with pytest.raises(UserError, match=rf"^{option} {re.escape(prefix)}: inside the partition's folder "):
            train_cells_main([*scene(tiny_city), "--exp_prefix", str(tmp_path / "exp-"), "--mask_path", str(masks),
                              "--chunk_prefix", str(tmp_path / "chunks-"), option, prefix])


def test_a_merge_output_that_would_destroy_a_file_is_refused_before_training(tiny_city: Path, masks: Path,
                                                                              tmp_path: Path) -> None:
    """--merge_output over the config, the partition's params.pt or a cell's (future) checkpoint replaced them
    with the container once every cell had trained, and a path under a file failed only then: each is one line
    now, before any cell trains, the files untouched."""
    (tmp_path / "a-file").write_text("not a folder")
    config, params = tiny_city / "config.yaml", masks / "params.pt"
    before = config.read_bytes(), params.read_bytes()
    cases = {str(config): "is one of this command's inputs (--config_file)",
             str(params): "is one of this command's inputs (--centroid_path)",
             str(tmp_path / "exp-1" / "checkpoints" / "00000030.pt"): "cell 1's checkpoints; choose another path",
             str(tmp_path / "exp-3"): "cell 3's folder; choose another path",
             str(tmp_path / "a-file" / "merged.pt"): "above it is a file"}
    for output, message in cases.items():
        with pytest.raises(UserError, match=rf"^--merge_output {re.escape(output)}:? .*{re.escape(message)}"):
            train_cells_main([*scene(tiny_city), "--exp_prefix", str(tmp_path / "exp-"), "--mask_path", str(masks),
                              "--data_mode", "memory", "--merge_output", output])
    assert (config.read_bytes(), params.read_bytes()) == before
    assert not list(tmp_path.glob("exp-*"))  # no cell started
    for output in (tmp_path / "exp-1" / "merged.pt", tmp_path / "exp-12" / "merged.pt"):  # no file of a run's
        check_merge_output(str(output), "--merge_output", f"{tmp_path}/exp-", str(masks), str(config),
                           str(tiny_city))


@pytest.mark.parametrize("finished", [True, False])
def test_a_cell_another_run_holds_is_taken_once_that_run_lets_it_go(finished: bool, tiny_city: Path, masks: Path,
                                                                    separate_runs: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Two jobs on one prefix share its cells: a cell whose folders another live run holds (its lock: this process
    stands in for it) is passed over, then taken once the holder lets it go after the other cells: found trained
    (the holder `finished` it; no data prepared) or trained on from the holder's checkpoint at step 10. Tried twice,
    not polled in a loop; the job ends with every cell trained and every lock given back."""
    monkeypatch.setattr(all_cells, "HELD_POLL_SECONDS", 0.05)
    tries: list[int] = []
    train_cell = all_cells.train_cell

    def counted(run: Any, cell: int, *rest: Any) -> Any:
        tries.append(cell)
        return train_cell(run, cell, *rest)
    monkeypatch.setattr(all_cells, "train_cell", counted)
    lock = tmp_path / ".exp-0.lock"
    lock.write_text(f"{os.getpid()} {socket.gethostname()}\n")

    def holder() -> None:  # lets cell 0 go once this job has trained the others (or after a minute: no hang)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and \
                not all((tmp_path / f"exp-{k}" / "checkpoints" / FINAL).exists() for k in (1, 2, 3)):
            time.sleep(0.05)
        shutil.copytree(separate_runs / "exp-0", tmp_path / "exp-0")
        if not finished:
            (tmp_path / "exp-0" / "checkpoints" / FINAL).unlink()  # the holder stopped at step 10 of 12
        lock.unlink()
    thread = threading.Thread(target=holder, daemon=True)
    thread.start()
    train_cells_main([str(o) for o in cells_options(tiny_city, masks, tmp_path, "--data_mode", "memory")])
    thread.join(10)
    out = capsys.readouterr().out
    assert f"rank 0: cell 0: another run is training it (pid {os.getpid()} on {socket.gethostname()}); taken " \
           "again once that run lets it go\n" in out
    final = tmp_path / "exp-0" / "checkpoints" / FINAL
    how = "already trained" if finished else "resumed at step 10, trained to step 12"
    assert re.search(rf"cell 0: ok \(rank 0, \d+ s\): {how}: {re.escape(str(final))}", out), out
    assert "4 of 4 cells trained" in out and not list(tmp_path.glob(".*.lock"))
    assert sorted(tries) == [0, 0, 1, 2, 3] and tries[-1] == 0  # tried again last, once


def test_a_merge_another_job_is_writing_is_left_to_it(tiny_city: Path, masks: Path, separate_runs: Path,
                                                      tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Two jobs on one prefix both end by merging the same cells: the one that finds the merge output held says so
    in a note and ends as done, instead of failing after every cell trained."""
    for k in range(4):
        shutil.copytree(separate_runs / f"exp-{k}", tmp_path / f"exp-{k}")
    merged = tmp_path / "merged.pt"
    (tmp_path / ".merged.pt.lock").write_text(f"{os.getpid()} {socket.gethostname()}\n")  # the other job's merge
    train_cells_main([str(o) for o in cells_options(tiny_city, masks, tmp_path, "--data_mode", "memory",
                                                    "--merge_output", merged)])
    out = capsys.readouterr().out
    assert f"note: not merged here: --merge_output {merged}: in use by another run (pid {os.getpid()} on " in out
    assert "4 of 4 cells trained" in out and not merged.exists()


def test_a_cell_held_from_another_host_that_changes_nothing_fails_with_the_lock_to_delete(
        tiny_city: Path, masks: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A holder on another host (or container) cannot be checked from here: once its cell's folders have not
    changed for --timeout_minutes, the cell fails naming the lock; the other cells train."""
    monkeypatch.setattr(all_cells, "HELD_POLL_SECONDS", 0.05)
    lock = tmp_path / ".exp-0.lock"
    lock.write_text("4242 elsewhere 0badc0de\n")
    options = [str(o) for o in cells_options(tiny_city, masks, tmp_path, "--data_mode", "memory")]
    options[options.index("--timeout_minutes") + 1] = "0.01"
    with pytest.raises(UserError) as error:
        train_cells_main(options)
    assert str(error.value) == (f"1 of 4 cells failed (a rerun retries them only): cell 0: the run holding it (pid "
                                f"4242 on elsewhere) changed none of its files for 0.01 minutes (--timeout_minutes); "
                                f"if that run is gone, delete {lock} and run again")
    assert [k for k in range(4) if (tmp_path / f"exp-{k}" / "checkpoints" / FINAL).exists()] == [1, 2, 3]
    assert lock.exists()


def run_signalled(tiny_city: Path, masks: Path, tmp_path: Path, at_step: int, *signums: int) -> tuple[int, set[int]]:
    """train_cells as its console script runs it, `signums` raised at step `at_step` of a cell: the exit code and
    the cells that started."""
    started: set[int] = set()

    def signal_at_step(cell: int, step: int) -> None:
        started.add(cell)
        if step == at_step:
            for signum in signums:
                signal.raise_signal(signum)
    argv = [str(o) for o in cells_options(tiny_city, masks, tmp_path, "--data_mode", "memory")]
    with pytest.raises(SystemExit) as ended:
        run_cli(lambda: train_cells_main(argv, on_step=signal_at_step))
    return ended.value.code, started


def test_ctrl_c_ends_the_job_not_the_cell(tiny_city: Path, masks: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    """Ctrl-C during step 3 of the first cell stops the whole command in one line, exit code 130, with that step
    saved: the user wants the job to stop, so the cell is not marked failed and no later cell starts."""
    first = largest_first(cell_sizes(masks))[0]
    code, started = run_signalled(tiny_city, masks, tmp_path, 3, signal.SIGINT)
    out, err = capsys.readouterr()
    saved = tmp_path / f"exp-{first}" / "checkpoints" / "00000003.pt"
    assert code == 130
    assert [line for line in err.splitlines() if line.startswith("error")] == [
        f"error: interrupted at step 3: saved {saved}; the same command resumes from it"]
    assert sorted(p.name for p in saved.parent.iterdir()) == [saved.name]
    assert started == {first} and [p.name for p in tmp_path.glob("exp-*")] == [f"exp-{first}"]
    assert "FAILED" not in out and out.count("rank 0: cell") == 1


def test_sigterm_in_a_cells_last_step_ends_the_job_before_the_next_cell(tiny_city: Path, masks: Path,
                                                                        tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture) -> None:
    """SIGTERM (twice, as a scheduler and a launcher send it) during the first cell's last step: that cell ends as
    trained, and the job stops with exit code 143 before any other cell starts (it would be killed in it)."""
    first = largest_first(cell_sizes(masks))[0]
    code, started = run_signalled(tiny_city, masks, tmp_path, 12, signal.SIGTERM, signal.SIGTERM)
    err = capsys.readouterr().err
    final = tmp_path / f"exp-{first}" / "checkpoints" / FINAL
    assert code == 143
    assert [line for line in err.splitlines() if line.startswith("error")] == [
        f"error: terminated (SIGTERM) during cell {first}'s last step, which finished ({final}); the same command "
        "trains the cells left"]
    assert final.is_file() and started == {first} and [p.name for p in tmp_path.glob("exp-*")] == [f"exp-{first}"]


def test_each_rank_trains_on_its_own_device_unless_one_is_given(tiny_city: Path, masks: Path, tmp_path: Path) -> None:
    """TrainConfig always resolves a device (cuda or cpu), so the rank's device comes from the user's --device
    alone: cell k on rank r's cuda:r, or everywhere the one given."""
    for given, expected in ((None, "cuda:1"), ("cpu", "cpu")):
        extra = ["--data_mode", "memory", *(["--device", given] if given else [])]
        config = cells_config(train_cells_parser().parse_args([str(o) for o in cells_options(tiny_city, masks,
                                                                                               tmp_path, *extra)]))
        run = cell_config(config, 2, torch.device("cuda", 1))
        assert (run.device, run.exp_name, run.cluster_mask_path) == (expected, f"{tmp_path / 'exp-'}2",
                                                                     str(masks / "2"))
