"""Our own reader and writer of COLMAP sparse models (text and binary), and COLMAP's camera models.

A model is a folder with cameras, images and points3D files, all `.txt` or all `.bin` (format described at
colmap.github.io/format.html; binary is little-endian). Poses are world-to-camera, `x_cam = R(qvec) x + tvec`,
in the OpenCV camera (x right, y down, z forward); qvec is (w, x, y, z).
"""
from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.spatial.transform import Rotation

from mega_nerf.data.convert import (
    Conversion,
    SceneInput,
    check_intrinsics,
    convert,
    keep_existing_images,
    unique_stems,
)
from mega_nerf.errors import UserError
from mega_nerf.io import atomic_write

# name -> (model id, number of params); every model COLMAP defines, so any binary file parses
CAMERA_MODELS = {
    "SIMPLE_PINHOLE": (0, 3), "PINHOLE": (1, 4), "SIMPLE_RADIAL": (2, 4), "RADIAL": (3, 5), "OPENCV": (4, 8),
    "OPENCV_FISHEYE": (5, 8), "FULL_OPENCV": (6, 12), "FOV": (7, 5), "SIMPLE_RADIAL_FISHEYE": (8, 4),
    "RADIAL_FISHEYE": (9, 5), "THIN_PRISM_FISHEYE": (10, 12), "RAD_TAN_THIN_PRISM_FISHEYE": (11, 16),
}
MODEL_NAMES = {mid: name for name, (mid, _) in CAMERA_MODELS.items()}
SUPPORTED_MODELS = ("SIMPLE_PINHOLE", "PINHOLE", "SIMPLE_RADIAL", "RADIAL", "OPENCV")
REPROJECTION_WARNING_PX = 4.0
KEYPOINT = np.dtype([("x", "<f8"), ("y", "<f8"), ("point3D_id", "<i8")])


@dataclass
class Camera:
    id: int
    model: str
    width: int
    height: int
    params: np.ndarray  # (num params,) float64, in COLMAP's order for `model`


@dataclass
class Image:
    id: int
    qvec: np.ndarray  # (4,) w, x, y, z of the world-to-camera rotation
    tvec: np.ndarray  # (3,) world-to-camera translation
    camera_id: int
    name: str  # path relative to the images folder
    xys: np.ndarray  # (K, 2) keypoints in pixels
    point3D_ids: np.ndarray  # (K,) int64, -1 where a keypoint has no 3D point


@dataclass
class Points3D:
    ids: np.ndarray  # (P,) int64
    xyz: np.ndarray  # (P, 3) float64
    rgb: np.ndarray  # (P, 3) uint8
    error: np.ndarray  # (P,) float64 mean reprojection error
    tracks: list[np.ndarray]  # P arrays (T, 2) int32: image id, keypoint index


@dataclass
class Model:
    cameras: dict[int, Camera]
    images: dict[int, Image]
    points: Points3D


def qvec_to_rotmat(q: np.ndarray) -> np.ndarray:
    """Unit quaternion (4,) w, x, y, z (Hamilton; normalised here) to a rotation matrix (3, 3)."""
    w, x, y, z = q
    return Rotation.from_quat([x, y, z, w]).as_matrix()


def rotmat_to_qvec(R: np.ndarray) -> np.ndarray:
    """Rotation (3, 3) to a unit quaternion (4,) w, x, y, z with w >= 0."""
    x, y, z, w = Rotation.from_matrix(R).as_quat()
    q = np.array([w, x, y, z])
    return q if w >= 0 else -q


# ---- checks of what the files hold ----

def _check_camera(camera: Camera, where: str) -> Camera:
    """The camera, its params finite and, for a supported model, its intrinsics plausible (check_intrinsics);
    UserError naming `where` otherwise. Unsupported models are named when converted (`camera_params`)."""
    if camera.model in SUPPORTED_MODELS and len(camera.params) == CAMERA_MODELS[camera.model][1]:
        check_intrinsics((camera.width, camera.height), camera_params(camera)[:4], where)
    if not np.isfinite(camera.params).all():  # the distortion terms, or a model we do not convert
        raise UserError(f"{where}: non-finite params {camera.params.tolist()}")
    return camera


def _check_pose(image: Image, where: str) -> Image:
    """The image, its qvec a finite non-zero quaternion and its tvec finite; UserError naming `where` otherwise."""
    if not np.isfinite(image.qvec).all() or not np.linalg.norm(image.qvec) > 1e-12:
        raise UserError(f"{where}: image {image.name}: qvec {image.qvec.tolist()} is not a rotation "
                        "(needs 4 finite numbers, not all zero)")
    if not np.isfinite(image.tvec).all():
        raise UserError(f"{where}: image {image.name}: tvec {image.tvec.tolist()} must be finite")
    return image


