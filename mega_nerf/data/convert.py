"""What the COLMAP and transforms.json converters share: from posed images in any world frame to our layout.

Steps (each a function, so each is testable): choose the up direction (given, or estimated from a plane fit of
the ground under the sparse points or of the camera centres, checked against the cameras' orientations); rotate
the world so that up becomes -x (DRB, docs/DESIGN.md); fit `origin_drb` and `pose_scale_factor` so cameras and
the bulk of the points lie in [-1, 1]; bound `ray_altitude_range` by the points, with a margin; pick every Nth
image for validation; copy or link the images; write metadata, `coordinates.pt`, `points3D.npy`, `config.yaml`
and the whole map from the source world to ours, `dataparser_transforms.json` (data/frames.py), so results can be
taken back there.
"""
from __future__ import annotations

import argparse
import math
import os
import shlex
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import cv2
import numpy as np
import torch
import yaml
from tqdm import tqdm

from mega_nerf.data.dataset import IMAGE_EXTENSIONS, SPLITS, decode_image, write_coordinates
from mega_nerf.data.frames import Similarity, dataset_similarity, write_source_frame
from mega_nerf.errors import UserError
from mega_nerf.io import atomic_folder, atomic_open, atomic_write, check_free_space, save_torch_atomic, write_bgr

UP_AXES = {f"{s}{a}": (1.0 if s == "+" else -1.0) * np.eye(3)[i] for i, a in enumerate("xyz") for s in "+-"}
PLANAR_RATIO = 0.1  # smallest / middle eigenvalue of the covariance below which a set of positions is a plane
MAX_PLANE_ANGLE = 60.0  # degrees between a plane normal and the cameras' rough up for the fit to be trusted
POINT_PERCENTILES = (1.0, 99.0)  # the "bulk" of the sparse points, per axis
ALTITUDE_MARGIN = 0.05  # fraction of the slab's height added above and below it
GROUND_PERCENTILE = 30.0  # the lowest points along up taken as ground for the up fit
GROUND_ITERATIONS = 4  # refits of the ground along the new up (each reselects the lowest points)
# focal length over the image's larger side: 0.01 is a 178-degree field of view, wider than any pinhole lens (the
# widest rectilinear ones see about 120 degrees, 0.3); 1e5 is 2 arcseconds, 50 times narrower than a satellite tile
FOCAL_RANGE = (1e-2, 1e5)
# how far outside the image the principal point may lie, in image sizes: a tile cropped from the side of a larger
# photo keeps the photo's principal point, so it may lie off the tile; a whole image size off is a wrong value
PRINCIPAL_MARGIN = 1.0


@dataclass
class SceneInput:
    """Posed images and sparse points in the source's own world frame, before conversion."""

    names: list[str]  # output file stems, unique
    image_paths: list[Path]
    c2w: np.ndarray  # (N, 3, 4) float64: camera right, up, back axes and centre (NeRF camera), source world
    intrinsics: np.ndarray  # (N, 4) fx, fy, cx, cy in pixels (pixel centres at +0.5)
    sizes: np.ndarray  # (N, 2) W, H
    distortion: list[np.ndarray | None]  # OpenCV coefficients [k1, k2, p1, p2(, k3)] per image
    points: np.ndarray  # (P, 3) float64 sparse points, source world (P may be 0)
    colors: np.ndarray  # (P, 3) uint8
    source: str = "unknown"  # the poses' origin, recorded in dataparser_transforms.json: colmap, transforms.json
    file: str = "the input"  # the model folder or file read, named in messages


@dataclass
class Conversion:
    """How the source world maps to the normalised DRB frame, and the converted poses."""

    up: np.ndarray  # (3,) unit up direction in the source world
    up_reason: str
    rotation: np.ndarray  # (3, 3) source world -> DRB (proper rotation, up -> -x)
    origin_drb: np.ndarray  # (3,)
    pose_scale_factor: float
    altitude_range: tuple[float, float] | None  # real-world DRB down-coordinates [top, ground]
    c2w: np.ndarray  # (N, 3, 4) float64 normalised DRB
    points: np.ndarray  # (P, 3) float64 normalised DRB
    splits: list[str]  # per image, 'train' or 'val'

    @property
    def to_normalised(self) -> Similarity:
        """The map from the source world to normalised DRB (saved as dataparser_transforms.json)."""
        return dataset_similarity(self.rotation, self.origin_drb, self.pose_scale_factor)


