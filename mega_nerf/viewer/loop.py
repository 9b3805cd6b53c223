"""One browser's render thread: a cheap low-resolution frame as soon as the camera moves, the full frame once it
rests.

Each submitted view replaces the one before (only the latest matters). For a new view the thread first renders a
preview, with the scene's preview settings (Scene.preview_render: fewer samples per ray) and sized so that it takes
RENDER_BUDGET / target_fps seconds at the rays per second previews have run at so far (the rest of 1 / target_fps
composes, encodes and sends it), and shows it. Then it renders the full frame, with the scene's own settings, in
bands of about BAND_SECONDS each (with `share`, shorter: see band_rows), giving up between bands as soon as a newer
view arrives. So while the camera moves the browser gets previews at about target_fps, and when it stops the full
frame follows the last preview. No preview is rendered when the full frame itself fits in the preview's time, nor
when the view is the one whose full frame was shown last (a refresh).

With `share` (the training viewer), every render is followed by a pause so that rendering takes at most that share
of wall time (and so of the GPU's time), and with `refresh` the current view is rendered again every `refresh`
seconds (the field being trained changes under a resting camera).
"""
from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from mega_nerf.viewer.camera import View
from mega_nerf.viewer.scene import Scene, compose, render_rows

FIRST_PREVIEW = 1 / 8  # preview scale (of each side) before any speed is measured
RENDER_BUDGET = 0.75  # of a preview's 1 / target_fps seconds spent rendering; the rest composes, encodes, sends
BAND_SECONDS = 0.25  # a full frame's bands: few launches per frame, and a newer view waits at most about this long
RATE_MEMORY = 0.5  # weight of the previous rays/s estimate in the running average


@dataclass(frozen=True)
class Shown:
    """A frame handed to the browser: its view, size, whether it is the full frame, and the seconds from the
    view's submission to the frame being ready."""

    view: View
    width: int
    height: int
    final: bool
    seconds: float


Show = Callable[[np.ndarray, Shown], None]  # (H, W, 3) uint8 RGB and what it is


