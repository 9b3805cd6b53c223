"""The trainer's Adam (mega_nerf.training.adam): its fused kernel equals the textbook reference, the optimiser equals
torch.optim.Adam step for step, state dicts pass both ways between the two (old checkpoints resume), and a training
run never imports torch._dynamo or the other heavy optional modules before its first step."""
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mega_nerf.training.adam import BETAS, EPS, Adam, adam_update, adam_update_reference

ROOT = Path(__file__).resolve().parents[1]
LRS = (1e-2, 5e-3, 2e-3, 1e-3, 5e-4, 2e-4)  # one per step: the trainer decays lr every step


def make_params(seed: int) -> list[torch.nn.Parameter]:
    """A table, a matrix and a bias: the shapes of a hash grid and an MLP layer."""
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in ((64, 2), (8, 5), (8,))]


def gradients(step: int, params: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """Random gradients for `step`, the same whoever asks. Parameter 2 has none in steps 0 and 3 (a parameter no
    ray reached); parameter 1's is a transposed view (not contiguous), as autograd may hand out."""
    g = torch.Generator().manual_seed(100 + step)
    grads: list[torch.Tensor | None] = [torch.randn(p.shape, generator=g) * 10.0 ** -step for p in params]
    grads[1] = grads[1].t().contiguous().t()
    if step in (0, 3):
        grads[2] = None
    return grads


def run_steps(optimizer, params: list[torch.nn.Parameter], steps: range, set_lr) -> None:
    for step in steps:
        set_lr(optimizer, LRS[step])
        for p, grad in zip(params, gradients(step, params)):
            p.grad = grad
        optimizer.step()


def ours_lr(optimizer: Adam, lr: float) -> None:
    optimizer.lr = lr


def torch_lr(optimizer: torch.optim.Adam, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def torch_adam(params: list[torch.nn.Parameter]) -> torch.optim.Adam:
    return torch.optim.Adam(params, lr=LRS[0], betas=BETAS, eps=EPS, foreach=False, fused=False)


def through_file(state: dict) -> dict:
    """`state` as a checkpoint holds it: saved and loaded back with weights_only, as the trainer loads."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_fused_update_equals_the_reference(dtype):
    """Five updates of random tensors with changing lr and gradients over five decades of scale; float64 holds
    the two formulas equal to 1e-12 relative, float32 to its rounding."""
    g = torch.Generator().manual_seed(0)
    shapes = ((1000,), (17, 3))
    tensors = {name: [torch.randn(s, generator=g, dtype=dtype) for s in shapes] for name in ("param", "grad")}
    fused = {"param": [t.clone() for t in tensors["param"]], "m": [torch.zeros(s, dtype=dtype) for s in shapes],
             "v": [torch.zeros(s, dtype=dtype) for s in shapes]}
    reference = {k: [t.clone() for t in v] for k, v in fused.items()}
    rtol, atol = (1e-12, 1e-14) if dtype == torch.float64 else (1e-5, 1e-7)
    for step in range(1, 6):
        grads = [grad * 10.0 ** -step for grad in tensors["grad"]]
        steps = [torch.tensor(float(step)) for _ in shapes]
        for update, s in ((adam_update, fused), (adam_update_reference, reference)):
            update(s["param"], grads, s["m"], s["v"], steps, LRS[step], BETAS, EPS)
        for name in fused:
            for a, b in zip(fused[name], reference[name]):
                torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
    assert not torch.equal(fused["param"][0], tensors["param"][0])


def test_adam_equals_torch_optim_adam():
    """Six steps with a new lr each and a parameter that misses two steps' gradients: the parameters and the
    moments equal torch.optim.Adam's (unfused, same betas and eps) to float rounding, and the step counts exactly."""
    ours, theirs = make_params(0), make_params(0)
    optimizer, reference = Adam(ours, lr=LRS[0]), torch_adam(theirs)
    for step in range(len(LRS)):
        run_steps(optimizer, ours, range(step, step + 1), ours_lr)
        run_steps(reference, theirs, range(step, step + 1), torch_lr)
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert float(optimizer.state[0]["step"]) == 6 and float(optimizer.state[2]["step"]) == 4
    for i, p in enumerate(theirs):
        for key in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(optimizer.state[i][key], reference.state[p][key], rtol=1e-5, atol=1e-12)


def test_a_step_without_gradients_changes_nothing():
    """After zero_grad every gradient is None, and a step then leaves the parameters and the state alone."""
    params = make_params(0)
    optimizer = Adam(params, lr=1e-2)
    run_steps(optimizer, params, range(1), ours_lr)
    optimizer.zero_grad()
    assert all(p.grad is None for p in params)
    before = [p.detach().clone() for p in params], through_file(optimizer.state_dict())
    optimizer.step()
    assert all(torch.equal(p, q) for p, q in zip(params, before[0]))
    for i, state in optimizer.state.items():
        assert all(torch.equal(value, before[1]["state"][i][key]) for key, value in state.items())


OPTIMISERS = {"ours": (lambda params: Adam(params, lr=LRS[0]), ours_lr), "torch": (torch_adam, torch_lr)}


@pytest.mark.parametrize("first, second", [("ours", "ours"), ("ours", "torch"), ("torch", "ours")])
def test_a_state_dict_resumes(first, second):
    """Three steps in one optimiser, its state dict through a file into a new one, three more steps: the
    parameters equal an uninterrupted run of ours, bit for bit when both halves are ours. Ours into torch.optim.Adam:
    a new checkpoint read by torch; torch's into ours: a checkpoint written before this optimiser. The parameter
    without a gradient in step 0 has no state at first, so the state dict's numbering skips it."""
    whole = make_params(0)
    run_steps(Adam(whole, lr=LRS[0]), whole, range(6), ours_lr)

    (make, set_lr), (make_next, set_next_lr) = OPTIMISERS[first], OPTIMISERS[second]
    params = make_params(0)
    optimizer = make(params)
    run_steps(optimizer, params, range(1), set_lr)
    assert sorted(optimizer.state_dict()["state"]) == [0, 1]
    run_steps(optimizer, params, range(1, 3), set_lr)
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in params]
    state = through_file(optimizer.state_dict())
    optimizer = make_next(resumed)
    optimizer.load_state_dict(state)
    run_steps(optimizer, resumed, range(3, 6), set_next_lr)
    for a, b in zip(resumed, whole):
        if first == second == "ours":
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_the_state_dict_of_another_optimiser_is_refused():
    params = make_params(0)
    state = torch.optim.Adam(params, weight_decay=0.1).state_dict()
    with pytest.raises(ValueError, match="weight decay"):
        Adam(params, lr=1e-3).load_state_dict(state)
    with pytest.raises(ValueError, match="2 parameters for 3"):
        Adam(params, lr=1e-3).load_state_dict(torch.optim.Adam(params[:2]).state_dict())


# Trains two steps; prints the heavy optional modules loaded at the first step and at the end, as JSON.
HEAVY = ("torch._dynamo", "torch._inductor", "torchmetrics", "lpips", "viser", "imageio", "scipy", "sympy",
         "matplotlib", "torchvision", "tensorboard")
WATCHED_RUN = ("import json, sys; from mega_nerf.cli.train import config_from_argv; "
               "from mega_nerf.training.trainer import Trainer; heavy = sys.argv[1].split(','); seen = {}; "
               "loaded = lambda: [m for m in heavy if m in sys.modules]; "
               "hook = lambda step: step == 1 and seen.update(first=loaded()); "
               "Trainer(config_from_argv(sys.argv[2:]), on_step=hook).run(); "
               "print(json.dumps({**seen, 'end': loaded()}))")


def test_a_training_run_imports_no_heavy_optional_module(tiny_city, tmp_path):
    """A fresh process parses a config file and trains two steps on the CPU: none of HEAVY is loaded by its first
    step (torch.optim would load torch._dynamo), and torch._dynamo is still absent at the end."""
    argv = ["--config_file", str(tiny_city / "config.yaml"), "--dataset_path", str(tiny_city), "--exp_name",
            str(tmp_path / "exp"), "--data_mode", "memory", "--train_iterations", "2", "--batch_size", "64",
            "--samples", "8", "--hash_levels", "4", "--log2_hashmap_size", "12", "--max_resolution", "64",
            "--val_images", "1", "--no_progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    run = subprocess.run([sys.executable, "-c", WATCHED_RUN, ",".join(HEAVY), *argv], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True)
    loaded = json.loads(run.stdout.splitlines()[-1])
    assert loaded["first"] == [], loaded
    assert "torch._dynamo" not in loaded["end"], loaded
