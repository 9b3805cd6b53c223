"""Camera paths for new views, rendered through a container to PNG frames and an H.264 MP4 (video.py).

A path is either key poses from a text file, interpolated (centres linearly, rotations by spherical linear
interpolation, intrinsics linearly), or, without a file, an orbit over the scene: a circle at the cameras' mean
altitude around the centre of their horizontal extent, with a radius of their mean horizontal distance from it,
always looking at the scene centre on the ground (the ground plane of the altitude range; without one, 45
degrees down).

The pose file format is POSE_FILE_FORMAT below (also printed by scripts/render_images.py --help). A path may
also be a nerfstudio camera_path.json (nerfstudio.py), rendered frame by frame; every rendering writes its frames
as `<output>/camera_path.json` too, in the same world such a file is read in (`path_frame`).
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mega_nerf.allocator import keep_freed_blocks
from mega_nerf.data.dataset import Dataset, check_not_in_dataset, rotation_problem
from mega_nerf.data.frames import Similarity, load_source_frame, read_similarity, to_source_map
from mega_nerf.errors import Interrupted, UserError
from mega_nerf.evaluation.evaluate import load_checked_dataset
from mega_nerf.imaging import render_image, to_uint8
from mega_nerf.io import (
    atomic_path,
    atomic_write,
    check_free_space,
    memory_shortfall,
    remove_temp_files,
    write_png,
)
from mega_nerf.merging.container import Container, ContainerInfo, load_container
from mega_nerf.nerfstudio import read_camera_path, write_camera_path
from mega_nerf.render import default_chunk
from mega_nerf.video import MAX_SIDE, fps_problem, mp4_writer, size_problem, video_problem

POSE_FILE_FORMAT = """\
pose file (--path): one key pose per line; blank lines and lines starting with # are ignored. A line holds
    r00 r01 r02 t0  r10 r11 r12 t1  r20 r21 r22 t2  [fx fy cx cy W H]  [appearance]
that is 12, 13, 18 or 19 finite numbers: the 3x4 camera-to-world matrix row by row, in the dataset's normalised
DRB frame (x down, y right, z back; columns = the camera's right, up and back axes and its centre, as in the
dataset's metadata/*.pt), then optionally the intrinsics in pixels and the image size (whole numbers, the same
on every line: one video has one frame size), then optionally an appearance index (a dataset image, train and
val counted together sorted by name, whose appearance embedding to use). Give intrinsics on every line or on
none; without them the dataset's first image's are used. Without an appearance index a frame uses that of the
dataset camera nearest its centre. Frames are spread evenly over the key poses (first and last included):
centres and intrinsics linearly, rotations by spherical linear interpolation. Without --path the camera orbits
the scene.

A --path ending in .json is a nerfstudio camera_path.json of perspective cameras: its frames are rendered as
they are (--frames is not used), in the world of --dataparser_transforms (nerfstudio's, from its training run)
when given, else in the dataset's source world (COLMAP / transforms.json, from the dataset's
dataparser_transforms.json) when it has one, else in the normalised DRB frame. <output>/camera_path.json is
written in that same world.

