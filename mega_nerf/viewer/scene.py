"""What the viewer renders, and how a rendered frame becomes the picture a browser shows.

Frames shown while the camera moves (previews) are rendered with fewer samples per ray (`Scene.preview_render`:
`preview_samples` of the uniform, fine and background samples): a frame's time goes to looking up the occupancy of
every sample and to shading the occupied ones, and both scale with the samples per ray (each sample of a sparser
ray spans more of the surface, so early termination also comes after fewer). Full frames use the scene's settings.

A frame is rendered a band of rows at a time (`render_rows`), each band through imaging.render_image with the
view's intrinsics shifted up by the band's first row, so the bands put together are exactly the rays of the whole
image (and a render in progress can be dropped between bands when the camera moves on). `compose` turns the
assembled bands into uint8 RGB: the colour, the depth colour-mapped (imaging.colorize_depth, normalised over the
whole frame), or the cell-membership overlay: each opaque pixel tinted with the colour of the submodule that owns
its surface point, the one with the largest blend weight there (Container.weights: the routing rule, far points
pulled in by the contraction as the container routes them).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch

from mega_nerf.fields.base import Field
from mega_nerf.imaging import colorize_depth, render_image, to_uint8
from mega_nerf.merging.container import Container
from mega_nerf.rays import SceneBounds, image_rays
from mega_nerf.render import RenderConfig, default_chunk
from mega_nerf.viewer.camera import View

# Cell colours (RGB), repeated past the twelfth cell: Tableau's categorical palette, well apart in hue.
PALETTE = np.array([[31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189], [140, 86, 75],
                    [227, 119, 194], [127, 127, 127], [188, 189, 34], [23, 190, 207], [255, 187, 120],
                    [152, 223, 138]], np.float32)
TINT = 0.45  # share of the cell colour in an overlaid pixel
JPEG_QUALITY = {False: 75, True: 92}  # what a frame is sent at: previews, full frames
SOLID = 0.5  # opacity above which a pixel has a surface (as imaging.colorize_depth)
PREVIEW_SAMPLES = 0.5  # share of the samples per ray a preview takes by default: about half a full render's cost


@dataclass
class Scene:
    """A field to render with the settings it was trained with (previews with `preview_samples` of them).
    `prepare` (may be None) runs in the render thread before each frame (the training viewer refreshes its copy of
    the field there)."""

    field: Field
    bounds: SceneBounds
    render: RenderConfig
    chunk: int  # rays per render_in_chunks call
    n_images: int  # appearance indices 0 .. n_images - 1
    prepare: Callable[[], None] | None = None
    preview_samples: float = PREVIEW_SAMPLES  # in (0, 1]: share of each kind of sample per ray in a preview

    @property
    def preview_render(self) -> RenderConfig:
        """The render settings of previews: `preview_samples` of the scene's samples of each kind, rounded, at
        least one of each kind the scene has."""
        def fewer(n: int) -> int:
            return 0 if n == 0 else max(1, round(n * self.preview_samples))

        return replace(self.render, samples=fewer(self.render.samples), fine_samples=fewer(self.render.fine_samples),
                       bg_samples=fewer(self.render.bg_samples))

    @property
    def cells(self) -> list[int]:
        """The non-empty cells of a container (the overlay's colours); [] for a single field."""
        return self.field.cells if isinstance(self.field, Container) else []

    @property
    def device(self) -> torch.device:
        weight = next(self.field.parameters(), None)
        return torch.device("cpu") if weight is None else weight.device


def view_chunk(device: torch.device) -> int:
    """Rays per render_in_chunks call of the browser viewer of a container: on a GPU twice render.default_chunk,
    since the viewer has the GPU to itself and a full frame is what a user waits for (a 1080p frame of a 4-cell
    container: 330 ms at 524288 rays against 369 ms at 262144, 4.6 GiB peak against 2.6; bench/RESULTS.md, third
    session). The training viewer keeps the default: it shares the GPU with training."""
    return 2 * default_chunk(device) if device.type == "cuda" else default_chunk(device)


def cell_colour(cell: int) -> tuple[int, int, int]:
    """The overlay's RGB colour of cell `cell`."""
    return tuple(int(v) for v in PALETTE[cell % len(PALETTE)])


@torch.no_grad()
def render_rows(scene: Scene, view: View, W: int, H: int, rows: tuple[int, int], preview: bool = False
                ) -> dict[str, torch.Tensor]:
    """Rows [rows[0], rows[1]) of the view's W x H frame, on the CPU, with the scene's render settings (those of
    previews when `preview`): rgb (h, W, 3), depth (h, W), opacity (h, W) and, for the cells overlay of a
    container, cell (h, W) long: the owning cell, -1 where nothing is solid."""
    first, last = rows
    intrinsics = torch.as_tensor(view.intrinsics(W, H), dtype=torch.float32)
    intrinsics[3] -= first  # the band's row 0 is the frame's row `first`
    c2w = torch.as_tensor(view.c2w, dtype=torch.float32)
    config = scene.preview_render if preview else scene.render
    out = render_image(scene.field, c2w, intrinsics, W, last - first, view.appearance, scene.bounds, config,
                       scene.chunk)
    band = {key: out[key] for key in ("rgb", "depth", "opacity")}
    if view.overlay == "cells" and scene.cells:
        band["cell"] = owners(scene.field, c2w.to(scene.device), intrinsics.to(scene.device), band["depth"],
                              band["opacity"])
    return to_host(band)


def to_host(band: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The band's tensors copied to the CPU, from a GPU through page-locked memory (PyTorch caches those buffers):
    a 1080p frame's planes spent 17 ms in copies to pageable memory (bench/RESULTS.md, twelfth session), several
    times what the bus needs. Waits for the copies on the band's device's current stream (the render thread's)."""
    device = next(iter(band.values())).device
    if device.type != "cuda":
        return {key: value.cpu() for key, value in band.items()}
    host = {key: torch.empty(value.shape, dtype=value.dtype, pin_memory=True).copy_(value, non_blocking=True)
            for key, value in band.items()}
    torch.cuda.current_stream(device).synchronize()
    return host


def owners(container: Container, c2w: torch.Tensor, intrinsics: torch.Tensor, depth: torch.Tensor,
           opacity: torch.Tensor) -> torch.Tensor:
    """(h, W) long: the cell whose submodule has the largest blend weight at each pixel's surface point (the
    expected ray distance depth / opacity), -1 where opacity <= SOLID. depth, opacity: (h, W)."""
    h, W = depth.shape
    origins, dirs = image_rays(c2w, intrinsics, W, h)
    distance = (depth / opacity.clamp_min(1e-6)).reshape(-1, 1)
    dominant = container.weights(origins + distance * dirs).argmax(1)  # (h * W,) over the non-empty submodules
    cell = torch.as_tensor(container.cells, device=depth.device)[dominant].view(h, W)
    return torch.where(opacity > SOLID, cell, torch.full_like(cell, -1))


def compose(frame: dict[str, torch.Tensor], overlay: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB of an assembled frame (render_rows' keys) for the overlay (camera.OVERLAYS)."""
    if overlay == "depth":
        return colorize_depth(frame["depth"], frame["opacity"])
    rgb = to_uint8(frame["rgb"])
    if overlay != "cells" or "cell" not in frame:
        return rgb
    cell = frame["cell"].numpy()
    tint = PALETTE[cell % len(PALETTE)]
    mixed = (1 - TINT) * rgb + TINT * tint
    return np.where((cell >= 0)[..., None], mixed + 0.5, rgb).astype(np.uint8)