def unique_stems(relative_paths: list[str]) -> list[str]:
    """Output stems: the file names' stems, or the whole relative path joined by '_' where stems collide."""
    stems = [PurePosixPath(p).stem for p in relative_paths]
    if len(set(stems)) < len(stems):
        stems = ["_".join(q for q in PurePosixPath(p).with_suffix("").parts if q not in (".", ".."))
                 for p in relative_paths]
    seen: set[str] = set()
    for p, s in zip(relative_paths, stems, strict=True):
        if s in seen:
            raise UserError(f"{p}: two images map to the same output name '{s}'")
        seen.add(s)
    return stems


def keep_existing_images(paths: list[Path], source: str, allow_missing: bool) -> np.ndarray:
    """(N,) bool mask of images found on disk; a one-line error unless `allow_missing`, and when none is."""
    found = np.array([p.is_file() for p in paths], dtype=bool)
    missing = int((~found).sum())
    if missing and not allow_missing:
        first = paths[int(np.argmin(found))]
        raise UserError(f"{missing} of {len(paths)} images listed in {source} are missing on disk "
                        f"(first: {first}); pass --allow_missing_images to convert the others")
    if missing == len(paths):
        raise UserError(f"{source}: none of its {len(paths)} images is there (first: {paths[0]})")
    if missing:
        print(f"skipping {missing} of {len(paths)} images missing on disk")
    return found


def check_intrinsics(size: tuple[float, float], K: np.ndarray, where: str) -> None:
    """A UserError naming `where` unless the size (W, H) is positive whole pixels, the focal lengths of K (fx, fy,
    cx, cy) are finite and within FOCAL_RANGE of the larger side, and the principal point lies within
    PRINCIPAL_MARGIN image sizes of the image."""
    W, H = size
    if not (W > 0 and H > 0 and float(W).is_integer() and float(H).is_integer()):
        raise UserError(f"{where}: image size {W}x{H} must be positive whole pixels")
    lo, hi = FOCAL_RANGE[0] * max(W, H), FOCAL_RANGE[1] * max(W, H)
    for name, f in (("fx", float(K[0])), ("fy", float(K[1]))):
        if not (math.isfinite(f) and f > 0):
            raise UserError(f"{where}: focal length {name} must be positive and finite, got {f!r}")
        if not lo <= f <= hi:
            raise UserError(f"{where}: focal length {name} = {f:.4g} px is implausible for a {W:g}x{H:g} image "
                            f"(allowed: {lo:.4g} to {hi:.4g} px)")
    cx, cy = K[2], K[3]
    m = PRINCIPAL_MARGIN
    if not (math.isfinite(cx) and math.isfinite(cy) and -m * W <= cx <= (1 + m) * W and -m * H <= cy <= (1 + m) * H):
        raise UserError(f"{where}: principal point ({cx:g}, {cy:g}) lies more than {m:g} image size outside the "
                        f"{W:g}x{H:g} image")


def parse_up_axis(text: str) -> np.ndarray | None:
    """'auto' -> None, '+z' / '-y' ... -> unit vector (3,)."""
    if text == "auto":
        return None
    if text not in UP_AXES:
        raise UserError(f"--up_axis must be auto or one of {', '.join(UP_AXES)}, got '{text}'")
    return UP_AXES[text].copy()


def _angle(a: np.ndarray, b: np.ndarray) -> float:
    cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    return math.degrees(math.acos(max(-1.0, min(1.0, cos))))


def plane_normal(positions: np.ndarray) -> np.ndarray | None:
    """Unit normal (3,) of the best-fit plane of positions (M, 3), or None when they do not form a plane
    (too few, a line, or a blob)."""
    if len(positions) < 4:
        return None
    eigval, eigvec = np.linalg.eigh(np.cov(positions.T))  # ascending
    if eigval[1] <= 0 or eigval[0] > PLANAR_RATIO * eigval[1]:
        return None
    return eigvec[:, 0]


def _bulk(points: np.ndarray) -> np.ndarray:
    """Points within the per-axis percentiles POINT_PERCENTILES, dropping far-off outliers."""
    if len(points) == 0:
        return points
    lo, hi = np.percentile(points, POINT_PERCENTILES, axis=0)
    return points[((points >= lo) & (points <= hi)).all(1)]


