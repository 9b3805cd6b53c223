"""Adam for the trainer: the whole update in one fused aten kernel, without torch.optim.

Why not torch.optim.Adam: building it imports torch._dynamo (about a second of interpreter time, which held the
interpreter lock while the dataset loaded), and the trainer uses none of its generality. The update is Adam's
(Kingma & Ba 2015, Algorithm 1) through `torch._fused_adam_`, which runs on CUDA and on the CPU; on the CPU it is
elementwise, the same bits run to run, so a resumed run stays bit-equal to an uninterrupted one. `adam_update_reference`
writes the same update out in plain PyTorch, and tests/test_adam.py holds the two equal, and equal to torch.optim.

State dicts have torch.optim's format, so a checkpoint written by torch.optim.Adam resumes here and ours loads in
torch.optim.Adam:
    {"state": {i: {"step": float32 (), "exp_avg": like param i, "exp_avg_sq": like param i}},
     "param_groups": [{"lr", "betas", "eps", "weight_decay": 0, "amsgrad": False, "maximize": False,
                       "params": [0, ..., n - 1]}]}
(i: the parameter's index; a parameter that never had a gradient has no state.)
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

# Instant-NGP's choice (Muller et al. 2022, section 4): a tiny eps keeps the steps of hash-table entries, whose
# gradients are rare and weak, at full size.
BETAS = (0.9, 0.99)
EPS = 1e-15


def adam_update(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                exp_avg_sqs: list[torch.Tensor], steps: list[torch.Tensor], lr: float | torch.Tensor,
                betas: tuple[float, float], eps: float) -> None:
    """One Adam update of `params` in place, in one fused kernel per call; the moments are updated in place too.
    All tensors on one device, with one dtype, and contiguous (the kernel walks each tensor's memory in order,
    whatever its strides: a transposed gradient would be read wrong); exp_avgs and exp_avg_sqs shaped like params;
    steps: float32 () tensors holding each parameter's update count, this update included (counted from 1)."""
    torch._fused_adam_(params, grads, exp_avgs, exp_avg_sqs, [], steps, lr=lr, beta1=betas[0], beta2=betas[1],
                       weight_decay=0.0, eps=eps, amsgrad=False, maximize=False)


def adam_update_reference(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                          exp_avg_sqs: list[torch.Tensor], steps: list[torch.Tensor], lr: float,
                          betas: tuple[float, float], eps: float) -> None:
    """`adam_update` as the textbook writes it (Kingma & Ba 2015, Algorithm 1, eps added to the root of the
    corrected second moment): the reference the fused kernel is tested against."""
    beta1, beta2 = betas
    for param, grad, m, v, step in zip(params, grads, exp_avgs, exp_avg_sqs, steps, strict=True):
        t = float(step)
        m.mul_(beta1).add_(grad, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        m_hat, v_hat = m / (1 - beta1 ** t), v / (1 - beta2 ** t)
        param.sub_(lr * m_hat / (v_hat.sqrt() + eps))


class Adam:
    """Adam over a fixed list of parameters with one learning rate, `lr`, which the caller may set before any
    step. A parameter without a gradient in a step is left alone (value, moments and step count)."""

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float, betas: tuple[float, float] = BETAS,
                 eps: float = EPS) -> None:
        self.params = list(params)
        kinds = {(p.device, p.dtype) for p in self.params}
        assert len(kinds) <= 1 and all(p.is_contiguous() for p in self.params), "adam_update's contract"
        self.lr, self.betas, self.eps = lr, betas, eps
        self.state: dict[int, dict[str, torch.Tensor]] = {}  # by parameter index, created at its first gradient

    def zero_grad(self) -> None:
        """Drop every gradient (set it to None, so the next backward writes rather than adds)."""
        for param in self.params:
            param.grad = None

    @torch.no_grad()
    def step(self, lr: torch.Tensor | None = None) -> None:
        """Update every parameter that has a gradient, in one fused kernel, at `lr` if given (a 0-d tensor on the
        parameters' device, read when the kernel runs, as a CUDA graph replaying the step needs), else self.lr."""
        indices = [i for i, param in enumerate(self.params) if param.grad is not None]
        if not indices:  # the fused kernels refuse empty lists
            return
        for i in indices:
            if i not in self.state:
                param = self.params[i]
                self.state[i] = {"step": torch.zeros((), dtype=torch.float32, device=param.device),
                                 "exp_avg": torch.zeros_like(param), "exp_avg_sq": torch.zeros_like(param)}
        states = [self.state[i] for i in indices]
        steps = [s["step"] for s in states]
        torch._foreach_add_(steps, 1.0)
        adam_update([self.params[i] for i in indices], [self.params[i].grad.contiguous() for i in indices],
                    [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], steps,
                    self.lr if lr is None else lr, self.betas, self.eps)

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's format (module docstring); the tensors are the live ones, as torch.optim's are."""
        group = {"lr": self.lr, "betas": self.betas, "eps": self.eps, "weight_decay": 0, "amsgrad": False,
                 "maximize": False, "params": list(range(len(self.params)))}
        return {"state": {i: dict(s) for i, s in self.state.items()}, "param_groups": [group]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take `state` (ours or torch.optim.Adam's over the same parameters, in one group) as this optimiser's:
        its hyperparameters, and copies of its moments on each parameter's device and dtype."""
        (group,) = state["param_groups"]
        if len(group["params"]) != len(self.params):
            raise ValueError(f"optimiser state of {len(group['params'])} parameters for {len(self.params)}")
        if group.get("weight_decay", 0) or group.get("amsgrad") or group.get("maximize"):
            raise ValueError("optimiser state of an Adam with weight decay, amsgrad or maximize")
        self.lr, self.betas, self.eps = group["lr"], tuple(group["betas"]), group["eps"]
        self.state = {}
        for i, saved in state["state"].items():  # one group: its parameters are numbered 0 .. n - 1
            param = self.params[i]
            self.state[i] = {"step": torch.tensor(float(saved["step"]), dtype=torch.float32, device=param.device),
                             "exp_avg": _moment_like(saved["exp_avg"], param),
                             "exp_avg_sq": _moment_like(saved["exp_avg_sq"], param)}


def _moment_like(saved: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A copy of a loaded moment on `param`'s device, in its dtype, contiguous (as adam_update needs)."""
    return saved.to(param.device, param.dtype, copy=True, memory_format=torch.contiguous_format)