A rerun into the same --output replaces the earlier rendering there: its frames (<00000>.png names only), video
and camera_path.json are removed once every check has passed, before the first frame is rendered."""
WORLD_UP = np.array([-1.0, 0.0, 0.0])  # altitude grows with -x (DRB)
LINE_LENGTHS = (12, 13, 18, 19)


@dataclass
class Pose:
    """One camera of a path. intrinsics/size/appearance None: filled in later from the dataset."""

    c2w: np.ndarray  # (3, 4) float64
    intrinsics: np.ndarray | None = None  # (4,) fx, fy, cx, cy
    size: tuple[int, int] | None = None  # (W, H)
    appearance: int | None = None


def read_pose_file(path: Path, n_images: int) -> list[Pose]:
    """Key poses of a pose file (format in the module docstring); one-line errors naming file and line."""
    if not path.is_file():
        raise UserError(f"{path}: pose file not found")
    try:
        text_lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not a text pose file (byte {e.start} is not UTF-8)") from None
    poses, first_line = [], 0
    for number, line in enumerate(text_lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        try:
            values = [float(v) for v in text.split()]
        except ValueError:
            raise UserError(f"{path}:{number}: not a list of numbers") from None
        if len(values) not in LINE_LENGTHS:
            raise UserError(f"{path}:{number}: expected 12, 13, 18 or 19 numbers (c2w row by row, "
                            f"[fx fy cx cy W H], [appearance]), got {len(values)}")
        bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
        if bad is not None:
            raise UserError(f"{path}:{number}: number {bad + 1} is {text.split()[bad]}, not a finite number")
        c2w = np.array(values[:12]).reshape(3, 4)
        if rotation_problem(c2w[:, :3]) is not None:
            raise UserError(f"{path}:{number}: the rotation part of c2w is not a rotation")
        pose = Pose(c2w)
        if len(values) >= 18:
            pose.intrinsics, pose.size = np.array(values[12:16]), (int(values[16]), int(values[17]))
            if min(pose.size) < 1 or min(pose.intrinsics[:2]) <= 0:
                raise UserError(f"{path}:{number}: focal lengths and image size must be positive")
            if pose.size != (values[16], values[17]):
                raise UserError(f"{path}:{number}: image size W H must be whole numbers of pixels, got "
                                f"{values[16]:g} {values[17]:g}")
            if poses and poses[0].size is not None and pose.size != poses[0].size:
                raise UserError(f"{path}:{number}: image size {pose.size[0]}x{pose.size[1]} differs from line "
                                f"{first_line}'s {poses[0].size[0]}x{poses[0].size[1]}; one video has one frame size")
        if len(values) in (13, 19):
            pose.appearance = int(values[-1])
            if values[-1] != pose.appearance or not 0 <= pose.appearance < n_images:
                raise UserError(f"{path}:{number}: appearance index {values[-1]:g} is not an image index "
                                f"(0 to {n_images - 1})")
        first_line = first_line or number
        poses.append(pose)
    if not poses:
        raise UserError(f"{path}: holds no pose")
    if len({p.intrinsics is None for p in poses}) > 1:
        raise UserError(f"{path}: give intrinsics (fx fy cx cy W H) on every line or on none")
    return poses


def write_pose_file(path: Path, poses: list[Pose]) -> None:
    """Complete poses (intrinsics, size and appearance set) as a pose file of 19 numbers a line (the format in
    the module docstring), written atomically; read back by read_pose_file."""
    lines = ["# key poses: c2w row by row (normalised DRB), fx fy cx cy W H, appearance (camera_path.py)"]
    for pose in poses:
        values = [*pose.c2w.reshape(-1), *pose.intrinsics, *pose.size]
        lines.append(" ".join(f"{v:.17g}" for v in values) + f" {pose.appearance}")
    atomic_write(path, ("\n".join(lines) + "\n").encode())


def interpolate(keys: list[Pose], frames: int) -> list[Pose]:
    """`frames` poses spread evenly over the key poses, first and last included. Centres and intrinsics
    linearly, rotations by slerp; each frame keeps the appearance index of the nearest key."""
    # Imported here: scipy takes a fifth of a second, which only interpolated paths need.
    from scipy.spatial.transform import Rotation, Slerp

    if len(keys) == 1:
        return [replace(keys[0]) for _ in range(frames)]
    s = np.linspace(0.0, len(keys) - 1, frames)
    i = np.minimum(np.floor(s).astype(int), len(keys) - 2)
    t = (s - i)[:, None]
    rotations = Slerp(np.arange(len(keys)), Rotation.from_matrix([k.c2w[:, :3] for k in keys]))(s).as_matrix()
    centres = np.stack([k.c2w[:, 3] for k in keys])
    out = []
    for f in range(frames):
        a, b = keys[i[f]], keys[i[f] + 1]
        centre = (1 - t[f]) * centres[i[f]] + t[f] * centres[i[f] + 1]
        intrinsics = None if a.intrinsics is None else (1 - t[f]) * a.intrinsics + t[f] * b.intrinsics
        nearest = keys[int(round(s[f]))]
        out.append(Pose(np.concatenate([rotations[f], centre[:, None]], 1), intrinsics, a.size,
                        nearest.appearance))
    return out


def look_at(position: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(3, 3) rotation, columns right, up, back, of a camera at `position` looking at `target`, no roll."""
    forward = (target - position) / np.linalg.norm(target - position)
    right = np.cross(forward, WORLD_UP)
    right /= np.linalg.norm(right)
    return np.stack([right, np.cross(right, forward), -forward], 1)


