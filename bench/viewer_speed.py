"""The browser viewer's speed, through the code a browser's requests run (mega_nerf/viewer), without a browser:

- moving: frames per second at --moving_size (960x540) along an orbit, each rendered (viewer.scene.render_rows),
  composed and JPEG-encoded as the server sends it, once with the previews' settings (what the loop shows while the
  camera moves: --preview_samples of the samples per ray) and once with the full frames' (the container's), and
  the PSNR of the first pose's preview against its full render; and the frames per second a RenderLoop shows on a
  --rest_size canvas whose camera moves at 60 Hz (previews sized by the loop itself);
- at rest: seconds from a --rest_size (1920x1080) view's submission to its full frame, encoded, through a
  RenderLoop whose speed estimate is warm (the camera moved first, as it does before it rests);
- training: rays/s of train_step on one cell with the `train.py --viewer` hook and a render loop kept busy (a
  camera moving all the time, the worst case) against the same run without renders, in alternating blocks of
  --block_seconds so that the field's changing cost weighs on both alike.

    python bench/viewer_speed.py --work W --container_path W/merged.pt [--preset city] [--train_seconds 120]
    # on a CPU, tiny: --preset tiny --moving_size 96 54 --rest_size 192 108 --train_seconds 10 --block_seconds 2
    #                 --extra "--batch_size 1024 --hash_levels 4"
"""
from __future__ import annotations

import argparse
import itertools
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_results, cell_args, ensure_city, ensure_partition, profiled  # noqa: E402

from mega_nerf.camera_path import orbit  # noqa: E402
from mega_nerf.cli.train import config_from_argv  # noqa: E402
from mega_nerf.data.dataset import load_dataset  # noqa: E402
from mega_nerf.evaluation.metrics import psnr  # noqa: E402
from mega_nerf.merging.container import load_container  # noqa: E402
from mega_nerf.render import default_chunk  # noqa: E402
from mega_nerf.training.trainer import Trainer  # noqa: E402
from mega_nerf.viewer.camera import View, fov_of  # noqa: E402
from mega_nerf.viewer.loop import RenderLoop, Shown  # noqa: E402
from mega_nerf.viewer.scene import JPEG_QUALITY, PREVIEW_SAMPLES, Scene, compose, render_rows, view_chunk  # noqa: E402
from mega_nerf.viewer.watch import SHARE, FieldCopy  # noqa: E402


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def encode(image: np.ndarray, final: bool) -> bytes:
    """The JPEG the server sends (viser encodes with OpenCV, BGR)."""
    ok, data = cv2.imencode(".jpg", image[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY[final]])
    assert ok
    return data.tobytes()


def views(dataset_path: Path, altitude: tuple[float, float] | None, count: int, W: int, H: int) -> list[View]:
    """`count` views around the scene's orbit (camera_path.orbit) with the first camera's vertical field of view."""
    dataset = load_dataset(dataset_path)
    first = dataset.images[0]
    fov = fov_of(float(first.intrinsics[1]), first.H)
    return [View(p.c2w, fov, W, H, 0) for p in orbit(dataset, count, altitude)]


def moving(scene: Scene, path: list[View], preview: bool) -> float:
    """Frames per second along `path` with the previews' (or the full frames') settings: render, compose, encode
    (one warm-up frame)."""
    def frame(view: View) -> None:
        rows = render_rows(scene, view, view.width, view.height, (0, view.height), preview)
        encode(compose(rows, "rgb"), False)

    frame(path[0])
    sync()
    start = time.perf_counter()
    for view in path:
        frame(view)
    return len(path) / (time.perf_counter() - start)


def preview_psnr(scene: Scene, view: View) -> float:
    """dB of the view's preview against its full render (colours clamped to [0, 1])."""
    full = render_rows(scene, view, view.width, view.height, (0, view.height))["rgb"]
    preview = render_rows(scene, view, view.width, view.height, (0, view.height), preview=True)["rgb"]
    return psnr(preview.clamp(0, 1), full.clamp(0, 1))


