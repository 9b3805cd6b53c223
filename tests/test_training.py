"""Training one submodule: PSNR rises on the tiny city, a killed run resumes bit-equal, bad input is one line,
and the parscript job list trains two cells end to end."""
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import dead_pid

from mega_nerf import io
from mega_nerf.bounds import camera_spacing
from mega_nerf.cli.train import config_from_argv, train_config, train_parser
from mega_nerf.cli.train import main as train_main
from mega_nerf.data.dataset import load_dataset
from mega_nerf.distributed import PeerFailure
from mega_nerf.errors import UserError
from mega_nerf.fields import build_field, config_differences
from mega_nerf.merging.merge import find_submodules
from mega_nerf.partition.maskfile import write_mask
from mega_nerf.rays import Cameras
from mega_nerf.training import checkpoint as ckpt
from mega_nerf.training import trainer as trainer_module
from mega_nerf.training.checkpoint import load_checkpoint, prune_checkpoints
from mega_nerf.training.trainer import NEAR_GRADIENT_SPACINGS, Trainer, field_config

ROOT = Path(__file__).resolve().parents[1]
# A small hash grid, few samples: what a CPU trains in seconds.
SMALL = ["--samples", "32", "--bg_samples", "32", "--hash_levels", "8", "--log2_hashmap_size", "14",
         "--max_resolution", "128", "--occupancy_resolution", "16", "--occupancy_warmup", "50", "--no_progress"]


# Trains like mega_nerf/train.py, but dies abruptly (as kill -9 would) after the step given first.
KILLED_RUN = ("import os, sys; from mega_nerf.cli.train import config_from_argv; "
              "from mega_nerf.training.trainer import Trainer; kill_at = int(sys.argv[1]); "
              "Trainer(config_from_argv(sys.argv[2:]), on_step=lambda s: s == kill_at and os._exit(3)).run()")

# The same, through run_cli as every command runs, but the signal named first (SIGINT: Ctrl-C; SIGTERM: a batch
# scheduler's preemption) comes during the step given second.
INTERRUPTED_RUN = ("import os, signal, sys; from mega_nerf.cli.train import config_from_argv; "
                   "from mega_nerf.errors import run_cli; from mega_nerf.training.trainer import Trainer; "
                   "name, at = sys.argv[1], int(sys.argv[2]); run_cli(lambda: Trainer(config_from_argv(sys.argv[3:]), "
                   "on_step=lambda s: s == at and os.kill(os.getpid(), getattr(signal, name))).run())")


def args(city: Path, exp: Path, *extra: str):
    return config_from_argv(["--config_file", str(city / "config.yaml"), "--dataset_path", str(city),
                             "--exp_name", str(exp), *SMALL, *extra])