def orbit(dataset: Dataset, frames: int, altitude_range: tuple[float, float] | None) -> list[Pose]:
    """A circle over the scene (see the module docstring), `frames` poses, not repeating the first."""
    positions = camera_centres(dataset)
    centre = (positions.min(0) + positions.max(0)) / 2
    radius = max(float(np.linalg.norm(positions[:, 1:] - centre[1:], axis=1).mean()), 1e-3)
    altitude = float(positions[:, 0].mean())
    ground = altitude_range[1] if altitude_range is not None else altitude + radius
    target = np.array([max(ground, altitude + 1e-3), centre[1], centre[2]])
    poses = []
    for angle in np.linspace(0, 2 * np.pi, frames, endpoint=False):
        position = np.array([altitude, centre[1] + radius * np.cos(angle), centre[2] + radius * np.sin(angle)])
        poses.append(Pose(np.concatenate([look_at(position, target), position[:, None]], 1)))
    return poses


def camera_centres(dataset: Dataset) -> np.ndarray:
    """(I, 3) float64 centres of every dataset image, train and val, in appearance-index order."""
    return torch.stack([m.c2w[:, 3] for m in dataset.images]).double().numpy()


def nearest_image(centres: np.ndarray, centre: np.ndarray) -> int:
    """The index of the camera among centres (I, 3) nearest to `centre` (3,): the appearance a new view uses."""
    return int(np.argmin(np.linalg.norm(centres - centre, axis=1)))


def complete(poses: list[Pose], dataset: Dataset, height: int | None) -> list[Pose]:
    """Fill in missing intrinsics (the dataset's first image's) and appearance (the nearest camera's), and
    scale every frame to `height` pixels (None: keep). All frames must share one size (one video)."""
    first = dataset.images[0]
    cameras = camera_centres(dataset)
    out = []
    for pose in poses:
        intrinsics = first.intrinsics.double().numpy() if pose.intrinsics is None else pose.intrinsics
        W, H = (first.W, first.H) if pose.size is None else pose.size
        scale = 1.0 if height is None else height / H
        appearance = pose.appearance
        if appearance is None:
            appearance = nearest_image(cameras, pose.c2w[:, 3])
        out.append(Pose(pose.c2w, intrinsics * scale, (round(W * scale), round(H * scale)), appearance))
    sizes = {p.size for p in out}
    if len(sizes) > 1:
        raise UserError(f"the poses have several image sizes {sorted(sizes)}; one video needs one (use --height "
                        "or give every pose the same W H)")
    return out


def render_frame(container: Container, info: ContainerInfo, pose: Pose, chunk: int) -> np.ndarray:
    """(H, W, 3) uint8 RGB of one completed pose."""
    W, H = pose.size
    out = render_image(container, torch.as_tensor(pose.c2w, dtype=torch.float32),
                       torch.as_tensor(pose.intrinsics, dtype=torch.float32), W, H, pose.appearance, info.bounds,
                       info.render, chunk)
    return to_uint8(out["rgb"])


def path_frame(dataset_path: str, dataparser_transforms: str | None) -> Similarity | None:
    """The map from the world camera path files are in to ours (None: they are in ours): nerfstudio's world
    when its dataparser_transforms.json is given, else the dataset's source world when it has one."""
    if dataparser_transforms is not None:
        from_source = to_source_map(dataset_path, "--dataparser_transforms").inverse()
        return read_similarity(dataparser_transforms).inverse().then(from_source)
    return load_source_frame(dataset_path)


def path_poses(config: PathConfig, dataset: Dataset, altitude_range: tuple[float, float] | None,
               to_ours: Similarity | None) -> list[Pose]:
    """The poses to render: a nerfstudio camera path's frames, a pose file interpolated, or an orbit."""
    if config.path is not None and config.path.endswith(".json"):
        poses = [Pose(c2w, K, size) for c2w, K, size in read_camera_path(Path(config.path), to_ours)]
        print(f"{config.path}: {len(poses)} frames, as the camera path has them (--frames is for pose files and "
              "orbits)")
        return poses
    if config.path is not None:
        return interpolate(read_pose_file(Path(config.path), len(dataset.images)), config.frames)
    return orbit(dataset, config.frames, altitude_range)


