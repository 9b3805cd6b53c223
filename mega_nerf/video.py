"""H.264 MP4 videos of rendered frames, through imageio-ffmpeg (its wheel ships an ffmpeg binary with libx264,
so no system ffmpeg is needed and every player and browser decodes the result, unlike OpenCV's mp4v).

Frames are encoded with libx264 at CRF VIDEO_CRF in yuv420p, the pixel format players expect of H.264. yuv420p
needs even sides, so an odd width or height gets a copy of its last column or row (padded, not scaled: the
rendered pixels are kept where they are; a copy rather than black, which would bleed into the last pixels' colour
through the shared chroma samples).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

# libx264's constant rate factor: 0 lossless, 23 its default, 18 about visually lossless (ffmpeg's H.264 guide).
VIDEO_CRF = 18


@contextlib.contextmanager
def mp4_writer(path: Path, size: tuple[int, int], fps: float) -> Iterator[Callable[[np.ndarray], None]]:
    """A function writing one (H, W, 3) uint8 RGB frame of `size` (W, H) to the H.264 MP4 at `path`; the file
    is complete when the block ends. An encoder failure (e.g. a full disk) raises OSError."""
    import imageio_ffmpeg  # here: its import finds the ffmpeg binary, which only writing a video needs

    W, H = size
    pad = ((0, H % 2), (0, W % 2), (0, 0))
    frames = imageio_ffmpeg.write_frames(
        str(path), (int(W + W % 2), int(H + H % 2)), fps=fps, codec="libx264", pix_fmt_in="rgb24",
        pix_fmt_out="yuv420p", quality=None, macro_block_size=1, output_params=["-crf", str(VIDEO_CRF)])
    frames.send(None)  # starts ffmpeg
    try:
        yield lambda rgb: frames.send(np.pad(rgb, pad, mode="edge"))
    finally:
        frames.close()


def video_problem(path: Path, frames: int) -> str | None:
    """What is wrong with a written video that should hold `frames` frames (None: nothing), counted by decoding
    it with ffmpeg, so a truncated file (a full disk) is caught."""
    import imageio_ffmpeg

    try:
        found, _ = imageio_ffmpeg.count_frames_and_secs(str(path))
    except RuntimeError:
        return "ffmpeg cannot decode the video (disk full?)"
    return None if found == frames else f"the video holds {found} of its {frames} frames (disk full?)"