def _check_points(xyz: np.ndarray, where: Callable[[int], str]) -> None:
    """A UserError naming the first point (where(k)) of xyz (P, 3) with a non-finite coordinate. COLMAP's mapper
    never writes one, so it means a damaged or hand-edited file: refused rather than dropped, since the rest of
    such a file is as suspect (and one NaN made every percentile, hence the scale and altitude range, NaN)."""
    bad = np.flatnonzero(~np.isfinite(xyz).all(1))
    if len(bad):
        raise UserError(f"{where(int(bad[0]))}: non-finite point coordinates {xyz[bad[0]].tolist()} "
                        f"({len(bad)} such points)")


# ---- text files ----

def _data_lines(file: Path) -> list[tuple[int, list[str]]]:
    """(line number, fields) of every line that is not a comment; blank lines kept (images.txt needs them)."""
    return [(n, line.split()) for n, line in enumerate(file.read_text().splitlines(), 1)
            if not line.startswith("#")]


def _read_cameras_txt(file: Path) -> dict[int, Camera]:
    cameras = {}
    for n, f in _data_lines(file):
        if f:
            try:
                camera = Camera(int(f[0]), f[1], int(f[2]), int(f[3]), np.array(f[4:], float))
            except (ValueError, IndexError):
                raise UserError(f"{file}:{n}: expected 'CAMERA_ID MODEL WIDTH HEIGHT PARAMS...'") from None
            cameras[camera.id] = _check_camera(camera, f"{file}:{n}: camera {camera.id}")
    return cameras


def _read_images_txt(file: Path) -> dict[int, Image]:
    lines, images, k = _data_lines(file), {}, 0
    while k < len(lines):
        n, f = lines[k]
        if not f:  # a blank line where an image header is due: tolerated
            k += 1
            continue
        keypoints = lines[k + 1][1] if k + 1 < len(lines) else []
        try:
            obs = np.array(keypoints, float).reshape(-1, 3)
            image = Image(int(f[0]), np.array(f[1:5], float), np.array(f[5:8], float), int(f[8]),
                          " ".join(f[9:]), obs[:, :2], obs[:, 2].astype(np.int64))
        except (ValueError, IndexError):
            raise UserError(f"{file}:{n}: expected 'IMAGE_ID QW QX QY QZ TX TY TZ CAMERA_ID NAME' "
                            "followed by a line of 'X Y POINT3D_ID' triples") from None
        images[image.id] = _check_pose(image, f"{file}:{n}")
        k += 2
    return images


def _read_points_txt(file: Path) -> Points3D:
    ids, rows, tracks, line_numbers = [], [], [], []
    for n, f in _data_lines(file):
        if f:
            try:
                if len(f) < 8:
                    raise ValueError("short line")
                ids.append(int(f[0]))
                rows.append([float(v) for v in f[1:8]])
                tracks.append(np.array(f[8:], np.int32).reshape(-1, 2))
            except ValueError:
                raise UserError(f"{file}:{n}: expected 'POINT3D_ID X Y Z R G B ERROR TRACK...'") from None
            line_numbers.append(n)
    a = np.array(rows, float).reshape(-1, 7)
    _check_points(a[:, :3], lambda k: f"{file}:{line_numbers[k]}")
    return Points3D(np.array(ids, np.int64), a[:, :3], a[:, 3:6].astype(np.uint8), a[:, 6], tracks)


def _write_text(model: Model, folder: Path) -> None:
    cams = [f"{c.id} {c.model} {c.width} {c.height} " + " ".join(repr(float(v)) for v in c.params)
            for c in model.cameras.values()]
    atomic_write(folder / "cameras.txt",
                 ("# CAMERA_ID MODEL WIDTH HEIGHT PARAMS[]\n" + "\n".join(cams) + "\n").encode())
    imgs = []
    for im in model.images.values():
        pose = " ".join(repr(float(v)) for v in (*im.qvec, *im.tvec))
        imgs.append(f"{im.id} {pose} {im.camera_id} {im.name}")
        keypoints = zip(im.xys.tolist(), im.point3D_ids, strict=True)
        imgs.append(" ".join(f"{x!r} {y!r} {int(p)}" for (x, y), p in keypoints))
    atomic_write(folder / "images.txt", ("# IMAGE_ID QW QX QY QZ TX TY TZ CAMERA_ID NAME\n"
                                         "# POINTS2D[] as (X, Y, POINT3D_ID)\n" + "\n".join(imgs) + "\n").encode())
    p = model.points
    rows = zip(p.ids, p.xyz.tolist(), p.rgb.tolist(), p.error, p.tracks, strict=True)
    pts = [f"{int(i)} {x!r} {y!r} {z!r} {r} {g} {b} {float(e)!r} " + " ".join(map(str, t.ravel().tolist()))
           for i, (x, y, z), (r, g, b), e, t in rows]
    atomic_write(folder / "points3D.txt", ("# POINT3D_ID X Y Z R G B ERROR TRACK[] as (IMAGE_ID, POINT2D_IDX)\n"
                                           + "\n".join(pts) + "\n").encode())