@pytest.fixture(scope="module")
def masks(tiny_city, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train") / "masks"
    subprocess.run([sys.executable, "scripts/create_cluster_masks.py", "--config_file", str(tiny_city / "config.yaml"),
                    "--dataset_path", str(tiny_city), "--output", str(out), "--grid_dim", "2", "1"],
                   check=True, cwd=ROOT, capture_output=True)
    return out


def test_training_raises_val_psnr(tiny_city, tmp_path):
    """Measured: 13.8 dB untrained -> 18.6 dB after 150 steps of 512 rays (right halves of the val images; 18.7
    with --no_horizon_background)."""
    trainer = Trainer(args(tiny_city, tmp_path / "exp", "--data_mode", "memory", "--batch_size", "512",
                           "--train_iterations", "150", "--ckpt_interval", "150", "--val_interval", "150",
                           "--val_images", "8"))
    before = trainer.validate()["val_psnr"]
    final = trainer.run()
    after = trainer.validate()["val_psnr"]
    assert after > before + 3.0, (before, after)
    assert final.name == "00000150.pt" and (tmp_path / "exp" / "val" / "00000150_000004.png").exists()
    assert (tmp_path / "exp" / "log.jsonl").read_text().count("val_psnr") >= 1
    assert list((tmp_path / "exp" / "tensorboard").glob("events.out.tfevents.*"))


@pytest.fixture
def one_thread():
    """CPU kernels split reductions across threads in varying ways; one thread makes runs bit-reproducible."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_killed_run_resumes_bit_equal(tiny_city, masks, tmp_path, one_thread, capsys):
    common = ["--cluster_mask_path", str(masks / "0"), "--batch_size", "256", "--train_iterations", "12",
              "--ckpt_interval", "5", "--val_interval", "1000", "--chunk_rays", "3000", "--occupancy_warmup", "4",
              "--occupancy_interval", "2", "--log_interval", "1"]
    whole = Trainer(args(tiny_city, tmp_path / "whole", "--chunk_paths", str(tmp_path / "c1"), *common))
    whole.run()
    argv = ["--config_file", str(tiny_city / "config.yaml"), "--dataset_path", str(tiny_city), "--exp_name",
            str(tmp_path / "killed"), "--chunk_paths", str(tmp_path / "c2"), *SMALL, *common,
            "--keep_checkpoints", "0"]  # step 5's checkpoint starts a run below
    cmd = [sys.executable, "mega_nerf/train.py", *argv]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN, "8", *argv], cwd=ROOT, env=env, capture_output=True)
    assert killed.returncode == 3  # died after step 8; its last checkpoint is step 5
    assert sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir()) == ["00000005.pt"]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
    resumed = torch.load(tmp_path / "killed" / "checkpoints" / "00000012.pt", weights_only=True)
    assert resumed["step"] == 12 and resumed["iterations"] == 12  # the plan, which merge checks the step against
    # --ckpt_path (Mega-NeRF's): a new experiment that starts from the killed run's checkpoint ends the same
    started = Trainer(args(tiny_city, tmp_path / "started", "--chunk_paths", str(tmp_path / "c2"), *common,
                           "--ckpt_path", str(tmp_path / "killed" / "checkpoints" / "00000005.pt")))
    assert started.run().name == "00000012.pt"
    capsys.readouterr()
    rerun = Trainer(args(tiny_city, tmp_path / "started", "--chunk_paths", str(tmp_path / "c2"), *common,
                         "--ckpt_path", str(tmp_path / "nowhere.pt")))  # read only for a run without checkpoints
    assert rerun.run().name == "00000012.pt"
    assert f"note: --ckpt_path {tmp_path / 'nowhere.pt'} is not read: {tmp_path / 'started'} holds checkpoints of " \
           "its own, the latest 00000012.pt" in capsys.readouterr().err
    # Ctrl-C: the step under way ends and is saved, in one line; the same command then ends as the others
    interrupted = [*argv[:argv.index("--exp_name") + 1], str(tmp_path / "interrupted"),
                   *argv[argv.index("--exp_name") + 2:]]
    run = subprocess.run([sys.executable, "-c", INTERRUPTED_RUN, "SIGINT", "7", *interrupted], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    saved = tmp_path / "interrupted" / "checkpoints" / "00000007.pt"
    assert run.returncode == 130 and run.stderr.splitlines()[-1] == \
        f"error: interrupted at step 7: saved {saved}; the same command resumes from it", run.stderr
    assert sorted(p.name for p in saved.parent.iterdir()) == ["00000005.pt", "00000007.pt"]
    # SIGTERM (SLURM's preemption or time limit) the same, with a shell's code for it; it saved the same state
    terminated = [str(tmp_path / "terminated") if word == str(tmp_path / "interrupted") else word
                  for word in interrupted]
    run = subprocess.run([sys.executable, "-c", INTERRUPTED_RUN, "SIGTERM", "7", *terminated], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    term_saved = tmp_path / "terminated" / "checkpoints" / "00000007.pt"
    assert run.returncode == 143 and run.stderr.splitlines()[-1] == \
        f"error: terminated (SIGTERM) at step 7: saved {term_saved}; the same command resumes from it", run.stderr
    at_interrupt, at_term = (torch.load(p, weights_only=True) for p in (saved, term_saved))
    assert at_term["step"] == 7 and at_term["model"].keys() == at_interrupt["model"].keys()
    for name, value in at_interrupt["model"].items():
        assert torch.equal(value, at_term["model"][name]), name
    subprocess.run([sys.executable, "mega_nerf/train.py", *interrupted], cwd=ROOT, env=env, check=True,
                   capture_output=True)
    after_interrupt = torch.load(saved.parent / "00000012.pt", weights_only=True)
    for name, value in whole.field.state_dict().items():
        assert torch.equal(value, resumed["model"][name]), name
        assert torch.equal(value, started.field.state_dict()[name]), name
        assert torch.equal(value, after_interrupt["model"][name]), name
    # the log holds each step once: what the killed run logged after its checkpoint (steps 6-8) was dropped; the
    # start-up records (no step) of both of its runs stay
    def lines(exp: Path) -> list[dict]:
        return [json.loads(line) for line in (exp / "log.jsonl").read_text().splitlines()]
    steps = [[line["step"] for line in lines(tmp_path / exp) if "step" in line] for exp in ("killed", "whole")]
    assert steps[0] == steps[1] == [*range(1, 13), 12]  # 12: validation
    assert sum("startup" in line for line in lines(tmp_path / "killed")) == 2


def test_another_ranks_failure_saves_the_step_before_stopping(tiny_city, tmp_path, capsys):
    """train_cells' step hook raises PeerFailure when another rank has failed (a crash, or its own SIGTERM): the
    step just trained is whole, so it is saved before the error goes on; a step already saved is not saved again."""
    def peer_fails_at(step: int) -> Callable[[int], None]:
        def hook(s: int) -> None:
            if s == step:
                raise PeerFailure("rank 1 failed: fails on purpose (test)")
        return hook
    for step, saved in ((7, ["00000005.pt", "00000007.pt"]), (5, ["00000005.pt"])):
        exp = tmp_path / f"at-{step}"
        trainer = Trainer(args(tiny_city, exp, "--data_mode", "memory", "--batch_size", "64", "--train_iterations",
                               "12", "--ckpt_interval", "5", "--val_interval", "1000"), on_step=peer_fails_at(step))
        with pytest.raises(PeerFailure, match="rank 1 failed"):
            trainer.run()
        assert sorted(p.name for p in (exp / "checkpoints").iterdir()) == saved
        assert torch.load(exp / "checkpoints" / saved[-1], weights_only=True)["step"] == step
    assert f"saved {tmp_path / 'at-7' / 'checkpoints' / '00000007.pt'} before stopping" in capsys.readouterr().err


def test_ctrl_c_on_the_last_step_lets_the_run_end(tiny_city, tmp_path):
    """The run's own end saves that step: it ends as finished (exit 0), not as interrupted."""
    argv = ["--config_file", str(tiny_city / "config.yaml"), "--dataset_path", str(tiny_city), "--exp_name",
            str(tmp_path / "exp"), *SMALL, "--data_mode", "memory", "--batch_size", "64", "--train_iterations", "3",
            "--val_interval", "1000"]
    run = subprocess.run([sys.executable, "-c", INTERRUPTED_RUN, "SIGINT", "3", *argv], cwd=ROOT, capture_output=True,
                         text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 0 and "error" not in run.stderr, run.stderr
    assert sorted(p.name for p in (tmp_path / "exp" / "checkpoints").iterdir()) == ["00000003.pt"]


def test_near_gradient_distance_follows_the_cameras_spacing_unless_given(tiny_city, tmp_path, monkeypatch):
    """Unset, the hash field scales gradients within NEAR_GRADIENT_SPACINGS times the cameras' median spacing;
    Mega-NeRF's mlp does not scale them; the option, in real-world units as --near, overrides both. The passes'
    options carry the normalised distance."""
    dataset = load_dataset(tiny_city)
    positions = Cameras.from_dataset(dataset).c2w[:, :, 3]
    auto = Trainer(args(tiny_city, tmp_path / "a", "--data_mode", "memory"))
    assert auto.pass_options.near_gradient == pytest.approx(NEAR_GRADIENT_SPACINGS * camera_spacing(positions))
    assert 0.05 < auto.pass_options.near_gradient < 0.5 and "1.5x the cameras' median" in auto.near_gradient_report()
    assert args(tiny_city, tmp_path / "a", "--field", "mlp").near_gradient_distance == 0.0
    given = Trainer(args(tiny_city, tmp_path / "a", "--near_gradient_distance", "5", "--data_mode", "memory"))
    assert given.pass_options.near_gradient == pytest.approx(5 / dataset.coordinates.pose_scale_factor)
    assert "within d = 5 (" in given.near_gradient_report()
    off = Trainer(args(tiny_city, tmp_path / "a", "--near_gradient_distance", "0", "--data_mode", "memory"))
    assert off.near_gradient_report() == "near the cameras: gradients as they are (--near_gradient_distance 0)"
    monkeypatch.setattr(trainer_module, "camera_spacing", lambda positions: 0.0)  # every camera at one place
    together = Trainer(args(tiny_city, tmp_path / "a", "--data_mode", "memory"))
    assert together.pass_options.near_gradient == 0.0
    assert together.near_gradient_report() == ("near the cameras: gradients as they are (the cameras all stand at "
                                               "one place)")


def test_bad_input_is_one_line(tiny_city, masks, tmp_path):
    with pytest.raises(UserError, match="unknown field 'nerf'"):
        Trainer(args(tiny_city, tmp_path / "a", "--field", "nerf", "--data_mode", "memory"))
    with pytest.raises(UserError, match="batch_size 10000000 is larger"):
        Trainer(args(tiny_city, tmp_path / "b", "--data_mode", "memory", "--batch_size", "10000000")).run()
    with pytest.raises(UserError, match="missing option --chunk_paths"):
        Trainer(args(tiny_city, tmp_path / "c"))
    with pytest.raises(UserError, match="--hash_decay: the mlp field has no hash grid"):
        args(tiny_city, tmp_path / "c", "--field", "mlp", "--hash_decay", "0.1")
    with pytest.raises(UserError, match="--distortion_loss: needs uniform samples"):
        args(tiny_city, tmp_path / "c", "--fine_samples", "8", "--distortion_loss", "0.01")
    with pytest.raises(UserError, match="not a directory"):
        Trainer(args(tiny_city, tmp_path / "d", "--data_mode", "memory", "--cluster_mask_path", str(tmp_path / "no")))
    other = tmp_path / "other"  # masks of another dataset: their size disagrees
    other.mkdir()
    for m in load_dataset(tiny_city).images:
        write_mask(other / f"{m.name}.mask", torch.ones(10, 10, dtype=torch.bool))
    with pytest.raises(UserError, match="mask is 10x10"):
        Trainer(args(tiny_city, tmp_path / "f", "--data_mode", "memory", "--cluster_mask_path", str(other))).run()


def test_empty_cell_writes_an_empty_checkpoint(tiny_city, masks, tmp_path):
    """A cell without rays writes an empty step-0 checkpoint, again on a rerun; an experiment that holds a trained
    checkpoint (of other masks) is refused, since that one would stay the latest and be merged."""
    empty = tmp_path / "empty"
    empty.mkdir()
    for m in load_dataset(tiny_city).images:
        write_mask(empty / f"{m.name}.mask", torch.zeros(m.H, m.W, dtype=torch.bool))
    for _ in range(2):
        path = Trainer(args(tiny_city, tmp_path / "e", "--data_mode", "memory", "--cluster_mask_path",
                            str(empty))).run()
        state = torch.load(path, weights_only=True)
        assert state["empty"] is True and state["step"] == 0
    common = ["--data_mode", "memory", "--batch_size", "64", "--train_iterations", "2", "--ckpt_interval", "2"]
    Trainer(args(tiny_city, tmp_path / "t", *common, "--cluster_mask_path", str(masks / "0"))).run()
    with pytest.raises(UserError, match=r"t/checkpoints/00000002\.pt: a checkpoint of a run with rays, but "
                                        r"--cluster_mask_path .*empty gives this cell none"):
        Trainer(args(tiny_city, tmp_path / "t", *common, "--cluster_mask_path", str(empty))).run()


def poisoned_from_step_6(trainer: Trainer) -> Trainer:
    """The trainer, its field's density NaN from step 6 on (the step counter is 5 while step 6 runs)."""
    original = trainer.field.forward

    def poisoned(positions, directions, appearance, ray_of=None):
        density, rgb = original(positions, directions, appearance, ray_of)
        return density * (float("nan") if trainer.step >= 5 else 1.0), rgb

    trainer.field.forward = poisoned
    return trainer


def test_non_finite_loss_stops_at_the_last_good_checkpoint(tiny_city, tmp_path, capsys):
    """The run stops with a one-line error at the first log line after the loss went non-finite, its last
    checkpoint the last good one; its log is closed, TensorBoard's writer thread with it (train_cells.py goes on
    to the next cell in the same process), and so is its progress bar, so the error starts a line of its own."""
    writers = {t for t in threading.enumerate() if type(t).__name__ == "_AsyncWriterThread"}
    config = args(tiny_city, tmp_path / "n", "--data_mode", "memory", "--batch_size", "128",
                  "--train_iterations", "20", "--ckpt_interval", "4", "--log_interval", "2")
    trainer = poisoned_from_step_6(Trainer(dataclasses.replace(config, progress=True)))
    with pytest.raises(UserError, match=r"non-finite loss at step 6; .*00000004\.pt"):
        try:
            trainer.run()
        finally:  # while the error is on its way out, as when run_cli prints it: the run's frames are still alive
            bar = capsys.readouterr().err
            open_writers = [t for t in threading.enumerate()
                            if type(t).__name__ == "_AsyncWriterThread" and t not in writers]
    assert sorted(p.name for p in (tmp_path / "n" / "checkpoints").iterdir()) == ["00000004.pt"]
    assert not open_writers
    assert "train:" in bar and bar.endswith("\n")


def test_ctrl_c_after_a_non_finite_loss_saves_nothing(tiny_city, tmp_path):
    """The interrupt's save would make the bad state the latest checkpoint: the run stops on the loss instead."""
    config = args(tiny_city, tmp_path / "n", "--data_mode", "memory", "--batch_size", "128",
                  "--train_iterations", "20", "--ckpt_interval", "4", "--log_interval", "100")
    trainer = poisoned_from_step_6(Trainer(config, on_step=lambda step: step == 7 and
                                           os.kill(os.getpid(), signal.SIGINT)))
    with pytest.raises(UserError, match=r"non-finite loss at step 6; .*00000004\.pt"):
        trainer.run()
    assert sorted(p.name for p in (tmp_path / "n" / "checkpoints").iterdir()) == ["00000004.pt"]


def test_parscript_trains_two_cells(tiny_city, masks, tmp_path):
    jobs = tmp_path / "run_2.txt"
    subprocess.run([sys.executable, "scripts/make_parscript.py", "--cells", "2", "--output", str(jobs)],
                   check=True, cwd=ROOT, capture_output=True)
    env = dict(os.environ, CONFIG_FILE=str(tiny_city / "config.yaml"), EXP_PREFIX=str(tmp_path / "exp-"),
               DATASET_PATH=str(tiny_city), CHUNK_PREFIX=str(tmp_path / "chunks-"), MASK_PATH=str(masks),
               TRAIN_ARGS=" ".join(SMALL + ["--batch_size", "256", "--train_iterations", "6", "--val_interval", "6",
                                            "--val_images", "1"]),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "parscript.dispatcher", str(jobs), "-g", "2"], check=True, cwd=ROOT,
                   env=env, capture_output=True)
    for k in range(2):
        assert (tmp_path / f"exp-{k}" / "checkpoints" / "00000006.pt").exists()
        assert list((tmp_path / f"exp-{k}" / "val").glob("00000006_*.png"))
        assert (tmp_path / f"chunks-{k}" / "manifest.json").exists()


@pytest.mark.parametrize("regularisers", [[], ["--distortion_loss", "0.01", "--hash_decay", "0.1"],
                                         ["--val_embeddings_only"]])
def test_a_step_split_into_passes_equals_the_unsplit_step(tiny_city, tmp_path, one_thread, regularisers):
    """--micro_batch splits a step's rays into passes whose gradients add up: the gradients and the loss equal
    the unsplit step's up to float rounding (the jitter is drawn in the same order on the CPU), regularisers
    included (each pass adds its share)."""
    def one_step(micro: int) -> tuple[float, dict[str, torch.Tensor]]:
        trainer = Trainer(args(tiny_city, tmp_path / str(micro), "--data_mode", "memory", "--batch_size", "96",
                               "--micro_batch", str(micro), *regularisers))
        assert trainer.micro_batch == micro
        trainer.optimizer.step = lambda lr=None: None  # keep the gradients of the step, unapplied
        stream = trainer.prepare_data()
        loss, _ = trainer.train_step(stream)
        return float(loss), {n: p.grad.clone() for n, p in trainer.field.named_parameters() if p.grad is not None}

    loss, grads = one_step(96)
    split_loss, split_grads = one_step(40)  # passes of 40, 40 and 16 rays
    assert split_loss == pytest.approx(loss, rel=1e-6)
    assert grads.keys() == split_grads.keys() and len(grads) > 5
    for name, grad in grads.items():
        assert torch.allclose(split_grads[name], grad, rtol=1e-4, atol=1e-6 * grad.abs().max()), name


def test_the_defaults_train_the_tiny_city_on_a_cpu_within_4_gb(tiny_city, tmp_path):
    """mega_nerf/train.py with its defaults (the CPU's batch, passes bounded by the CPU's budget): peak resident
    memory of the run (ru_maxrss of a child that only runs it) stays under 4 GB; the plan is printed, and so is
    what a checkpoint takes, within 5 % of the one written."""
    run = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
           "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); print(r.stdout + r.stderr)")
    cmd = [sys.executable, "mega_nerf/train.py", "--config_file", str(tiny_city / "config.yaml"), "--exp_name",
           str(tmp_path / "exp"), "--chunk_paths", str(tmp_path / "chunks"), "--train_iterations", "2",
           "--no_progress"]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="2")
    result = subprocess.run([sys.executable, "-c", run, *cmd], cwd=ROOT, env=env, capture_output=True, text=True,
                            check=True)
    status, out = result.stdout.split("\n", 1)
    code, max_kib = map(int, status.split())
    assert code == 0, out
    assert "step: 4,096 rays in 7 pass(es) of at most 604, about 1.00 GiB each on cpu" in out
    estimate = re.search(r"checkpoints: about ([\d,]+) MiB each, every 2,000 steps to .*; the latest 3 kept, about "
                         r"([\d,]+) MiB \(--keep_checkpoints\)", out)
    written = (tmp_path / "exp" / "checkpoints" / "00000002.pt").stat().st_size / 2 ** 20
    assert estimate, out
    each, kept = (float(estimate[k].replace(",", "")) for k in (1, 2))
    assert abs(each - written) <= 0.05 * written and abs(kept - 3 * each) <= 1.5, (estimate[0], written)
    assert max_kib * 1024 < 4e9, max_kib


