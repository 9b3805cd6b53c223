"""One pass of a training step as functions of the field: the samples it draws and its forward and backward.

The trainer runs them on its field. `warm_up_in_background` runs them on a throwaway field of the same kind, on a
thread at a GPU run's start, so that the first real step finds every kernel loaded and the autograd engine
started: about a second of first-call costs, overlapped with the dataset, model and first data set-up
(docs/DESIGN.md, Start-up).
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mega_nerf.fields import kernels
from mega_nerf.fields.base import Field
from mega_nerf.render import RenderConfig, distortion, occupancy_along, ray_samples, render_samples
from mega_nerf.training.adam import Adam

WARM_UP_RAYS = 128  # few: the first pass's references take memory beside the run's own set-up


@dataclass(frozen=True)
class PassOptions:
    """What a pass needs beyond its field and rays: the sampling, bfloat16 autocast (CUDA only), the
    distortion loss's weight and the distance within which the cameras' samples learn slower (render.shade)."""
    render: RenderConfig
    amp: bool
    distortion_loss: float
    near_gradient: float


def draw_samples(field: Field, origins: torch.Tensor, dirs: torch.Tensor, near: torch.Tensor, far: torch.Tensor,
                 image: torch.Tensor, render: RenderConfig, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The jittered samples of rays (R,) and which of them are worth shading: everything a pass draws or counts
    before its field is evaluated (`shade_pass`' input)."""
    t, starts, ends = ray_samples(field, origins, dirs, near, far, render, render.perturb, generator)
    occupied = occupancy_along(field, origins, dirs, t) & (ends > starts)
    return {"origins": origins, "dirs": dirs, "near": near, "far": far, "t": t, "starts": starts, "ends": ends,
            "occupied": occupied, "image": image}


def shade_pass(field: Field, s: dict[str, torch.Tensor], rgb: torch.Tensor, batch: int, options: PassOptions,
               generator: torch.Generator, val_image: torch.Tensor | None = None, capacity: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward and backward of one pass over the rays of `draw_samples` (R,) with colours (R, 3), shading at
    most `capacity` samples if given (render.shade). Its losses are sums over its rays divided by the step's
    `batch` rays, so the passes' gradients add up to the step's mean. With `val_image` ((I,) bool: which
    appearance indices are val images; --val_embeddings_only) the val images' rays train only the appearance
    embeddings: their share of the loss is back-propagated to the embedding table alone (autograd then stops
    short of the field), the rest to everything, from one forward pass. Returns the loss, the fine-pass MSE and
    the samples shaded (device tensors, no sync)."""
    # A graph must cast the weights inside itself, not read casts cached outside it
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=options.amp, cache_enabled=capacity is None):
        out = render_samples(field, s["origins"], s["dirs"], s["near"], s["far"], s["image"], options.render,
                             s["t"], s["starts"], s["ends"], s["occupied"], capacity, generator,
                             options.near_gradient)
    scale = 1.0 / (3 * batch)  # 3 channels per ray
    mse = ((out["rgb"] - rgb) ** 2).sum(-1) * scale  # per ray (R,)
    loss = mse + ((out["rgb_coarse"] - rgb) ** 2).sum(-1) * scale if "rgb_coarse" in out else mse
    if options.distortion_loss:  # per ray, as the MSE: each pass adds its rays' share
        loss = loss + options.distortion_loss * distortion(out["weights"]) / batch
    total = loss.sum()
    if val_image is None:
        total.backward()
    else:
        val = val_image[s["image"]].to(loss.dtype)  # (R,) 1 for a val image's ray
        (loss * val).sum().backward(inputs=[field.appearance.weight], retain_graph=True)
        (loss * (1 - val)).sum().backward()
    return total.detach(), mse.detach().sum(), out["samples"]


def warm_up(field: Field, options: PassOptions) -> None:
    """One eager pass and Adam update of `field` (a throwaway: its parameters change) over a few rays from the
    centre of its box in every direction, with a generator of its own: the global random state is not touched.
    On the field's GPU (a new thread's current GPU is the first, and Triton launches on the current one)."""
    device = field.box_min.device
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        generator = torch.Generator(device=device)
        generator.manual_seed(0)
        dirs = torch.nn.functional.normalize(torch.randn(WARM_UP_RAYS, 3, generator=generator, device=device), dim=-1)
        origins = ((field.box_min + field.box_max) / 2).repeat(WARM_UP_RAYS, 1)
        near = torch.zeros(WARM_UP_RAYS, device=device)
        far = (field.box_max - field.box_min).norm().repeat(WARM_UP_RAYS)
        image = torch.zeros(WARM_UP_RAYS, dtype=torch.long, device=device)
        s = draw_samples(field, origins, dirs, near, far, image, options.render, generator)
        shade_pass(field, s, torch.full((WARM_UP_RAYS, 3), 0.5, device=device), WARM_UP_RAYS, options, generator)
        Adam(field.parameters(), lr=1e-3).step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)


def warm_up_in_background(field: Field, options: PassOptions,
                          on_error: Callable[[Exception], object] | None = None) -> threading.Thread:
    """Start the warm-up of a GPU run on a daemon thread: `warm_up` with the kernels' PyTorch references first
    (kernels.references_only: it loads PyTorch's kernels and starts the autograd engine), beside Triton's one-time
    work on a thread of its own (kernels.prepare_in_background; its hashing releases the interpreter lock), then,
    that done, `warm_up` again, which loads Triton's kernels (where there are none, once is enough). Only a head
    start: a failure is left for the first real step to meet and report (`on_error`, if given, is told: tests).
    Join the thread before the first step: kernels load once, not in two threads at a time."""
    prepared = kernels.prepare_in_background()

    def run() -> None:
        try:
            with kernels.references_only():
                warm_up(field, options)
            if prepared is not None:
                prepared.join()
                warm_up(field, options)
        except Exception as error:
            if on_error is not None:
                on_error(error)
    thread = threading.Thread(target=run, name="warm-up", daemon=True)
    thread.start()
    return thread