# ---- binary files ----

class _Reader:
    """Sequential little-endian reads from a file's bytes; a short file is a one-line UserError."""

    def __init__(self, file: Path):
        self.file, self.data, self.at = file, file.read_bytes(), 0

    def read(self, fmt: str) -> tuple:
        try:
            values = struct.unpack_from("<" + fmt, self.data, self.at)
        except struct.error:
            raise UserError(f"{self.file}: truncated or not a COLMAP binary file") from None
        self.at += struct.calcsize("<" + fmt)
        return values

    def count(self, record_size: int) -> int:
        """A uint64 count of records of at least `record_size` bytes each, checked to fit in the bytes left: a
        damaged or foreign file claims up to 2^64, which numpy would try to allocate before any read fell short."""
        count = self.read("Q")[0]
        if count * record_size > len(self.data) - self.at:
            raise UserError(f"{self.file}: not a COLMAP binary model ({count} records claimed, "
                            f"{len(self.data)} bytes)")
        return count

    def array(self, dtype: np.dtype | str, count: int) -> np.ndarray:
        """(count,) `dtype` values from the next bytes, not copied; `count()` has checked that they are there."""
        out = np.frombuffer(self.data, dtype, count, self.at)
        self.at += out.nbytes
        return out

    def name(self) -> str:
        """The next NUL-terminated UTF-8 string."""
        end = self.data.find(b"\x00", self.at)
        with contextlib.suppress(UnicodeDecodeError):  # not text: as damaged as a missing NUL
            if end >= 0:
                name, self.at = self.data[self.at:end].decode(), end + 1
                return name
        raise UserError(f"{self.file}: truncated or not a COLMAP binary file")


def _read_cameras_bin(file: Path) -> dict[int, Camera]:
    r, cameras = _Reader(file), {}
    min_params = min(n for _, n in CAMERA_MODELS.values())
    for _ in range(r.count(struct.calcsize(f"<iiQQ{min_params}d"))):
        cid, mid, w, h = r.read("iiQQ")
        if mid not in MODEL_NAMES:
            raise UserError(f"{file}: camera {cid} has unknown camera model id {mid}")
        name = MODEL_NAMES[mid]
        camera = Camera(cid, name, w, h, np.array(r.read("d" * CAMERA_MODELS[name][1])))
        cameras[cid] = _check_camera(camera, f"{file}: camera {cid}")
    return cameras


def _read_images_bin(file: Path) -> dict[int, Image]:
    r, images = _Reader(file), {}
    for _ in range(r.count(struct.calcsize("<i7di") + 1 + 8)):  # pose, an empty name's NUL, keypoint count
        iid, *pose, cid = r.read("i7di")
        name = r.name()
        kp = r.array(KEYPOINT, r.count(KEYPOINT.itemsize))
        image = Image(iid, np.array(pose[:4]), np.array(pose[4:]), cid, name,
                      np.stack([kp["x"], kp["y"]], 1), kp["point3D_id"].astype(np.int64))
        images[iid] = _check_pose(image, str(file))
    return images


def _read_points_bin(file: Path) -> Points3D:
    r = _Reader(file)
    count = r.count(struct.calcsize("<q3d3BdQ"))
    ids, a, rgb, tracks = np.zeros(count, np.int64), np.zeros((count, 4)), np.zeros((count, 3), np.uint8), []
    for k in range(count):
        ids[k], x, y, z, cr, cg, cb, err = r.read("q3d3Bd")  # signed, as images.bin's keypoints hold ids
        a[k], rgb[k] = (x, y, z, err), (cr, cg, cb)
        tracks.append(r.array("<i4", 2 * r.count(8)).reshape(-1, 2))  # (image id, keypoint index) pairs
    _check_points(a[:, :3], lambda k: f"{file}: point {ids[k]}")
    return Points3D(ids, a[:, :3], rgb, a[:, 3], tracks)