def profile_rest(scene: Scene, view: View) -> None:
    """Print where one full frame of `view` goes: render (one band), compose and encode timed apart, then the
    render again under torch.profiler, its top operations by GPU time."""
    render_rows(scene, view, view.width, view.height, (0, view.height))  # warm-up
    sync()
    start = time.perf_counter()
    rows = render_rows(scene, view, view.width, view.height, (0, view.height))
    rendered = time.perf_counter()
    image = compose(rows, "rgb")
    composed = time.perf_counter()
    encode(image, True)
    encoded = time.perf_counter()
    print(f"one full frame at rest: render {rendered - start:.3f} s, compose {composed - rendered:.3f} s, encode "
          f"{encoded - composed:.3f} s", flush=True)
    if not torch.cuda.is_available():
        return
    prof, wall, busy = profiled(lambda: render_rows(scene, view, view.width, view.height, (0, view.height)))
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=25))
    print(f"profiled full frame: GPU busy {busy:.3f} s of {wall:.3f} s wall (profiler overhead included)", flush=True)


def moving_loop(scene: Scene, path: list[View], seconds: float) -> tuple[float, float]:
    """(frames shown per second, mean preview pixels) of a RenderLoop whose camera moves at 60 Hz along `path`
    for `seconds` (the loop sizes its previews; a frame counts once encoded)."""
    shown: list[Shown] = []

    def show(image: np.ndarray, info: Shown) -> None:
        encode(image, info.final)
        shown.append(info)

    loop = RenderLoop(scene, show)
    start = time.perf_counter()
    try:
        for i in itertools.count():
            if time.perf_counter() - start > seconds:
                break
            loop.submit(path[i % len(path)])
            time.sleep(1 / 60)
    finally:
        loop.close()
    previews = [s.width * s.height for s in shown if not s.final] or [0]
    return len(shown) / (time.perf_counter() - start), sum(previews) / len(previews)


def at_rest(scene: Scene, moves: list[View], rests: list[View]) -> list[float]:
    """Seconds to each rest view's encoded full frame after a few moves (the loop's own speed estimate); prints
    where each one's seconds went: its preview shown, its full frame rendered (bands) and composed, encoded."""
    done = threading.Event()
    seconds: list[float] = []
    preview: float | None = None  # the rest view's preview, once shown

    def show(image: np.ndarray, shown: Shown) -> None:
        nonlocal preview
        start = time.perf_counter()
        encode(image, shown.final)
        if not shown.final and shown.view is rest:
            preview = shown.seconds + time.perf_counter() - start
        elif shown.final and shown.view is rest:
            seconds.append(shown.seconds + time.perf_counter() - start)
            when = "none" if preview is None else f"shown at {preview:.3f} s"
            print(f"at rest: preview {when}, full frame rendered and composed at {shown.seconds:.3f} s, encoded at "
                  f"{seconds[-1]:.3f} s", flush=True)
            done.set()

    loop = RenderLoop(scene, show)
    try:
        for rest in rests:
            for view in moves:
                if not view.same(rest):  # the loop drops a view equal to the one it has: rest must come anew
                    loop.submit(view)
                    time.sleep(0.1)
            done.clear()
            preview = None
            loop.submit(rest)
            if not done.wait(60):  # the render thread died, or dropped the view
                raise RuntimeError("no full frame of a rest view within 60 s")
    finally:
        loop.close()
    return seconds