def rough_up(c2w: np.ndarray) -> tuple[np.ndarray, str]:
    """The cameras' own idea of up (3,), assuming they look down or level, without roll.

    Each camera's up + back axes point upwards whatever its pitch (level: up; nadir: back), so their mean
    gives the sign; its direction is biased unless yaws vary. When they do, the one direction orthogonal
    to every camera's right axis (no roll) is up.
    """
    votes = (c2w[:, :, 1] + c2w[:, :, 2]).mean(0)
    if np.linalg.norm(votes) < 0.2:
        raise UserError("cannot estimate the up axis: camera orientations disagree; pass --up_axis")
    rights = c2w[:, :, 0]
    eigval, eigvec = np.linalg.eigh(rights.T @ rights)  # ascending
    if eigval[0] < PLANAR_RATIO * eigval[1]:
        return eigvec[:, 0] * np.sign(eigvec[:, 0] @ votes), "orthogonal to the cameras' right axes"
    return votes / np.linalg.norm(votes), "mean of the cameras' up + back axes (rough: yaws do not vary)"


def ground_normal(points: np.ndarray, up: np.ndarray) -> np.ndarray | None:
    """Unit normal (3,), on up's side, of a plane fit to the ground: the lowest GROUND_PERCENTILE of the points
    (P, 3) along `up`, refitted GROUND_ITERATIONS times along the new normal; None when they form no plane.
    Roofs and treetops lie above the ground, so the lowest points are ground wherever the ground is flat."""
    for _ in range(GROUND_ITERATIONS):
        height = points @ up
        normal = plane_normal(points[height <= np.percentile(height, GROUND_PERCENTILE)])
        if normal is None:
            return None
        up = normal if normal @ up >= 0 else -normal
    return up


def estimate_up(c2w: np.ndarray, points: np.ndarray) -> tuple[np.ndarray, str]:
    """Up direction (3,) in the source world and why it was chosen.

    The ground under the sparse points is the best reference (a survey's cameras may fly at varying altitude);
    without points, a plane fit of the camera centres (aerial grids). A fit is used when within MAX_PLANE_ANGLE
    of the cameras' rough up (which rejects, say, a facade); the rough up gives the normal's sign (cameras look
    down or level, not at the sky) and is the answer when no fit agrees.
    """
    rough, rough_reason = rough_up(c2w)
    bulk = _bulk(points)
    fits = [(f"plane fit of the lowest {GROUND_PERCENTILE:.0f}% of {len(bulk)} sparse points (the ground)",
             ground_normal(bulk, rough) if len(bulk) >= 4 else None),
            (f"plane fit of {len(c2w)} camera centres", plane_normal(c2w[:, :, 3]))]
    for what, normal in fits:
        if normal is not None:
            normal = normal if normal @ rough >= 0 else -normal
            angle = _angle(normal, rough)
            if angle < MAX_PLANE_ANGLE:
                return normal, f"{what}, {angle:.0f} deg from the cameras' up"
    return rough, f"{rough_reason}; no plane fit agreed"


def describe_up(up: np.ndarray) -> str:
    """'(0.010, -1.000, 0.020), tilted 1.30 deg from -y', with a hint when an estimate is close to an axis."""
    name, axis = min(UP_AXES.items(), key=lambda kv: _angle(up, kv[1]))
    angle = _angle(up, axis)
    hint = f"; if the world's up is exactly {name}, pass --up_axis {name}" if 0.01 < angle < 5 else ""
    return f"({up[0]:.3f}, {up[1]:.3f}, {up[2]:.3f}), tilted {angle:.2f} deg from {name}{hint}"


def drb_rotation(up: np.ndarray) -> np.ndarray:
    """Proper rotation (3, 3) taking `up` to -x. The world axis least aligned with up, made horizontal,
    becomes +y (right), so a given axis-aligned up yields a signed permutation of the source axes."""
    down = -up / np.linalg.norm(up)
    axis = np.eye(3)[int(np.argmin(np.abs(down)))]
    right = axis - (axis @ down) * down
    right /= np.linalg.norm(right)
    return np.stack([down, right, np.cross(down, right)])


def fit_normalisation(centres: np.ndarray, points: np.ndarray) -> tuple[np.ndarray, float]:
    """origin (3,) and scale so cameras (N, 3) and the bulk of points (P, 3), DRB, fit in [-1, 1]."""
    spread = np.abs(centres - centres.mean(0)).max()
    if len(centres) < 2 or spread <= 1e-9 * max(1.0, np.abs(centres).max()):
        where = ", ".join(f"{v:.4g}" for v in centres[0])
        raise UserError(f"degenerate scene: all {len(centres)} cameras lie at one point ({where})")
    box = np.concatenate([centres, _bulk(points)])
    lo, hi = box.min(0), box.max(0)
    return (lo + hi) / 2, float((hi - lo).max() / 2)