def _write_binary(model: Model, folder: Path) -> None:
    out = [struct.pack("<Q", len(model.cameras))]
    for c in model.cameras.values():
        out.append(struct.pack(f"<iiQQ{len(c.params)}d", c.id, CAMERA_MODELS[c.model][0], c.width, c.height,
                               *c.params))
    atomic_write(folder / "cameras.bin", b"".join(out))
    out = [struct.pack("<Q", len(model.images))]
    for im in model.images.values():
        kp = np.zeros(len(im.xys), KEYPOINT)
        kp["x"], kp["y"], kp["point3D_id"] = im.xys[:, 0], im.xys[:, 1], im.point3D_ids
        out += [struct.pack("<i7di", im.id, *im.qvec, *im.tvec, im.camera_id), im.name.encode() + b"\x00",
                struct.pack("<Q", len(kp)), kp.tobytes()]
    atomic_write(folder / "images.bin", b"".join(out))
    p = model.points
    out = [struct.pack("<Q", len(p.ids))]
    for i in range(len(p.ids)):
        out += [struct.pack("<q3d3BdQ", p.ids[i], *p.xyz[i], *p.rgb[i], p.error[i], len(p.tracks[i])),
                np.ascontiguousarray(p.tracks[i], "<i4").tobytes()]
    atomic_write(folder / "points3D.bin", b"".join(out))


# ---- models ----

def read_model(path: str | os.PathLike) -> Model:
    """Read a sparse model folder: binary when cameras.bin is there, else text. points3D may be absent."""
    folder = Path(path)
    if not folder.is_dir():
        raise UserError(f"{folder}: COLMAP model folder not found")
    ext = ".bin" if (folder / "cameras.bin").is_file() else ".txt"
    for stem in ("cameras", "images"):
        if not (folder / f"{stem}{ext}").is_file():
            hint = " (point --model_path at a folder like sparse/0)" if (folder / "0").is_dir() else ""
            raise UserError(f"{folder / (stem + ext)}: missing{hint}")
    read = {".bin": (_read_cameras_bin, _read_images_bin, _read_points_bin),
            ".txt": (_read_cameras_txt, _read_images_txt, _read_points_txt)}[ext]
    points_file = folder / f"points3D{ext}"
    points = (read[2](points_file) if points_file.is_file() else
              Points3D(np.zeros(0, np.int64), np.zeros((0, 3)), np.zeros((0, 3), np.uint8), np.zeros(0), []))
    return Model(read[0](folder / f"cameras{ext}"), read[1](folder / f"images{ext}"), points)


def write_model(model: Model, path: str | os.PathLike, binary: bool = False) -> None:
    """Write a model folder as .bin or .txt files."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    (_write_binary if binary else _write_text)(model, folder)


# ---- camera models ----

def camera_params(camera: Camera) -> np.ndarray:
    """(8,) fx, fy, cx, cy, k1, k2, p1, p2 of a supported model (COLMAP's parameter orders); a UserError naming
    any other model."""
    if camera.model not in SUPPORTED_MODELS:
        raise UserError(f"camera {camera.id}: camera model {camera.model} is not supported "
                        f"(supported: {', '.join(SUPPORTED_MODELS)})")
    p = list(camera.params)
    if len(p) != CAMERA_MODELS[camera.model][1]:
        raise UserError(f"camera {camera.id}: {camera.model} needs {CAMERA_MODELS[camera.model][1]} params, "
                        f"got {len(p)}")
    if camera.model in ("SIMPLE_PINHOLE", "SIMPLE_RADIAL", "RADIAL"):  # f, cx, cy, radial terms
        p = [p[0], *p]
    return np.array((p + [0.0] * 8)[:8], float)


def opencv_camera(camera: Camera) -> tuple[np.ndarray, np.ndarray | None]:
    """intrinsics (4,) fx, fy, cx, cy and OpenCV distortion [k1, k2, p1, p2] (None when zero)."""
    p = camera_params(camera)
    return p[:4], p[4:] if p[4:].any() else None


def project(camera: Camera, points_cam: np.ndarray) -> np.ndarray:
    """COLMAP's projection of OpenCV-camera points (N, 3) to pixels (N, 2), with the distortion written from
    COLMAP's model definitions (radial in r^2, OpenCV's tangential terms)."""
    fx, fy, cx, cy, k1, k2, p1, p2 = camera_params(camera)
    u, v = points_cam[:, 0] / points_cam[:, 2], points_cam[:, 1] / points_cam[:, 2]
    r2 = u * u + v * v
    radial = k1 * r2 + k2 * r2 * r2
    du = u * radial + 2 * p1 * u * v + p2 * (r2 + 2 * u * u)
    dv = v * radial + 2 * p2 * u * v + p1 * (r2 + 2 * v * v)
    return np.stack([fx * (u + du) + cx, fy * (v + dv) + cy], 1)


# ---- conversion ----

def colmap_c2w(image: Image) -> np.ndarray:
    """(3, 4) camera-to-world of the NeRF camera (right, up, back) from COLMAP's world-to-camera pose."""
    R = qvec_to_rotmat(image.qvec)
    return np.concatenate([R.T * np.array([1.0, -1.0, -1.0]), (-R.T @ image.tvec)[:, None]], 1)