@dataclass(frozen=True)
class PathConfig:
    """One camera-path rendering, as `mega-nerf-render` was asked for it (built in cli/render)."""

    container_path: str
    dataset_path: str
    output: str  # folder for frames/<00000>.png and video.mp4
    path: str | None = None  # pose file (POSE_FILE_FORMAT) or nerfstudio camera_path.json; None: an orbit
    dataparser_transforms: str | None = None  # nerfstudio's, when a camera_path.json is in nerfstudio's world
    frames: int = 120
    height: int | None = None  # frame height in pixels; None: the poses'
    fps: float = 30.0
    train_scale_factor: int = 1  # the scale the submodules were trained at (checks the container's dataset)
    ray_chunk: int | None = None  # rays rendered at once; None: render.default_chunk for the device
    progress: bool = True


# What a rendering writes into --output besides frames/ (config.yaml: through record_options, by the command)
WRITTEN = ("config.yaml", "camera_path.json", "video.mp4")
FRAME_NAME = re.compile(r"[0-9]{5,}\.png")  # frame_name's: the frames of a rendering, and nothing else
# Bytes a frame's render holds per pixel at its peak, counted from imaging.render_image and to_uint8: pixel,
# column and row indices (int64, 24), directions and their temporaries (36), appearance indices (int64, 8),
# near and far (8), rgb, depth and opacity gathered from the chunks and concatenated (40), the uint8 conversion's
# copies (27): 143, rounded up.
RENDER_BYTES_PER_PIXEL = 160


def frame_name(f: int) -> str:
    """The file name of frame `f` in `<output>/frames/`."""
    return f"{f:05d}.png"


def check_output_folder(config: PathConfig) -> None:
    """One UserError line, before anything is read or written, for an --output that is a dataset or lies inside
    one, or whose files (WRITTEN) would replace an input: `--path X/camera_path.json --output X` would overwrite
    nerfstudio's file with ours, which keeps only the frames' cameras. --config_file is left out: a rerun reads
    the folder's own config.yaml, which it then rewrites with the same options."""
    check_not_in_dataset(config.output)
    inputs = {"--path": config.path, "--container_path": config.container_path,
              "--dataparser_transforms": config.dataparser_transforms}
    for name in WRITTEN:
        target = (Path(config.output) / name).resolve()
        for option, given in inputs.items():
            if given is not None and Path(given).resolve() == target:
                raise UserError(f"--output {config.output}: this rendering's {name} would overwrite {option} "
                                f"{given}; choose another --output")


def check_frame_size(config: PathConfig, size: tuple[int, int], device: torch.device) -> None:
    """One UserError line for frames of `size` (W, H) that the video writer cannot encode (video.size_problem)
    or whose render would not fit in the memory free now (RENDER_BYTES_PER_PIXEL): torch's and ffmpeg's own
    errors come mid-render or after it, naming no option."""
    source = "the dataset's first image"
    if config.height is not None:
        source = f"--height {config.height}"
    elif config.path is not None:
        source = f"--path {config.path}"
    W, H = size
    if (problem := size_problem(size)) is not None:
        raise UserError(f"frames of {W}x{H} ({source}): {problem}")
    if (short := memory_shortfall(device, 0, RENDER_BYTES_PER_PIXEL * W * H)) is not None:
        where, needed, free = short
        raise UserError(f"frames of {W}x{H} ({source}): rendering one needs about {needed / 2 ** 30:,.1f} GiB of "
                        f"{where}, {free / 2 ** 30:,.1f} GiB available; choose a smaller size")


def previous_rendering(output: Path) -> list[Path]:
    """What an earlier rendering would have left in `output`: its video.mp4 and camera_path.json, then its frames
    (by FRAME_NAME), in the order clear_previous_rendering removes them."""
    old = [output / name for name in WRITTEN[1:] if (output / name).is_file()]
    return old + sorted(p for p in (output / "frames").glob("*.png") if FRAME_NAME.fullmatch(p.name))