class RenderLoop:
    """Renders the latest submitted view of `scene` on a daemon thread and hands each frame to `show`."""

    def __init__(self, scene: Scene, show: Show, target_fps: float = 10.0, share: float | None = None,
                 refresh: float | None = None, stream: torch.cuda.Stream | None = None) -> None:
        """share: at most this fraction of wall time spent rendering (None: no limit); refresh: seconds between
        renders of an unchanged view (None: never); stream: the CUDA stream the thread renders on (None: the
        default)."""
        assert share is None or 0 < share <= 1, "share is a fraction of wall time"
        self.scene, self.show, self.target_fps = scene, show, target_fps
        self.share, self.refresh, self.stream = share, refresh, stream
        self.rate: float | None = None  # rays per second of full frames (running average)
        self.preview_rate: float | None = None  # rays per second of previews (running average)
        self.last: Shown | None = None
        self.frames = 0  # frames shown
        self._view: View | None = None
        self._version, self._submitted, self._closed = 0, 0.0, False
        self._wake = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="viewer-render", daemon=True)
        self._thread.start()

    def submit(self, view: View) -> None:
        """Render `view` next (dropping any view not yet rendered, and the full frame in progress), unless it is
        the view already asked for (a browser sends its camera again on a click that moves nothing)."""
        with self._wake:
            if self._view is not None and self._view.same(view):
                return
            self._view, self._version, self._submitted = view, self._version + 1, time.perf_counter()
            self._wake.notify()

    def close(self) -> None:
        """Stop the thread (after the band in progress) and wait for it."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join()

    def _next(self, done: int) -> tuple[View, int, float] | None:
        """(view, version, submission time) to render after version `done`: a newer one, or (with refresh) the
        same one again once `refresh` seconds pass; None once closed."""
        with self._wake:
            while not self._closed and (self._version == done or self._view is None):
                if not self._wake.wait(self.refresh) and self._view is not None:
                    return self._view, self._version, time.perf_counter()
            return None if self._closed else (self._view, self._version, self._submitted)

    def _stale(self, version: int) -> bool:
        return self._closed or self._version != version

    def _run(self) -> None:
        done = 0
        with torch.cuda.stream(self.stream):  # a no-op without a stream
            while (job := self._next(done)) is not None:
                view, done, submitted = job
                self._frame(view, done, submitted)

    def _frame(self, view: View, version: int, submitted: float) -> None:
        """A preview (unless not needed), then the full frame in bands unless superseded."""
        if self.scene.prepare is not None:
            self.scene.prepare()
        W, H = view.width, view.height
        if (size := self.preview_size(view)) is not None:
            w, h = size
            self._show(view, self._render(view, w, h, (0, h), preview=True), w, h, False, submitted)
        bands, first = [], 0
        while first < H:
            if self._stale(version):
                return
            last = min(H, first + self.band_rows(W))
            bands.append(self._render(view, W, H, (first, last), preview=False))
            first = last
        self._show(view, {key: torch.cat([b[key] for b in bands]) for key in bands[0]}, W, H, True, submitted)

    def preview_size(self, view: View) -> tuple[int, int] | None:
        """(w, h) of the view's preview: the view scaled to what renders in RENDER_BUDGET / target_fps seconds at
        the previews' measured rate (before any preview, the full frames' rate, which a preview beats; before any
        measurement, FIRST_PREVIEW of each side), at most the full size.
        None: no preview, as the view's full frame is on screen already or renders in that time itself."""
        W, H = view.width, view.height
        if self.last is not None and self.last.final and self.last.view.same(view):
            return None
        budget = RENDER_BUDGET / self.target_fps  # seconds
        if self.rate is not None and W * H <= budget * self.rate:
            return None
        rate = self.preview_rate if self.preview_rate is not None else self.rate
        scale = FIRST_PREVIEW if rate is None else min(1.0, math.sqrt(budget * rate / (W * H)))
        return max(1, round(W * scale)), max(1, round(H * scale))

    def band_rows(self, W: int) -> int:
        """Rows per band of a full frame W pixels wide: about BAND_SECONDS each at the full frames' measured rate
        (FIRST_PREVIEW * W rows before any measurement). With a share, a newer view also waits through the pause
        after a band, (1 - share) / share times as long, so there a band takes a preview's time instead."""
        if self.rate is None:
            return max(1, round(FIRST_PREVIEW * W))
        seconds = BAND_SECONDS if self.share is None else RENDER_BUDGET / self.target_fps
        return max(1, int(seconds * self.rate / W))

    def _render(self, view: View, W: int, H: int, rows: tuple[int, int], preview: bool) -> dict[str, torch.Tensor]:
        """render_rows (the preview settings when `preview`), timed into that kind's rate, followed by the pause
        `share` asks for."""
        start = time.perf_counter()
        band = render_rows(self.scene, view, W, H, rows, preview)  # on the CPU: the time includes the device's work
        seconds = max(time.perf_counter() - start, 1e-6)
        rate = W * (rows[1] - rows[0]) / seconds
        if preview:
            self.preview_rate = running_average(self.preview_rate, rate)
        else:
            self.rate = running_average(self.rate, rate)
        if self.share is not None:
            with self._wake:
                self._wake.wait_for(lambda: self._closed, seconds * (1 - self.share) / self.share)
        return band

    def _show(self, view: View, frame: dict[str, torch.Tensor], W: int, H: int, final: bool, submitted: float
              ) -> None:
        if self._closed:
            return
        shown = Shown(view, W, H, final, time.perf_counter() - submitted)
        self.show(compose(frame, view.overlay), shown)
        self.last, self.frames = shown, self.frames + 1


def running_average(previous: float | None, measured: float) -> float:
    """The rate estimate after a new measurement (the measurement itself when there was none)."""
    return measured if previous is None else RATE_MEMORY * previous + (1 - RATE_MEMORY) * measured
