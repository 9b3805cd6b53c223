"""`train.py --viewer`: the field being trained, in the browser, at a bounded cost to training.

The viewer never renders the live field: the optimiser writes it on the training thread. It renders a copy
(`FieldCopy`), refreshed between two optimiser steps when a frame starts: the render thread asks for a refresh
and the trainer's `on_step` hook, which otherwise only reads a flag, copies every parameter and buffer into it on
the training stream and records an event that the render stream waits on. A step is never waited for; the render
thread waits for the next step's end (or renders the last copy when training has ended).

Rendering is bounded by `RenderLoop`'s share: after each render the thread pauses so that renders take at most
SHARE of wall time, on a CUDA stream of their own, and the resting view is rendered again every REFRESH seconds to
follow training. The browsers' renders of the container viewer are unchanged (same loop, same scene code).
"""
from __future__ import annotations

import copy
import threading
from dataclasses import dataclass
from itertools import chain
from typing import TYPE_CHECKING

import torch

from mega_nerf.fields.base import Field
from mega_nerf.render import default_chunk
from mega_nerf.training.trainer import Trainer
from mega_nerf.viewer.scene import Scene

if TYPE_CHECKING:
    from mega_nerf.viewer.server import Viewer

SHARE = 0.03  # of wall time spent rendering, at most
REFRESH = 2.0  # seconds between renders of a resting view
STEP_WAIT = 5.0  # seconds the render thread waits for a step's end before rendering the copy it has
HOST = "0.0.0.0"  # train.py --viewer serves on every interface


class FieldCopy:
    """An eval-mode copy of `live`, refreshed between optimiser steps on request (see the module docstring)."""

    def __init__(self, live: Field) -> None:
        self.live = live
        self.field = copy.deepcopy(live).eval().requires_grad_(False)
        self.copied_at: int | None = None  # the step of the last refresh
        self._wanted, self._done = threading.Event(), threading.Event()
        self._event = torch.cuda.Event() if self.device.type == "cuda" else None

    @property
    def device(self) -> torch.device:
        return next(chain(self.live.parameters(), self.live.buffers())).device

    def on_step(self, step: int) -> None:
        """The trainer's hook, after every optimiser step: copy the live field if a refresh was asked for."""
        if not self._wanted.is_set():
            return
        self._wanted.clear()
        with torch.no_grad():
            for mine, theirs in zip(self._tensors(self.field), self._tensors(self.live), strict=True):
                mine.copy_(theirs)
        if self._event is not None:
            self._event.record()  # on the training stream, after the copies
        self.copied_at = step
        self._done.set()

    def refresh(self) -> None:
        """In the render thread, before a frame: ask for a copy at the next step's end and wait for it (at most
        STEP_WAIT seconds); the current stream then waits for the copy's kernels."""
        self._done.clear()
        self._wanted.set()
        if self._done.wait(STEP_WAIT) and self._event is not None:
            torch.cuda.current_stream().wait_event(self._event)

    @staticmethod
    def _tensors(field: Field) -> list[torch.Tensor]:
        return [t for _, t in chain(field.named_parameters(), field.named_buffers())]


@dataclass
class Watch:
    """A training run's viewer: the server and the copy it renders. Pass `on_step` to the trainer."""

    copy: FieldCopy
    viewer: Viewer

    def on_step(self, step: int) -> None:
        self.copy.on_step(step)


def watch(trainer: Trainer, port: int, host: str = HOST) -> Watch:
    """Serve the trainer's field on `port` (the next free one if taken)."""
    from mega_nerf.viewer.server import Viewer, home_pose  # viser, only when a run is watched

    copied = FieldCopy(trainer.field)
    scene = Scene(copied.field, trainer.bounds, trainer.render_config, default_chunk(trainer.device),
                  len(trainer.dataset.images), prepare=copied.refresh)
    centres = trainer.cameras.c2w[:, :, 3].double().cpu().numpy()  # every image, in appearance-index order
    box = (torch.tensor(trainer.field_config["box_min"]).double().numpy(),
           torch.tensor(trainer.field_config["box_max"]).double().numpy())
    ground = None if trainer.bounds.altitude is None else trainer.bounds.altitude[1]
    home, target = home_pose(centres, box, ground)
    stream = torch.cuda.Stream(copied.device) if copied.device.type == "cuda" else None
    viewer = Viewer(scene, trainer.dataset.train, centres, None, home, target, host, port, share=SHARE,
                    refresh=REFRESH, stream=stream)
    print(f"viewer of the training run at {viewer.url}")
    return Watch(copied, viewer)