def check_previous_rendering(output: Path) -> bool:
    """Whether `output` holds an earlier rendering of ours to replace: files of a rendering's names (WRITTEN,
    FRAME_NAME) beside the config.yaml the command saved (record_options refuses another command's). The same
    names without it are another tool's (ffmpeg's numbered frames, nerfstudio's camera path): one UserError line,
    for nothing of theirs is removed."""
    found = previous_rendering(output)
    if found and not (output / "config.yaml").is_file():
        raise UserError(f"--output {output}: holds {found[0].relative_to(output)} and other files of a rendering's "
                        "names that no rendering of ours wrote (no config.yaml); choose another --output")
    return bool(found)


def clear_previous_rendering(output: Path) -> None:
    """Remove an earlier rendering of ours from `output` (previous_rendering; nothing else), said in one line: a
    rerun with fewer frames, or one stopped part-way, then never leaves old frames beside new ones or a video
    and camera path that no longer match them."""
    found = previous_rendering(output)
    for path in found:
        path.unlink()
    frames = sum(p.parent.name == "frames" for p in found)
    removed = ", ".join([*(p.name for p in found if p.parent == output), f"{frames} frames"])
    print(f"{output}: removed the previous rendering ({removed})")


def render_images(config: PathConfig, on_ready: Callable[[], None] | None = None) -> Path:
    """Render the path to `<output>/frames/` and `<output>/video.mp4`, replacing an earlier rendering there
    (`clear_previous_rendering`). Returns the video's path. `on_ready` is called once the container, dataset, path
    and frame size have passed their checks (the command saves its options then)."""
    check_output_folder(config)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    keep_freed_blocks(device)  # each chunk's temporaries, reused (allocator.py)
    chunk = default_chunk(device) if config.ray_chunk is None else config.ray_chunk
    if config.frames < 1 or (config.height is not None and config.height < 1) or chunk < 1:
        raise UserError("--frames, --height and --ray_chunk must be positive")
    if (problem := fps_problem(config.fps)) is not None:
        raise UserError(f"--fps {config.fps:g}: {problem}")
    if config.height is not None and config.height > MAX_SIDE:  # before anything is loaded
        raise UserError(f"--height {config.height}: {size_problem((1, config.height))}")
    container, info = load_container(config.container_path, device)
    dataset = load_checked_dataset(info, config.dataset_path, config.train_scale_factor, 1)
    to_ours = path_frame(config.dataset_path, config.dataparser_transforms)
    poses = complete(path_poses(config, dataset, info.altitude_range, to_ours), dataset, config.height)
    output = Path(config.output)
    check_frame_size(config, poses[0].size, device)
    W, H = poses[0].size
    replace = check_previous_rendering(output)  # before on_ready writes the config.yaml it looks for
    check_free_space(output / "frames", 3 * W * H * len(poses))  # raw pixels: more than PNGs and MP4 take
    if on_ready is not None:
        on_ready()
    remove_temp_files(output)
    remove_temp_files(output / "frames")
    if replace:
        clear_previous_rendering(output)
    video_path = write_frames(output, poses, config, container, info, chunk)
    write_camera_path(output / "camera_path.json", [(p.c2w, p.intrinsics, p.size) for p in poses], config.fps,
                      None if to_ours is None else to_ours.inverse())
    print(f"wrote {len(poses)} frames to {output / 'frames'} and {video_path}")
    return video_path


def write_frames(output: Path, poses: list[Pose], config: PathConfig, container: Container, info: ContainerInfo,
                 chunk: int) -> Path:
    """Render every pose to `<output>/frames/<00000>.png` and, once it holds them all, `<output>/video.mp4`
    (written under a temp name, io.atomic_path). Ctrl-C stops it in one line saying how many frames are there."""
    video_path, done = output / "video.mp4", 0
    try:
        with (atomic_path(video_path, keep_suffix=True, check=lambda tmp: video_problem(tmp, len(poses))) as tmp,
              mp4_writer(tmp, poses[0].size, config.fps) as write_video, torch.no_grad()):
            for f, pose in enumerate(tqdm(poses, desc="render", unit="frame", disable=not config.progress)):
                rgb = render_frame(container, info, pose, chunk)
                write_png(output / "frames" / frame_name(f), rgb)
                write_video(rgb)
                done = f + 1
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted: {output / 'frames'} holds the first {done} of {len(poses)} frames; no "
                          "video.mp4 or camera_path.json was written") from None
    return video_path