def estimate_altitude_range(points: np.ndarray) -> tuple[float, float] | None:
    """[top, ground] in real DRB down-coordinates: the bulk of the points' altitudes (POINT_PERCENTILES, from
    the tallest roofs to the lowest ground) widened by ALTITUDE_MARGIN of its height each way; None without
    points. Cameras may fly above it: rays are clipped to the slab, and the space above the scene holds nothing."""
    if len(points) < 10:
        return None
    top, ground = (float(v) for v in np.percentile(points[:, 0], POINT_PERCENTILES))
    margin = ALTITUDE_MARGIN * max(ground - top, 1e-9)
    return top - margin, ground + margin


def val_splits(stems: list[str], val_every: int) -> list[str]:
    """'val' for every `val_every`-th image in name order (starting with the first), 'train' otherwise."""
    if val_every < 2:
        raise UserError(f"--val_every must be at least 2, got {val_every}")
    order = {s: i for i, s in enumerate(sorted(stems))}
    return ["val" if order[s] % val_every == 0 else "train" for s in stems]


def convert_poses(scene: SceneInput, up: np.ndarray | None, val_every: int) -> Conversion:
    """Rotate to DRB, normalise, estimate the altitude slab and choose splits; writes nothing."""
    if up is None:
        up, reason = estimate_up(scene.c2w, scene.points)
    else:
        reason = "given by --up_axis"
    rotation = drb_rotation(up)
    rot = np.einsum("ij,njk->nik", rotation, scene.c2w[:, :, :3])
    centres = scene.c2w[:, :, 3] @ rotation.T
    points = scene.points @ rotation.T
    # the readers refuse non-finite poses and points, but finite ones near the float limit still overflow here:
    # refused below in one line, without numpy's overflow warnings before it
    with np.errstate(over="ignore", invalid="ignore"):
        origin, scale = fit_normalisation(centres, points)
        altitude_range = estimate_altitude_range(points)
    if not np.isfinite([*origin, scale, *(altitude_range or ())]).all():
        raise UserError(f"{scene.file}: the poses and points give a non-finite scale or altitude range "
                        "(coordinates too large?)")
    c2w = np.concatenate([rot, ((centres - origin) / scale)[:, :, None]], axis=2)
    return Conversion(up=up / np.linalg.norm(up), up_reason=reason, rotation=rotation, origin_drb=origin,
                      pose_scale_factor=scale, altitude_range=altitude_range,
                      c2w=c2w, points=(points - origin) / scale, splits=val_splits(scene.names, val_every))


def _place_image(src: Path, dst_stem: Path, size: tuple[int, int], K: np.ndarray, dist: np.ndarray | None,
                 link: bool) -> None:
    """Check that `src` decodes whole at `size` (W, H), then copy, link, re-encode (formats the layout does not
    read) or undistort it (when `dist` is given)."""
    img = decode_image(src)
    if (img.shape[1], img.shape[0]) != size:
        raise UserError(f"{src}: image is {img.shape[1]}x{img.shape[0]} but its camera says {size[0]}x{size[1]}")
    if dist is None and src.suffix in IMAGE_EXTENSIONS:
        dst = dst_stem.with_suffix(src.suffix)
        if link:
            os.symlink(src.resolve(), dst)
        else:
            atomic_write(dst, src.read_bytes())
        return
    if dist is not None:
        img = cv2.undistort(img, K, dist)
    dst = dst_stem.with_suffix(src.suffix if src.suffix in IMAGE_EXTENSIONS else ".png")
    quality = [cv2.IMWRITE_JPEG_QUALITY, 95] if dst.suffix.lower() in (".jpg", ".jpeg") else []
    write_bgr(dst, img, quality)


def _check_output(scene: SceneInput, output: Path, link_images: bool) -> None:
    """Refuse an output that holds anything, and a disk that cannot hold the images."""
    if any((output / p).exists() for p in (*SPLITS, "coordinates.pt")):
        raise UserError(f"{output}: already holds a dataset; choose another --output")
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise UserError(f"{output}: exists and is not an empty folder; choose another --output")
    if not link_images:
        check_free_space(output, sum(p.stat().st_size for p in scene.image_paths))