def test_a_run_without_an_altitude_slab_is_warned(tiny_city, tmp_path, capsys):
    Trainer(args(tiny_city, tmp_path / "with", "--data_mode", "memory"))
    assert "ray_altitude_range" not in capsys.readouterr().err
    Trainer(config_from_argv(["--dataset_path", str(tiny_city), "--exp_name", str(tmp_path / "without"),
                              "--data_mode", "memory", *SMALL]))
    assert "warning: no --ray_altitude_range: rays are not clipped" in capsys.readouterr().err


def test_masks_of_another_dataset_or_cell_are_refused(tiny_city, masks, tmp_path):
    """Masks made from another dataset of the same names and sizes (moved cameras) are refused in one line, and
    so is an experiment of cell 0 rerun with cell 1's masks (issue 20, item 2), or with another --eval_protocol
    (in memory mode no chunk manifest would catch it, and the model would train val pixels strict forbids)."""
    moved = tmp_path / "moved"
    shutil.copytree(tiny_city, moved)
    for meta_file in moved.glob("*/metadata/*.pt"):
        meta = torch.load(meta_file, weights_only=True)
        meta["c2w"][:, 3] += 0.01
        torch.save(meta, meta_file)
    with pytest.raises(UserError, match=r"params.pt: made from another dataset .*same image names and sizes"):
        Trainer(args(moved, tmp_path / "m", "--data_mode", "memory", "--cluster_mask_path", str(masks / "0")))
    common = ["--data_mode", "memory", "--batch_size", "64", "--train_iterations", "2", "--val_interval", "100"]
    Trainer(args(tiny_city, tmp_path / "cell0", *common, "--cluster_mask_path", str(masks / "0"))).run()
    with pytest.raises(UserError, match="trained on cell 0's masks, but --cluster_mask_path gives cell 1"):
        Trainer(args(tiny_city, tmp_path / "cell0", *common, "--cluster_mask_path", str(masks / "1"))).run()
    with pytest.raises(UserError, match="trained under --eval_protocol mega-nerf, but this run gives strict"):
        Trainer(args(tiny_city, tmp_path / "cell0", *common, "--cluster_mask_path", str(masks / "0"),
                     "--eval_protocol", "strict")).run()


