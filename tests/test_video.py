"""The H.264 MP4 of a camera path (mega_nerf/video.py), decoded back by ffmpeg and by OpenCV."""
from __future__ import annotations

import subprocess
from pathlib import Path

import cv2
import imageio_ffmpeg
import numpy as np
import pytest

from mega_nerf.video import MAX_FPS, MAX_SIDE, MIN_FPS, fps_problem, mp4_writer, size_problem, video_problem

# The frames below (65 x 47) decode at 39.4 to 40.2 dB (measured, CRF 18, yuv420p: the chroma is kept at half
# resolution); the floor leaves room for another libx264 build and still fails on swapped colour channels
# (about 11 dB) or a frame out of place (about 22 dB).
MIN_PSNR = 36.0


def frames(count: int, W: int, H: int) -> np.ndarray:
    """(count, H, W, 3) uint8: a colour gradient with a bright blob moving across it (smooth, like renderings)."""
    y, x = np.mgrid[0:H, 0:W] / max(W, H)
    out = []
    for f in range(count):
        blob = np.exp(-((x - 0.2 - 0.1 * f) ** 2 + (y - 0.3) ** 2) / 0.01)
        rgb = np.stack([x, y, 0.5 + 0.3 * np.sin(6 * x + f)], -1) * 180 + 60 * blob[..., None]
        out.append(np.clip(rgb, 0, 255).astype(np.uint8))
    return np.stack(out)


def decode(path: Path) -> tuple[dict, np.ndarray]:
    """ffmpeg's metadata of the video and its frames, (N, H, W, 3) uint8 RGB at the encoded (padded) size."""
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    W, H = meta["size"]
    return meta, np.stack([np.frombuffer(b, np.uint8).reshape(H, W, 3) for b in reader])


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255.0 ** 2 / np.mean((a.astype(float) - b.astype(float)) ** 2)))


def test_mp4_is_h264_with_every_frame_close_to_the_written_ones(tmp_path: Path) -> None:
    W, H = 65, 47  # odd sides: padded by a copy of the last column and row (yuv420p needs even ones)
    written = frames(5, W, H)
    path = tmp_path / "video.mp4"
    with mp4_writer(path, (W, H), 30.0) as write:
        for rgb in written:
            write(rgb)
    meta, decoded = decode(path)
    assert meta["codec"] == "h264" and meta["size"] == (W + 1, H + 1) and meta["fps"] == 30.0
    assert decoded.shape == (5, H + 1, W + 1, 3)
    assert all(psnr(d[:H, :W], w) > MIN_PSNR for d, w in zip(decoded, written))
    pad_error = [np.abs(decoded[:, H, :W].astype(int) - written[:, H - 1]).mean(),
                 np.abs(decoded[:, :H, W].astype(int) - written[:, :, W - 1]).mean()]
    assert max(pad_error) < 4  # the padding repeats the edge (black would be about 100 off)
    assert cv2.VideoCapture(str(path)).get(cv2.CAP_PROP_FRAME_COUNT) == 5  # OpenCV reads it too
    assert video_problem(path, 5) is None


def test_video_problem_names_a_missing_frame_and_an_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "video.mp4"
    with mp4_writer(path, (16, 12), 30.0) as write:
        for rgb in frames(3, 16, 12):
            write(rgb)
    assert video_problem(path, 4) == "the video holds 3 of its 4 frames (disk full?)"
    path.write_bytes(path.read_bytes()[:200])  # cut short, as on a full disk
    assert video_problem(path, 3) is not None


def write_black(path: Path, size: tuple[int, int], fps: float = 30.0, count: int = 1) -> None:
    """`count` black frames of `size` (W, H) as a video."""
    with mp4_writer(path, size, fps) as write:
        for _ in range(count):
            write(np.zeros((size[1], size[0], 3), np.uint8))


def test_the_stated_size_limits_are_the_writers(tmp_path: Path) -> None:
    """size_problem passes what the writer encodes and refuses what it fails on (only when the video is closed,
    without an error of its own): libx264's side limit, written for real, and ffmpeg's area limit, where ffmpeg
    opens its raw input (a frame that large would take seconds to encode)."""
    write_black(tmp_path / "wide.mp4", (MAX_SIDE - 1, 16))  # padded to MAX_SIDE
    assert video_problem(tmp_path / "wide.mp4", 1) is None and size_problem((MAX_SIDE - 1, 16)) is None
    write_black(tmp_path / "wider.mp4", (MAX_SIDE + 2, 16))
    assert video_problem(tmp_path / "wider.mp4", 1) is not None
    assert "16384 pixels a side" in size_problem((MAX_SIDE + 1, 16))

    def ffmpeg_refuses(W: int, H: int) -> bool:
        result = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-f", "rawvideo", "-s", f"{W}x{H}",
                                 "-pix_fmt", "rgb24", "-i", "/dev/null", "-f", "null", "-"], capture_output=True,
                                text=True, timeout=60)
        return "Picture size" in result.stderr
    assert not ffmpeg_refuses(MAX_SIDE, 16128) and size_problem((MAX_SIDE, 16128)) is None
    assert ffmpeg_refuses(MAX_SIDE, 16130) and "ffmpeg refuses" in size_problem((MAX_SIDE, 16130))


def test_the_stated_frame_rates_are_the_writers(tmp_path: Path) -> None:
    """fps_problem refuses rates that the writer turns into a video that cannot be read back (well under MIN_FPS)
    or that has another rate (over MAX_FPS), and passes both bounds, which it writes as asked."""
    for fps in (MIN_FPS, MAX_FPS):
        write_black(tmp_path / "ok.mp4", (16, 12), fps, count=3)
        assert cv2.VideoCapture(str(tmp_path / "ok.mp4")).get(cv2.CAP_PROP_FPS) == pytest.approx(fps)
        assert video_problem(tmp_path / "ok.mp4", 3) is None and fps_problem(fps) is None
    write_black(tmp_path / "fast.mp4", (16, 12), 10 * MAX_FPS)
    assert cv2.VideoCapture(str(tmp_path / "fast.mp4")).get(cv2.CAP_PROP_FPS) == MAX_FPS  # not 10 x
    write_black(tmp_path / "slow.mp4", (16, 12), MIN_FPS / 10, count=3)
    assert video_problem(tmp_path / "slow.mp4", 3) is not None
    for fps in (MIN_FPS / 10, 10 * MAX_FPS, float("nan"), 1e300):
        assert fps_problem(fps) == f"the video's frame rate must lie between {MIN_FPS:g} and {MAX_FPS:,}"