def write_dataset(scene: SceneInput, conv: Conversion, output: Path, undistort: bool = False,
                  link_images: bool = False) -> None:
    """Write images, metadata, coordinates.pt, points3D.npy (+ points3D_rgb.npy) and config.yaml into a temp
    folder renamed to `output` at the end (io.atomic_folder): a killed or failed conversion leaves no dataset,
    and the same command then runs again from the start."""
    _check_output(scene, output, link_images)
    with atomic_folder(output) as folder:
        for split in SPLITS:
            (folder / split / "rgbs").mkdir(parents=True)
            (folder / split / "metadata").mkdir(parents=True)
        for i in tqdm(range(len(scene.names)), desc="images", leave=False):
            split, name = conv.splits[i], scene.names[i]
            fx, fy, cx, cy = scene.intrinsics[i]
            dist = scene.distortion[i]
            K = np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1]])
            size = (int(scene.sizes[i, 0]), int(scene.sizes[i, 1]))
            _place_image(scene.image_paths[i], folder / split / "rgbs" / name, size, K,
                         dist if undistort else None, link_images)
            meta = {"W": size[0], "H": size[1],
                    "intrinsics": torch.tensor(scene.intrinsics[i], dtype=torch.float32),
                    "c2w": torch.tensor(conv.c2w[i], dtype=torch.float32)}
            if dist is not None and not undistort:
                meta["distortion"] = torch.tensor(dist, dtype=torch.float32)
            save_torch_atomic(meta, folder / split / "metadata" / f"{name}.pt")
        write_coordinates(folder, torch.tensor(conv.origin_drb), conv.pose_scale_factor)
        write_source_frame(folder, conv.to_normalised, conv.pose_scale_factor, conv.origin_drb, conv.up,
                           scene.source)
        for file, array in (("points3D.npy", conv.points.astype(np.float32)),
                            ("points3D_rgb.npy", scene.colors.astype(np.uint8))):
            with atomic_open(folder / file, array.nbytes) as f:
                np.save(f, array)
        config: dict[str, object] = {"dataset_path": str(output.resolve())}
        if conv.altitude_range is not None:
            config["ray_altitude_range"] = [round(v, 6) for v in conv.altitude_range]
        atomic_write(folder / "config.yaml", yaml.safe_dump(config, sort_keys=False).encode())


def summary(scene: SceneInput, conv: Conversion, output: Path) -> list[str]:
    """Lines telling the user what was written and what was assumed."""
    n_val = conv.splits.count("val")
    n_dist = sum(d is not None for d in scene.distortion)
    lines = [f"up axis: {describe_up(conv.up)} ({conv.up_reason})",
             f"images: {len(scene.names) - n_val} train, {n_val} val; {n_dist} with lens distortion",
             f"origin_drb: {np.array2string(conv.origin_drb, precision=4)}, "
             f"pose_scale_factor: {conv.pose_scale_factor:.6g}",
             f"sparse points: {len(scene.points)}"]
    if conv.altitude_range is None:
        lines.append("warning: ray_altitude_range not estimated (no sparse points): add [top, ground] in real "
                     "down-coordinates to config.yaml by hand; without it rays are not clipped to the scene")
    else:
        top, ground = conv.altitude_range
        lines.append(f"ray_altitude_range: [{top:.4g}, {ground:.4g}] (real down-coordinates, top < ground; the "
                     f"sparse points' altitudes {100 * ALTITUDE_MARGIN:.0f}% wider each way)")
        below = int((conv.c2w[:, 0, 3] * conv.pose_scale_factor + conv.origin_drb[0] > ground).sum())
        if below:
            lines.append(f"warning: {below} cameras lie below the estimated ground: is the up axis right?")
    lines.append(f"wrote {output}; check it with: python scripts/preview_dataset.py {shlex.quote(str(output))}")
    return lines


def convert(scene: SceneInput, output: str | os.PathLike, up_axis: str = "auto", val_every: int = 8,
            undistort: bool = False, link_images: bool = False) -> Conversion:
    """Convert and write a scene, printing a summary."""
    conv = convert_poses(scene, parse_up_axis(up_axis), val_every)
    write_dataset(scene, conv, Path(output), undistort, link_images)
    print("\n".join(summary(scene, conv, Path(output))))
    return conv


def add_conversion_options(parser: argparse.ArgumentParser) -> None:
    """Options both converters share."""
    parser.add_argument("--output", required=True, help="dataset folder to write (must not hold a dataset)")
    parser.add_argument("--up_axis", default="auto", choices=["auto", *UP_AXES],
                        help="the source world's up direction (default: estimated, and printed)")
    parser.add_argument("--val_every", type=int, default=8, help="every Nth image (by name) goes to val")
    parser.add_argument("--undistort", action="store_true",
                        help="write undistorted images instead of storing the distortion coefficients")
    parser.add_argument("--link_images", action="store_true", help="symlink images instead of copying")
    parser.add_argument("--allow_missing_images", action="store_true",
                        help="convert the images found on disk when some are missing")


def conversion_options(args: argparse.Namespace) -> dict[str, object]:
    """The shared options as keyword arguments of `convert_colmap` / `convert_transforms`."""
    return {k: getattr(args, k) for k in ("up_axis", "val_every", "undistort", "link_images",
                                          "allow_missing_images")}
