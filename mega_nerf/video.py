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
# What the writer accepts, found by writing with imageio-ffmpeg's ffmpeg 9.0 (out of these bounds it fails only when
# the video is closed, or writes another rate than asked, without naming the option):
MAX_SIDE = 16384  # libx264 refuses a wider or taller (padded) frame
MAX_AREA = (2 ** 31 - 1) // 8  # ffmpeg refuses a frame whose (W + 128) * (H + 128) is not below this
# (av_image_check_size, checked on its raw input: 16384 x 16128 passes, 16384 x 16130 does not)
MIN_FPS = 1e-4  # a frame every 2.8 hours; at 2e-5 the MP4 reads back at another rate, at 1e-5 not at all
MAX_FPS = 1_001_000  # ffmpeg keeps a frame rate as a ratio of integers up to this and clamps a higher one to it


def size_problem(size: tuple[int, int]) -> str | None:
    """Why the writer cannot encode frames of `size` (W, H), or None: its limits, after padding to even sides."""
    W, H = size[0] + size[0] % 2, size[1] + size[1] % 2
    if max(W, H) > MAX_SIDE:
        return f"an H.264 video frame is at most {MAX_SIDE} pixels a side"
    if (W + 128) * (H + 128) >= MAX_AREA:
        return f"ffmpeg refuses frames this large ((W + 128) x (H + 128) must be under {MAX_AREA:,})"
    return None


def fps_problem(fps: float) -> str | None:
    """Why the writer cannot make a video of `fps` frames a second, or None."""
    if not MIN_FPS <= fps <= MAX_FPS:
        return f"the video's frame rate must lie between {MIN_FPS:g} and {MAX_FPS:,}"
    return None


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