def test_a_refused_run_leaves_the_saved_options_alone(tiny_city, masks, tmp_path):
    """train.py saves the run's options (config.yaml) only once its data and checkpoint are verified: a rerun of
    cell 0's experiment with cell 1's masks is refused and config.yaml still says cell 0."""
    common = ["--config_file", str(tiny_city / "config.yaml"), "--dataset_path", str(tiny_city), *SMALL,
              "--exp_name", str(tmp_path / "exp"), "--data_mode", "memory", "--batch_size", "64",
              "--train_iterations", "2", "--val_interval", "100"]
    train_main([*common, "--cluster_mask_path", str(masks / "0")])
    saved = (tmp_path / "exp" / "config.yaml").read_bytes()
    assert f"cluster_mask_path: {masks / '0'}" in saved.decode()
    with pytest.raises(UserError, match="trained on cell 0's masks, but --cluster_mask_path gives cell 1"):
        train_main([*common, "--cluster_mask_path", str(masks / "1")])
    assert (tmp_path / "exp" / "config.yaml").read_bytes() == saved


def test_a_run_asking_fewer_steps_than_its_checkpoint_says_so(tiny_city, tmp_path, capsys):
    """Resuming an experiment already past --train_iterations trains nothing, keeps the checkpoint, and warns."""
    common = ["--data_mode", "memory", "--batch_size", "64", "--val_interval", "100", "--ckpt_interval", "4"]
    final = Trainer(args(tiny_city, tmp_path / "exp", *common, "--train_iterations", "4")).run()
    data = final.read_bytes()
    capsys.readouterr()
    assert Trainer(args(tiny_city, tmp_path / "exp", *common, "--train_iterations", "2")).run() == final
    assert final.read_bytes() == data
    assert "is at step 4, past the 2 steps this run asks for: nothing to train" in capsys.readouterr().err


