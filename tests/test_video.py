"""The H.264 MP4 of a camera path (mega_nerf/video.py), decoded back by ffmpeg and by OpenCV."""
from __future__ import annotations

from pathlib import Path

import cv2
import imageio_ffmpeg
import numpy as np

from mega_nerf.video import mp4_writer, video_problem

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
