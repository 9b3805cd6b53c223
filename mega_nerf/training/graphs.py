"""The training step's shading, loss, backward and Adam update replayed as CUDA graphs.

Why: a step of the hash field is about 470 small kernels, and on an H200 the host took longer to issue them (15 ms
on the `oblique` preset) than the GPU to run them (7.9 ms; bench/RESULTS.md, fourteenth and fifteenth sessions). A
graph issues them all in one call. A graph fixes every shape, and the one shape a step does not know ahead is how
many of its samples are occupied: so the trainer draws the samples and counts the occupied ones eagerly (one sync,
as the eager step's nonzero has), and the rest runs as the graph captured for the smallest `capacity` on a ladder of
sizes about 2^(1/8) apart that holds the count (render.shade pads the rest: at most 9 % more samples shaded once a
step shades over 11,000, the rungs being multiples of 1024). Each capacity is captured the first time it is needed,
after running that step eagerly on a side stream (the update it makes is that step's); later steps with the same
capacity replay it.

All graphs share one memory pool. That is safe because nothing a graph leaves in the pool is read after another
graph runs: its loss and MSE are copied into tensors allocated outside the pool, its gradients are read by the
Adam update inside the same graph, and its inputs are copied into buffers allocated outside the pool. The argument
needs every tensor the body keeps between steps made before the first capture (one eager step makes the parameters'
optimiser state; the eager run before each capture, the kernels' and the encodings' lazily built constants): one
first made during a capture would live in the pool and be overwritten by the next graph. The trainer drops the
gradients after each replay (they point into the pool) and the graphs when a run ends or resumes.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

Inputs = dict[str, torch.Tensor]
Body = Callable[[Inputs, int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

LADDER_BASE = 1024  # the smallest capacity, in samples
LADDER_STEPS = 8  # capacities per doubling


def capacity_for(count: int, limit: int) -> int:
    """The smallest capacity on the ladder (LADDER_BASE * ceil(2 ** (k / LADDER_STEPS)), k >= 0) that holds
    `count` samples, or `limit` (every sample of the step) if that is smaller."""
    k = max(0, math.ceil(LADDER_STEPS * math.log2(max(count, 1) / LADDER_BASE)) - 1)
    while LADDER_BASE * math.ceil(2 ** (k / LADDER_STEPS)) < count:
        k += 1
    return min(limit, LADDER_BASE * math.ceil(2 ** (k / LADDER_STEPS)))


class GraphedSteps:
    """`body(inputs, capacity, lr)` (shade the occupied samples of `inputs` at `capacity`, back-propagate, step
    the optimiser with the 0-d tensor `lr`; returns the loss and MSE as 0-d tensors) captured once per capacity
    and replayed. The body must not sync, and must leave no parameter's gradient or optimiser state to be created
    (one eager step before the first capture makes them)."""

    def __init__(self, body: Body, example: Inputs) -> None:
        self.body = body
        self.inputs = {k: torch.empty_like(v) for k, v in example.items()}
        device = next(iter(example.values())).device
        self.device = device  # streams and captures act on the current device: step() makes it this one
        self.lr = torch.zeros((), device=device)
        self.loss, self.mse = torch.zeros((), device=device), torch.zeros((), device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = torch.cuda.graph_pool_handle()

    def _run(self, capacity: int) -> None:
        loss, mse = self.body(self.inputs, capacity, self.lr)
        self.loss.copy_(loss)
        self.mse.copy_(mse)

    def step(self, inputs: Inputs, capacity: int, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One step over `inputs` (copied into the graphs' buffers) at `capacity`, capturing its graph the first
        time. Returns copies of the step's loss and MSE (device tensors, no sync)."""
        with torch.cuda.device(self.device):
            return self._step(inputs, capacity, lr)

    def _step(self, inputs: Inputs, capacity: int, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        for key, value in inputs.items():
            self.inputs[key].copy_(value)
        self.lr.fill_(lr)
        graph = self.graphs.get(capacity)
        if graph is None:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # this step, eagerly: lazy set-up happens outside the capture
                self._run(capacity)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: the ray stream's loader thread may pin host memory during the capture
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                self._run(capacity)
            self.graphs[capacity] = graph
        else:
            graph.replay()
        return self.loss.clone(), self.mse.clone()