# Trains like mega_nerf/train.py (start-up timed from the process start) and writes the time at the end of step 1.
TIMED_RUN = ("import sys, time; from mega_nerf.cli.train import config_from_argv; "
             "from mega_nerf.clock import process_start; from mega_nerf.training.trainer import Trainer; "
             "Trainer(config_from_argv(sys.argv[2:]), started=process_start(), "
             "on_step=lambda s: s == 1 and open(sys.argv[1], 'w').write(repr(time.time()))).run()")


def test_startup_breakdown_sums_to_the_time_to_the_first_step(tiny_city, masks, tmp_path):
    """The parts logged to log.jsonl add up to the time from launching the process to the end of its first step,
    measured outside the process, within 10 %; the chunks are reported written, then reused."""
    argv = ["--config_file", str(tiny_city / "config.yaml"), "--dataset_path", str(tiny_city), *SMALL,
            "--cluster_mask_path", str(masks / "0"), "--chunk_paths", str(tmp_path / "chunks"), "--batch_size", "256",
            "--train_iterations", "3", "--val_interval", "100"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for run, note in ((1, "written"), (2, "reused")):
        exp = tmp_path / f"exp{run}"
        launched = time.time()
        subprocess.run([sys.executable, "-c", TIMED_RUN, str(tmp_path / "t"), *argv, "--exp_name", str(exp)],
                       cwd=ROOT, env=env, check=True, capture_output=True)
        measured = float((tmp_path / "t").read_text()) - launched
        record = next(json.loads(line) for line in (exp / "log.jsonl").read_text().splitlines() if "startup" in line)
        parts = {k: v for k, v in record["startup"].items() if k != "total"}
        assert {"imports", "device init", "dataset", "masks", "model", "chunks", "kernel compilation",
                "first step"} <= set(parts)
        assert sum(parts.values()) == pytest.approx(measured, rel=0.1)
        assert record["startup_notes"]["chunks"].startswith(note)


def test_a_resumed_log_keeps_each_step_once_in_both_records(tmp_path: Path) -> None:
    """A run killed after step 500 and resumed from its checkpoint at step 300: log.jsonl and TensorBoard each
    hold steps 100-300 of the first run and 400 of the second, once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mega_nerf.training.log import Logger

    first = Logger(tmp_path)
    for step in range(100, 600, 100):
        first.scalars(step, psnr=float(step))
    first.close()
    resumed = Logger(tmp_path, start_step=300)
    resumed.scalars(400, psnr=-1.0)
    resumed.close()
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["psnr"]) for r in lines] == [(100, 100.0), (200, 200.0), (300, 300.0), (400, -1.0)]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("psnr")] == [(100, 100.0), (200, 200.0), (300, 300.0),
                                                                     (400, -1.0)]


def test_a_checkpoint_from_older_defaults_resumes_with_those_options_only(tiny_city, tmp_path, capsys):
    """A checkpoint saved when the hash field's embedding was 32 wide by default and before the horizon background
    was (its config has neither appearance_dim nor horizon_background, and it has no eval_protocol or
    val_embeddings_only either) is refused at today's defaults in one line naming both keys and their values, and
    the options that resume it; it resumes with --appearance_dim 32 --no_horizon_background, and a config.yaml of
    that time (horizon_background: false) gives the latter; loading fills the keys it lacks with what their absence
    meant. Resumed with other samples (today's 96 beyond the box, trained with 32) it goes on, with a warning that
    names the option keeping the old ones; so with other --samples, which move the occupancy threshold."""
    common = ["--data_mode", "memory", "--batch_size", "64", "--val_interval", "100", "--ckpt_interval", "2"]
    first = Trainer(args(tiny_city, tmp_path / "exp", *common, "--train_iterations", "2", "--appearance_dim", "32"))
    path = first.run()
    state = torch.load(path, weights_only=True)
    del state["field_config"]["appearance_dim"], state["field_config"]["horizon_background"]  # older code
    del state["eval_protocol"], state["val_embeddings_only"]
    torch.save(state, path)
    loaded = load_checkpoint(path)
    assert loaded["eval_protocol"] == "mega-nerf" and loaded["val_embeddings_only"] is False
    with pytest.raises(UserError, match=r"checkpoint of another field \(appearance_dim \(32, 8\), horizon_background "
                                        r"\(unset, True\): its value, then .*add --appearance_dim 32 "
                                        r"--no_horizon_background\)"):
        Trainer(args(tiny_city, tmp_path / "exp", *common, "--train_iterations", "4")).run()
    saved = tmp_path / "older.yaml"  # what record_options wrote then
    saved.write_text("horizon_background: false\nappearance_dim: 32\n")
    older = train_config(train_parser().parse_args(["--config_file", str(saved), "--dataset_path", "d",
                                                    "--exp_name", "e"]))
    assert older.horizon_background is False and older.appearance_dim == 32
    final = Trainer(args(tiny_city, tmp_path / "exp", *common, "--train_iterations", "4",
                         "--appearance_dim", "32", "--no_horizon_background", "--bg_samples", "96")).run()
    assert final.name == "00000004.pt"
    assert re.search(r"warning: .*00000002\.pt was trained with render settings .*'bg_samples': 32\}, this run goes "
                     r"on with .*'bg_samples': 96\} \(--bg_samples 32 keeps the old default\); the merge needs every "
                     r"cell's equal", capsys.readouterr().err)
    # other --samples move the occupancy threshold with them (before, refused as another field, by that key alone)
    older = ["--appearance_dim", "32", "--no_horizon_background", "--bg_samples", "96"]
    assert Trainer(args(tiny_city, tmp_path / "exp", *common, *older, "--train_iterations", "6",
                        "--samples", "48")).run().name == "00000006.pt"
    threshold = [torch.load(tmp_path / "exp" / "checkpoints" / name, weights_only=True)["field_config"]
                 ["occupancy_threshold"] for name in ("00000004.pt", "00000006.pt")]
    assert threshold[1] == pytest.approx(threshold[0] * 48 / 32, rel=1e-9)
    assert "'samples': 32" in capsys.readouterr().err
    with pytest.raises(UserError, match=r"another field \(box_max .*occupancy_threshold"):  # moved by the box too
        Trainer(args(tiny_city, tmp_path / "exp", *common, *older, "--train_iterations", "8", "--samples", "48",
                     "--foreground_scale", "1.5")).run()


def test_a_checkpoint_of_the_previous_table_and_far_samples_is_named_with_both_options(tiny_city, tmp_path):
    """The table and the far samples changed default together (2^21 and 64 to 2^22 and 96): a checkpoint of the
    former resumed at the latter is refused in one line that names both options, so that one rerun with them
    goes on as it was trained (the far samples alone would only be warned about, after the table's refusal)."""
    common = ["--data_mode", "memory", "--batch_size", "64", "--val_interval", "100", "--ckpt_interval", "2"]
    Trainer(args(tiny_city, tmp_path / "exp", *common, "--train_iterations", "2", "--log2_hashmap_size", "21",
                 "--bg_samples", "64")).run()
    with pytest.raises(UserError, match=r"another field \(log2_table_size \(21, 22\): its value, then this run's\); "
                                        r"give the options it was trained with \(trained at earlier defaults: add "
                                        r"--log2_hashmap_size 21 --bg_samples 64\)"):
        Trainer(args(tiny_city, tmp_path / "exp", *common, "--train_iterations", "4", "--log2_hashmap_size", "22",
                     "--bg_samples", "96")).run()


def test_val_embeddings_only_trains_the_field_on_training_rays_alone(tiny_city, tmp_path, one_thread):
    """--val_embeddings_only: a pass's gradient of every field parameter is that of its training-image rays alone,
    and the val images' embeddings take the gradient of their own rays too. Reference: the same rays, the val ones
    last, in two passes without the option (on the CPU consecutive passes draw the jitter of the unsplit one)."""
    common = ("--data_mode", "memory", "--batch_size", "96")
    ref = Trainer(args(tiny_city, tmp_path / "ref", *common))
    image, pixel, rgb = ref.prepare_data().next_batch()
    split = {m.index: m.split for m in ref.dataset.images}
    val = torch.tensor([split[i] == "val" for i in image.tolist()])
    assert 0 < int(val.sum()) < len(image)
    order = torch.argsort(val.int(), stable=True)  # the training rays first
    image, pixel, rgb, val = image[order], pixel[order], rgb[order], val[order]
    trained = int((~val).sum())
    ref._shade(ref._samples(image[:trained], pixel[:trained]), rgb[:trained], len(image))
    expected = {name: p.grad.clone() for name, p in ref.field.named_parameters() if p.grad is not None}
    ref.optimizer.zero_grad()
    ref._shade(ref._samples(image[trained:], pixel[trained:]), rgb[trained:], len(image))
    val_grad = ref.field.appearance.weight.grad
    expected["appearance.weight"] += val_grad

    on = Trainer(args(tiny_city, tmp_path / "on", *common, "--val_embeddings_only"))
    on._shade(on._samples(image, pixel), rgb, len(image))
    grads = {name: p.grad for name, p in on.field.named_parameters() if p.grad is not None}
    assert grads.keys() == expected.keys() and len(grads) > 5
    for name, grad in grads.items():
        assert torch.allclose(grad, expected[name], rtol=1e-5, atol=1e-8), name
    assert val_grad[image[val]].abs().sum() > 0  # the val rays' embedding gradient is in the sum, and not zero
    with pytest.raises(UserError, match="--val_embeddings_only: --eval_protocol strict trains no val pixels"):
        args(tiny_city, tmp_path / "strict", "--val_embeddings_only", "--eval_protocol", "strict")
    with pytest.raises(UserError, match="--val_embeddings_only: --appearance_dim 0 leaves the val pixels nothing"):
        args(tiny_city, tmp_path / "none", "--val_embeddings_only", "--appearance_dim", "0")


def test_the_warm_up_pass_trains_a_stand_in_and_draws_no_global_random_numbers(tiny_city, tmp_path):
    """The GPU start-up's warm-up (training.step.warm_up, on the trainer's stand-in field) runs a whole pass and
    Adam update, moving the stand-in's parameters, without drawing from torch's global generator: started on a
    thread beside the set-up, it must leave the run's own numbers as they are without it. On its thread, a
    failure goes to on_error alone."""
    from mega_nerf.training.step import warm_up, warm_up_in_background

    trainer = Trainer(args(tiny_city, tmp_path / "exp", "--data_mode", "memory"))
    stand_in = trainer._stand_in()
    assert type(stand_in) is type(trainer.field) and torch.equal(stand_in.box_min, -torch.ones(3))
    assert [p.shape for p in stand_in.grid.parameters()] == [p.shape for p in trainer.field.grid.parameters()]
    before = [p.detach().clone() for p in stand_in.parameters()]
    state = torch.get_rng_state()
    warm_up(stand_in, trainer.pass_options)
    assert torch.equal(torch.get_rng_state(), state)
    moved = [not torch.equal(a, b) for a, b in zip(before, stand_in.parameters(), strict=True)]
    assert all(moved), moved
    failures: list[Exception] = []  # on its thread a failure is kept quiet, but told to on_error
    broken = dataclasses.replace(trainer.pass_options, render=None)
    warm_up_in_background(stand_in, broken, on_error=failures.append).join(60)
    assert len(failures) == 1 and isinstance(failures[0], AttributeError)


def test_horizon_background_is_kept_in_the_field_config_where_there_is_a_slab(tiny_city, tmp_path, capsys):
    """The horizon background (the default) is stored in the field's config (checkpoints rebuild the field from
    it, so a merged or evaluated model sees the background it trained with; a run saved without it is told apart),
    and left out under --no_horizon_background, as in configs saved before the option, or where no altitude slab
    bounds the down axis, where it would do nothing (the command says it ignores the option)."""
    box = (torch.full((3,), -1.0), torch.ones(3))
    config = args(tiny_city, tmp_path / "h")
    raised = field_config(config, box, [False, True, True], 4, 0.0)
    plain = field_config(args(tiny_city, tmp_path / "h", "--no_horizon_background"), box, [False, True, True], 4, 0.0)
    assert "horizon_background" not in plain and build_field(raised).horizon_background
    assert config_differences(plain, raised) == ["horizon_background (unset, True)"]
    assert field_config(config, box, [True, True, True], 4, 0.0) == {**plain, "contracted": [True, True, True]}
    train_config(train_parser().parse_args(["--dataset_path", "d", "--exp_name", "e", "--no_horizon_background"]))
    assert "ignoring --no_horizon_background: only with --ray_altitude_range" in capsys.readouterr().err


def test_only_the_latest_checkpoints_are_kept(tiny_city, tmp_path):
    """--keep_checkpoints N leaves the N latest checkpoints after every save (one is about 0.5 GB at the hash
    defaults), also across a resume, and never a file of another name; 0 keeps every one."""
    common = ["--data_mode", "memory", "--batch_size", "64", "--val_interval", "100", "--ckpt_interval", "2"]

    def kept(exp: str) -> list[str]:
        return sorted(p.name for p in (tmp_path / exp / "checkpoints").iterdir())

    seen = {}  # before step s is saved, the folder as the saves of the steps before it left it
    Trainer(args(tiny_city, tmp_path / "two", *common, "--train_iterations", "7", "--keep_checkpoints", "2"),
            on_step=lambda step: seen.update({step: kept("two")} if step in (5, 7) else {})).run()
    assert seen == {5: ["00000002.pt", "00000004.pt"], 7: ["00000004.pt", "00000006.pt"]}
    assert kept("two") == ["00000006.pt", "00000007.pt"]
    (tmp_path / "two" / "checkpoints" / "00000006_mine.pt").write_bytes(b"a copy the user keeps")
    Trainer(args(tiny_city, tmp_path / "two", *common, "--train_iterations", "9", "--keep_checkpoints", "2")).run()
    assert kept("two") == ["00000006_mine.pt", "00000008.pt", "00000009.pt"]
    Trainer(args(tiny_city, tmp_path / "all", *common, "--train_iterations", "5", "--keep_checkpoints", "0")).run()
    assert kept("all") == ["00000002.pt", "00000004.pt", "00000005.pt"]
    # the file just written stays even where it is not the latest (an empty cell's step 0 beside older steps)
    for name in ("00000000.pt", "00000004.pt", "00000006.pt", "00000008.pt"):
        (tmp_path / "all" / "checkpoints" / name).write_bytes(b"")
    for keep, left in ((9, ["00000000.pt", "00000002.pt", "00000004.pt", "00000005.pt", "00000006.pt",
                            "00000008.pt"]), (3, ["00000000.pt", "00000006.pt", "00000008.pt"]), (1, ["00000000.pt"])):
        prune_checkpoints(tmp_path / "all", keep, tmp_path / "all" / "checkpoints" / "00000000.pt")
        assert kept("all") == left, keep


def test_a_run_removes_what_killed_runs_left_mid_write(tiny_city, tmp_path):
    """A run killed mid-write leaves its temp file `<name>.<pid>.tmp` (a checkpoint's is about 0.9 GB at the
    defaults): the next run removes those of dead processes from the experiment's folders, which it holds locked,
    and keeps a live writer's."""
    exp = tmp_path / "exp"
    common = ["--chunk_paths", str(tmp_path / "chunks"), "--batch_size", "64", "--val_interval", "100",
              "--ckpt_interval", "2"]
    Trainer(args(tiny_city, exp, *common, "--train_iterations", "2")).run()
    dead = dead_pid()
    assert not io.process_alive(dead)
    stale = [exp / "checkpoints" / f"00000004.pt.{dead}.tmp", exp / f"log.jsonl.{dead}.tmp",
             exp / "val" / f"00000004_000004.png.{dead}.tmp"]
    live = exp / "checkpoints" / f"00000099.pt.{os.getpid()}.tmp"  # a name this run does not write itself
    for path in [*stale, live]:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"half a file")
    Trainer(args(tiny_city, exp, *common, "--train_iterations", "4")).run()
    assert [p for p in stale if p.exists()] == [] and live.read_bytes() == b"half a file"
    assert sorted(p.name for p in (exp / "checkpoints").iterdir()) == ["00000002.pt", "00000004.pt", live.name]


def test_the_latest_checkpoint_is_merged_though_a_running_trainer_prunes_it(tmp_path, monkeypatch):
    """A merge lists a cell's latest checkpoint while its run goes on with --keep_checkpoints 1, which may save a
    newer one and delete the listed one before the merge opens it: the newer one is read (before, the merge
    stopped on '<path>: unreadable or truncated checkpoint'). A name that stays listed but cannot be opened (a
    broken link) is a one-line error, not an endless retry."""
    exp = tmp_path / "exp-0"

    def save(step: int) -> Path:
        path = ckpt.checkpoint_path(exp, step)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"version": ckpt.VERSION, "step": step, "field_config": {}, "model": {}}, path)
        return path

    old, listed = save(2), ckpt.latest_checkpoint

    def listed_then_pruned(exp_dir: Path) -> Path | None:
        path = listed(exp_dir)
        if path == old:  # the run saves step 4 and prunes step 2 just after the listing
            save(4)
            old.unlink()
        return path

    monkeypatch.setattr(ckpt, "latest_checkpoint", listed_then_pruned)
    [sub] = find_submodules(str(tmp_path / "exp-"), 1)
    assert (sub.path.name, sub.state["step"]) == ("00000004.pt", 4)
    assert ckpt.load_latest_checkpoint(tmp_path / "none") is None
    ckpt.checkpoint_path(exp, 6).symlink_to(tmp_path / "nowhere")
    with pytest.raises(UserError, match=r"00000006\.pt: unreadable checkpoint \(No such file or directory\)$"):
        ckpt.load_latest_checkpoint(exp)
    ckpt.checkpoint_path(exp, 6).unlink()
    ckpt.checkpoint_path(exp, 6).mkdir()
    with pytest.raises(UserError, match=r"00000006\.pt: unreadable checkpoint \(Is a directory\)$"):
        ckpt.load_latest_checkpoint(exp)