def training_cost(args: argparse.Namespace, path: list[View]) -> tuple[float, float, int]:
    """(rays/s without renders, rays/s with the --viewer hook and a loop rendering a moving camera, frames)."""
    dataset = ensure_city(args.preset, args.work)
    masks = ensure_partition(dataset, args.work, (2, 2))
    trainer = Trainer(config_from_argv(cell_args(dataset, masks, args.work, 0, "exp-viewer")
                                       + ["--train_iterations", "10000000"] + args.extra.split()))
    stream = trainer.prepare_data()
    copied = FieldCopy(trainer.field)
    scene = Scene(copied.field, trainer.bounds, trainer.render_config, default_chunk(trainer.device),
                  len(trainer.dataset.images), prepare=copied.refresh)
    cuda = torch.cuda.Stream(trainer.device) if trainer.device.type == "cuda" else None
    loop = RenderLoop(scene, lambda image, shown: encode(image, shown.final), share=SHARE, stream=cuda)
    elapsed, rays = {False: 0.0, True: 0.0}, {False: 0, True: 0}
    moving_camera = threading.Event()

    def camera() -> None:  # a browser whose camera never rests: a new view at 30 Hz while watched
        for i in itertools.count():
            moving_camera.wait()
            loop.submit(path[i % len(path)])
            time.sleep(1 / 30)

    threading.Thread(target=camera, daemon=True).start()
    for _ in range(3):  # warm-up steps (kernels compiled, data streaming)
        trainer.train_step(stream)
    watched = False
    while min(elapsed.values()) < args.train_seconds / 2:
        (moving_camera.set if watched else moving_camera.clear)()
        sync()
        start = time.perf_counter()
        while time.perf_counter() - start < args.block_seconds:
            trainer.train_step(stream)
            copied.on_step(trainer.step)
            rays[watched] += trainer.config.batch_size
        sync()
        elapsed[watched] += time.perf_counter() - start
        watched = not watched
    moving_camera.clear()
    loop.close()
    return rays[False] / elapsed[False], rays[True] / elapsed[True], loop.frames


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("bench-work"))
    p.add_argument("--preset", default="city")
    p.add_argument("--container_path", type=Path, default=None, help="default: WORK/merged.pt")
    p.add_argument("--moving_size", type=int, nargs=2, default=[960, 540])
    p.add_argument("--rest_size", type=int, nargs=2, default=[1920, 1080])
    p.add_argument("--frames", type=int, default=30, help="moving frames timed")
    p.add_argument("--preview_samples", type=float, default=PREVIEW_SAMPLES, help="as mega-nerf-view's")
    p.add_argument("--loop_seconds", type=float, default=10, help="the render loop timed on a moving camera")
    p.add_argument("--train_seconds", type=float, default=120, help="training timed, half with renders")
    p.add_argument("--block_seconds", type=float, default=10)
    p.add_argument("--profile_rest", action="store_true", help="where a full frame at rest goes (first pose)")
    p.add_argument("--extra", default="", help="further training options (e.g. smoke tests on a CPU)")
    p.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    container, info = load_container(args.container_path or args.work / "merged.pt", device)
    scene = Scene(container, info.bounds, info.render, view_chunk(device), info.n_images,
                  preview_samples=args.preview_samples)
    dataset = ensure_city(args.preset, args.work)
    path = views(dataset, info.altitude_range, args.frames, *args.moving_size)
    fps, full_fps, fit = moving(scene, path, True), moving(scene, path, False), preview_psnr(scene, path[0])
    rests = views(dataset, info.altitude_range, max(args.frames, 3), *args.rest_size)
    loop_fps, preview_pixels = moving_loop(scene, rests, args.loop_seconds)
    rest = at_rest(scene, path[:5], rests[:3])
    if args.profile_rest:
        profile_rest(scene, rests[0])
    print(f"moving {fps:.1f} fps with previews' settings ({full_fps:.1f} with full frames', preview {fit:.1f} dB "
          f"against full); the loop on a moving {args.rest_size} canvas {loop_fps:.1f} fps, previews of "
          f"{preview_pixels:,.0f} pixels; at rest {', '.join(f'{s:.2f}' for s in rest)} s", flush=True)
    del container, scene
    plain, watched, frames = training_cost(args, path)
    (mw, mh), (rw, rh) = args.moving_size, args.rest_size
    rests_s = ", ".join(f"{s:.2f}" for s in rest)
    table = (f"| moving {mw}x{mh} fps, previews ({args.preview_samples:g} of the samples) | full settings | "
             f"preview vs full, dB (first pose) | loop fps, {rw}x{rh} canvas moving (mean preview) | at rest: s to "
             f"a full {rw}x{rh} frame (3 poses) | training rays/s | with --viewer (camera always moving) | cost | "
             f"frames rendered meanwhile |\n|---|---|---|---|---|---|---|---|---|\n"
             f"| {fps:.1f} | {full_fps:.1f} | {fit:.1f} | {loop_fps:.1f} ({preview_pixels:,.0f} px) | {rests_s} | "
             f"{plain:,.0f} | {watched:,.0f} | {100 * (1 - watched / plain):.1f}% | {frames} |")
    append_results(args.results, f"Viewer speed, {args.preset} preset", "python " + " ".join(sys.argv), table)


if __name__ == "__main__":
    main()