def colmap_scene(model: Model, images_path: Path, source: str,
                 allow_missing: bool = False) -> tuple[SceneInput, list[Image]]:
    """The model's images found on disk (by name) as a SceneInput in COLMAP's world, and those images."""
    images = sorted(model.images.values(), key=lambda im: im.name)
    if not images:
        raise UserError(f"{source}: the model has no registered images")
    for im in images:
        if im.camera_id not in model.cameras:
            raise UserError(f"{source}: image {im.name} uses camera {im.camera_id}, not in the cameras file")
    cameras = {im.camera_id: opencv_camera(model.cameras[im.camera_id]) for im in images}
    keep = keep_existing_images([images_path / im.name for im in images], source, allow_missing)
    images = [im for im, k in zip(images, keep, strict=True) if k]
    scene = SceneInput(
        names=unique_stems([im.name for im in images]), image_paths=[images_path / im.name for im in images],
        c2w=np.stack([colmap_c2w(im) for im in images]),
        intrinsics=np.stack([cameras[im.camera_id][0] for im in images]),
        sizes=np.array([[model.cameras[im.camera_id].width, model.cameras[im.camera_id].height]
                        for im in images]),
        distortion=[cameras[im.camera_id][1] for im in images],
        points=model.points.xyz, colors=model.points.rgb, source="colmap", file=source)
    return scene, images


def reprojection_error(model: Model, images: list[Image], conv: Conversion,
                       max_observations: int = 4000) -> float | None:
    """Median pixel distance between keypoints and their 3D points projected through the converted poses
    (normalised DRB): checks the whole conversion on the user's own data. None without observations."""
    order = np.argsort(model.points.ids)
    sorted_ids = model.points.ids[order]
    rng = np.random.default_rng(0)
    per_image = max(1, max_observations // len(images))
    errors = []
    for c2w, im in zip(conv.c2w, images, strict=True):
        valid = np.flatnonzero(im.point3D_ids >= 0)
        pick = rng.choice(valid, min(per_image, len(valid)), replace=False)
        pos = np.clip(np.searchsorted(sorted_ids, im.point3D_ids[pick]), 0, max(len(sorted_ids) - 1, 0))
        found = sorted_ids[pos] == im.point3D_ids[pick] if len(sorted_ids) else np.zeros(len(pick), bool)
        cam = (conv.points[order[pos[found]]] - c2w[:, 3]) @ c2w[:, :3] * np.array([1.0, -1.0, -1.0])
        front = cam[:, 2] > 0
        pixels = project(model.cameras[im.camera_id], cam[front])
        errors.append(np.linalg.norm(pixels - im.xys[pick][found][front], axis=1))
    errors = np.concatenate(errors) if errors else np.zeros(0)
    return float(np.median(errors)) if len(errors) else None


def convert_colmap(model_path: str | os.PathLike, images_path: str | os.PathLike, output: str | os.PathLike,
                   up_axis: str = "auto", val_every: int = 8, undistort: bool = False,
                   link_images: bool = False, allow_missing_images: bool = False
                   ) -> tuple[Conversion, float | None]:
    """Convert a COLMAP sparse model and its images to our layout; returns the conversion and the median
    reprojection error in pixels (printed, with a warning when large)."""
    model = read_model(model_path)
    images_path = Path(images_path)
    if not images_path.is_dir():
        raise UserError(f"{images_path}: images folder not found")
    scene, images = colmap_scene(model, images_path, str(model_path), allow_missing_images)
    conv = convert(scene, output, up_axis, val_every, undistort, link_images)
    error = reprojection_error(model, images, conv)
    if error is not None:
        print(f"reprojection check: median {error:.3f} px between keypoints and projected sparse points")
        if error > REPROJECTION_WARNING_PX:
            print("warning: large reprojection error: the model's poses and cameras disagree")
    return conv, error