def test_a_disk_without_room_for_the_checkpoints_is_refused_before_the_first_step(tiny_city, tmp_path, monkeypatch):
    """A checkpoint that does not fit would fail only when it is due, after --ckpt_interval steps of training: a
    disk that cannot hold the run's checkpoints at their peak (--keep_checkpoints + 1 at once, counting those
    already there) stops the run before its first step, in one line naming the folder and the bytes. A finished
    run, which writes nothing, goes through."""
    common = ("--data_mode", "memory", "--batch_size", "64", "--ckpt_interval", "2", "--keep_checkpoints", "2")
    Trainer(args(tiny_city, tmp_path / "done", *common, "--train_iterations", "2")).run()
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=1000))
    assert Trainer(args(tiny_city, tmp_path / "done", *common, "--train_iterations", "2")).run().name == "00000002.pt"
    for exp, more in (("exp", 3), ("done", 2)):  # steps 2, 4, 6, 7 to save; resumed at 2 with one there: 4, 6, 7
        steps = []
        trainer = Trainer(args(tiny_city, tmp_path / exp, *common, "--train_iterations", "7"), on_step=steps.append)
        folder = re.escape(str(tmp_path / exp / "checkpoints"))
        with pytest.raises(UserError, match=rf"^{folder}: not enough disk space for this run's checkpoints \({more} "
                                            rf"more of {trainer.checkpoint_bytes():,} bytes at once, 1,000 free\)"):
            trainer.run()
        assert steps == []
    assert not list((tmp_path / "exp").glob("checkpoints/*.pt"))
