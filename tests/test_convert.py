"""COLMAP and transforms.json converters: round trips through our own writers, camera models against OpenCV,
up-axis estimation on scenes with a known up, and one-line errors for bad input.

The round trips: a synthetic scene (cameras looking down on a ground plane, in DRB) is moved into a source
world by a random similarity, written as a COLMAP model (text and binary) or a transforms.json, converted,
and every image's rays must equal the original rays up to one similarity (the converter's own choice of
origin, scale and horizontal axes), whose rotation must keep 'down' down.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from plyfile import PlyData, PlyElement
from scipy.spatial.transform import Rotation

from mega_nerf.cli.convert import colmap_main
from mega_nerf.data.colmap import (
    Camera,
    Image,
    Model,
    Points3D,
    colmap_c2w,
    convert_colmap,
    opencv_camera,
    project,
    read_model,
    rotmat_to_qvec,
    write_model,
)
from mega_nerf.data.convert import drb_rotation, estimate_up
from mega_nerf.data.dataset import load_dataset
from mega_nerf.data.frames import to_source_map
from mega_nerf.data.transforms_json import convert_transforms
from mega_nerf.errors import UserError
from mega_nerf.rays import rays_from_pixels

REPO = Path(__file__).resolve().parents[1]
MODELS = ("PINHOLE", "SIMPLE_PINHOLE", "SIMPLE_RADIAL", "RADIAL", "OPENCV")
W, H = 32, 24
FLIP = np.array([1.0, -1.0, -1.0])  # NeRF camera (right, up, back) <-> OpenCV camera (right, down, forward)


@dataclass
class Scene:
    """Ground truth in real-world DRB: cameras (N, 3, 4) NeRF convention, one COLMAP camera per image."""

    names: list[str]
    c2w: np.ndarray
    cameras: list[Camera]
    points: np.ndarray  # (P, 3)
    rgb: np.ndarray  # (P, 3) uint8
    images: list[np.ndarray]  # (H, W, 3) uint8 RGB


def make_scene(seed: int = 0, n: int = 12) -> Scene:
    """Cameras 50 units above a ground plane (x = 50), tilted up to 30 degrees from nadir, random yaw."""
    rng = np.random.default_rng(seed)
    nadir = np.stack([[0.0, 1, 0], [0, 0, -1], [-1, 0, 0]], 1)  # columns right, up, back: looking along +x
    c2w, cameras = [], []
    for i in range(n):
        axis = np.array([0, *rng.normal(size=2)])
        tilt = Rotation.from_rotvec(axis / np.linalg.norm(axis) * np.radians(rng.uniform(0, 30)))
        yaw = Rotation.from_rotvec([rng.uniform(-np.pi, np.pi), 0, 0])
        centre = np.array([0.0, *rng.uniform(-40, 40, 2)])
        c2w.append(np.concatenate([(yaw * tilt).as_matrix() @ nadir, centre[:, None]], 1))
        model, f = MODELS[i % len(MODELS)], 28.0 + i
        pinhole = [f, f * 1.1, 15.3 + 0.1 * i, 11.7 - 0.1 * i] if model in ("PINHOLE", "OPENCV") else [f, 15.3, 11.7]
        extra = {"SIMPLE_RADIAL": [0.05], "RADIAL": [0.05, -0.01], "OPENCV": [0.04, -0.01, 0.001, -0.002]}
        cameras.append(Camera(i + 1, model, W, H, np.array(pinhole + extra.get(model, []))))
    ground = np.column_stack([np.full(200, 50.0), rng.uniform(-60, 60, (200, 2))])
    building = np.column_stack([rng.uniform(30, 50, 40), rng.uniform(-10, 10, (40, 2))])
    return Scene([f"img_{i:03d}" for i in range(n)], np.stack(c2w), cameras, np.concatenate([ground, building]),
                 rng.integers(0, 256, (240, 3), dtype=np.uint8),
                 [rng.integers(0, 256, (H, W, 3), dtype=np.uint8) for _ in range(n)])


def to_source(scene: Scene, rotation: np.ndarray, scale: float, shift: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray]:
    """Cameras (N, 3, 4) and points (P, 3) in a source world: p_src = scale * rotation @ p + shift."""
    rot = np.einsum("ij,njk->nik", rotation, scene.c2w[:, :, :3])
    centres = scale * scene.c2w[:, :, 3] @ rotation.T + shift
    return np.concatenate([rot, centres[:, :, None]], 2), scale * scene.points @ rotation.T + shift


def colmap_model(scene: Scene, c2w: np.ndarray, points: np.ndarray) -> Model:
    """A COLMAP model of the source-world scene; keypoints are OpenCV's projections of every point."""
    images, tracks = {}, [[] for _ in points]
    for i, (name, cam) in enumerate(zip(scene.names, scene.cameras, strict=True)):
        R = (c2w[i, :, :3] * FLIP).T  # world-to-camera, OpenCV camera
        t = -R @ c2w[i, :, 3]
        K, dist = opencv_camera(cam)
        rvec = cv2.Rodrigues(R)[0]
        xys = cv2.projectPoints(points, rvec, t, np.array([[K[0], 0, K[2]], [0, K[1], K[3]], [0, 0, 1]]),
                                np.zeros(4) if dist is None else dist)[0].reshape(-1, 2)
        for k in range(len(points)):
            tracks[k].append((i + 1, k))
        images[i + 1] = Image(i + 1, rotmat_to_qvec(R), t, cam.id, f"{name}.png", xys, np.arange(len(points)))
    pts = Points3D(np.arange(len(points), dtype=np.int64), points, scene.rgb, np.full(len(points), 0.5),
                   [np.array(t, np.int32) for t in tracks])
    return Model({c.id: c for c in scene.cameras}, images, pts)


def write_images(scene: Scene, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, rgb in zip(scene.names, scene.images, strict=True):
        cv2.imwrite(str(folder / f"{name}.png"), rgb[:, :, ::-1])


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    return Rotation.random(random_state=rng.integers(1 << 31)).as_matrix()


def assert_same_rays(scene: Scene, path: Path) -> np.ndarray:
    """Rays of every image, 30 random pixels each, equal up to one similarity; returns its rotation (3, 3)."""
    ds = load_dataset(path)
    assert [m.name for m in ds.images] == scene.names
    new = np.stack([m.c2w.double().numpy() for m in ds.images])
    rotation = new[0, :, :3] @ scene.c2w[0, :, :3].T
    old_c, new_c = scene.c2w[:, :, 3], new[:, :, 3]
    scale = np.linalg.norm(new_c - new_c.mean(0)) / np.linalg.norm(old_c - old_c.mean(0))
    shift = new_c.mean(0) - scale * old_c.mean(0) @ rotation.T
    gen = torch.Generator().manual_seed(0)
    for m, c2w, cam in zip(ds.images, scene.c2w, scene.cameras, strict=True):
        assert (m.W, m.H) == (W, H)
        K = torch.tensor(opencv_camera(cam)[0])
        assert torch.allclose(m.intrinsics.double(), K, atol=1e-5)
        cols, rows = torch.randint(0, W, (30,), generator=gen), torch.randint(0, H, (30,), generator=gen)
        o_old, d_old = rays_from_pixels(torch.tensor(c2w), K, cols, rows)
        o_new, d_new = rays_from_pixels(m.c2w.double(), m.intrinsics.double(), cols, rows)
        np.testing.assert_allclose(scale * o_old.numpy() @ rotation.T + shift, o_new.numpy(), atol=1e-5)
        np.testing.assert_allclose(d_old.numpy() @ rotation.T, d_new.numpy(), atol=1e-5)
    return rotation


@pytest.fixture(scope="module")
def scene() -> Scene:
    return make_scene()


@pytest.fixture
def colmap_input(scene: Scene, tmp_path: Path) -> tuple[Path, Path]:
    """A text model in a randomly rotated, scaled and shifted world, and its images: (model, images)."""
    rng = np.random.default_rng(1)
    c2w, points = to_source(scene, random_rotation(rng), 0.37, rng.normal(size=3) * 10)
    write_model(colmap_model(scene, c2w, points), tmp_path / "sparse")
    write_images(scene, tmp_path / "images")
    return tmp_path / "sparse", tmp_path / "images"


@pytest.mark.parametrize("binary", [False, True])
def test_colmap_model_round_trip(scene: Scene, tmp_path: Path, binary: bool) -> None:
    model = colmap_model(scene, *to_source(scene, np.eye(3), 1.0, np.zeros(3)))
    write_model(model, tmp_path, binary)
    back = read_model(tmp_path)
    assert all((a.id, a.model, a.width, a.height, a.params.tolist()) == (b.id, b.model, b.width, b.height,
                                                                         b.params.tolist())
               for a, b in zip(back.cameras.values(), model.cameras.values(), strict=True))
    for a, b in zip(back.images.values(), model.images.values(), strict=True):
        assert (a.id, a.camera_id, a.name) == (b.id, b.camera_id, b.name)
        for x, y in ((a.qvec, b.qvec), (a.tvec, b.tvec), (a.xys, b.xys), (a.point3D_ids, b.point3D_ids)):
            np.testing.assert_array_equal(x, y)
    for field in ("ids", "xyz", "rgb", "error"):
        np.testing.assert_array_equal(getattr(back.points, field), getattr(model.points, field))
    assert all(np.array_equal(a, b) for a, b in zip(back.points.tracks, model.points.tracks, strict=True))


@pytest.mark.parametrize("binary", [False, True])
def test_colmap_conversion_keeps_rays(scene: Scene, tmp_path: Path, binary: bool) -> None:
    rng = np.random.default_rng(2)
    c2w, points = to_source(scene, random_rotation(rng), 3.0, rng.normal(size=3) * 100)
    write_model(colmap_model(scene, c2w, points), tmp_path / "sparse", binary)
    write_images(scene, tmp_path / "images")
    conv, reprojection = convert_colmap(tmp_path / "sparse", tmp_path / "images", tmp_path / "out", val_every=4)
    rotation = assert_same_rays(scene, tmp_path / "out")
    assert rotation[0] @ np.array([1.0, 0, 0]) > np.cos(np.radians(0.1))  # down stays down
    assert reprojection < 1e-6
    ds = load_dataset(tmp_path / "out")
    assert [m.name for m in ds.val] == ["img_000", "img_004", "img_008"]
    for m, cam, rgb in zip(ds.images, scene.cameras, scene.images, strict=True):
        expected = opencv_camera(cam)[1]
        assert (m.distortion is None) == (expected is None)
        if expected is not None:
            np.testing.assert_allclose(m.distortion.numpy(), expected, rtol=1e-6)
        assert m.image_path.read_bytes() == (tmp_path / "images" / f"{m.name}.png").read_bytes()
        np.testing.assert_array_equal(cv2.imread(str(m.image_path))[:, :, ::-1], rgb)
    # the slab holds the bulk of the points (all but the top 1%), from the roofs (x = 30) to the ground plane
    # (x = 50), each within its margin, not the cameras 20 m above the roofs
    top, ground = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())["ray_altitude_range"]
    down = conv.points[:, 0] * conv.pose_scale_factor + conv.origin_drb[0]
    roofs, ground_down = np.percentile(down, 1), down[:200].max()
    height = ground_down - roofs
    assert roofs - 0.1 * height < top < roofs and ground_down < ground < ground_down + 0.1 * height
    assert top > (conv.c2w[:, 0, 3] * conv.pose_scale_factor + conv.origin_drb[0]).max()
    assert np.abs(conv.c2w[:, :, 3]).max() <= 1 + 1e-9  # cameras and the bulk of the points fit in [-1, 1]
    assert np.percentile(np.abs(np.load(tmp_path / "out" / "points3D.npy")), 95, axis=0).max() <= 1


def test_given_up_axis_is_exact(scene: Scene, tmp_path: Path) -> None:
    """A z-up world (x east-ish, y north-ish) with --up_axis +z: down is -z exactly, rays unchanged."""
    z_up = np.array([[0.0, 1, 0], [0, 0, -1], [-1, 0, 0]])  # DRB -> source: down -> -z, right -> +x
    c2w, points = to_source(scene, z_up, 2.0, np.array([5.0, -3, 100]))
    write_model(colmap_model(scene, c2w, points), tmp_path / "sparse", binary=True)
    write_images(scene, tmp_path / "images")
    conv, _ = convert_colmap(tmp_path / "sparse", tmp_path / "images", tmp_path / "out", up_axis="+z",
                             val_every=4, link_images=True)
    np.testing.assert_allclose(conv.rotation @ np.array([0.0, 0, 1]), [-1, 0, 0], atol=1e-12)
    assert assert_same_rays(scene, tmp_path / "out")[0, 0] > 1 - 1e-6
    assert all(m.image_path.is_symlink() for m in load_dataset(tmp_path / "out").images)


def test_transforms_conversion_keeps_rays(scene: Scene, tmp_path: Path) -> None:
    """Shared and per-frame intrinsics, camera_angle_x, distortion and a ply_file_path all round trip."""
    rng = np.random.default_rng(3)
    c2w, points = to_source(scene, random_rotation(rng), 0.1, rng.normal(size=3))
    write_images(scene, tmp_path / "images")
    vertex = np.array([tuple(p) + tuple(c) for p, c in zip(points, scene.rgb, strict=True)],
                      dtype=[("x", "f8"), ("y", "f8"), ("z", "f8"), ("red", "u1"), ("green", "u1"), ("blue", "u1")])
    PlyData([PlyElement.describe(vertex, "vertex")]).write(str(tmp_path / "sparse_pc.ply"))
    frames = []
    for i, (name, cam) in enumerate(zip(scene.names, scene.cameras, strict=True)):
        (fx, fy, cx, cy), dist = opencv_camera(cam)
        frame = {"file_path": f"images/{name}.png", "transform_matrix": np.vstack([c2w[i], [0, 0, 0, 1]]).tolist(),
                 "fl_x": fx, "fl_y": fy, "cx": cx, "cy": cy}
        if i % 3 == 0:  # no fl_x: from the field of view; no fl_y: equal to fl_x
            frame.pop("fl_x")
            frame["camera_angle_x"] = 2 * np.arctan(0.5 * W / fx)
            if fx == fy:
                frame.pop("fl_y")
        frame.update(dict(zip(("k1", "k2", "p1", "p2"), dist.tolist(), strict=True)) if dist is not None else {})
        frames.append(frame)
    shared = {"w": W, "h": H, "camera_model": "OPENCV", "ply_file_path": "sparse_pc.ply", "k1": 0.0}
    (tmp_path / "transforms.json").write_text(json.dumps({**shared, "frames": frames}))
    conv = convert_transforms(tmp_path / "transforms.json", tmp_path / "out", val_every=4)
    assert assert_same_rays(scene, tmp_path / "out")[0, 0] > np.cos(np.radians(0.1))
    assert len(conv.points) == len(points) and conv.altitude_range is not None
    ds = load_dataset(tmp_path / "out")
    for m, cam in zip(ds.images, scene.cameras, strict=True):
        expected = opencv_camera(cam)[1]
        assert (m.distortion is None) == (expected is None)
        if expected is not None:
            np.testing.assert_allclose(m.distortion.numpy(), expected, rtol=1e-6)


@pytest.mark.parametrize("model", MODELS)
def test_camera_model_matches_opencv(model: str) -> None:
    rng = np.random.default_rng(len(model))
    params = {"SIMPLE_PINHOLE": [500, 320, 240], "PINHOLE": [500, 520, 320, 240],
              "SIMPLE_RADIAL": [500, 320, 240, -0.12], "RADIAL": [500, 320, 240, -0.12, 0.03],
              "OPENCV": [500, 520, 320, 240, -0.12, 0.03, 0.002, -0.003]}[model]
    camera = Camera(1, model, 640, 480, np.array(params, float))
    points = np.column_stack([rng.uniform(-0.6, 0.6, (50, 2)), np.ones(50)]) * rng.uniform(1, 20, (50, 1))
    K, dist = opencv_camera(camera)
    expected = cv2.projectPoints(points, np.zeros(3), np.zeros(3),
                                 np.array([[K[0], 0, K[2]], [0, K[1], K[3]], [0, 0, 1]]),
                                 np.zeros(4) if dist is None else dist)[0].reshape(-1, 2)
    np.testing.assert_allclose(project(camera, points), expected, atol=1e-8)


def test_colmap_pose_convention() -> None:
    """An identity COLMAP pose looks along world +z with image rows along +y: NeRF back = -z, up = -y."""
    c2w = colmap_c2w(Image(1, np.array([1.0, 0, 0, 0]), np.array([1.0, 2, 3]), 1, "a", np.zeros((0, 2)),
                           np.zeros(0, np.int64)))
    np.testing.assert_allclose(c2w, [[1, 0, 0, -1], [0, -1, 0, -2], [0, 0, -1, -3]], atol=1e-15)


def test_estimate_up_planes_and_street(scene: Scene) -> None:
    rng = np.random.default_rng(4)
    rotation = random_rotation(rng)
    c2w, points = to_source(scene, rotation, 1.0, np.zeros(3))
    up, reason = estimate_up(c2w, points)
    np.testing.assert_allclose(up, rotation @ [-1.0, 0, 0], atol=1e-9)
    assert "the ground" in reason
    up, reason = estimate_up(c2w, points[:0])  # without points: the camera centres' plane
    np.testing.assert_allclose(up, rotation @ [-1.0, 0, 0], atol=1e-9)
    assert "camera centres" in reason
    np.testing.assert_allclose(drb_rotation(up) @ up, [-1, 0, 0], atol=1e-12)
    # a street: level cameras of any yaw along a line, points on one facade (a vertical plane, rejected)
    n = 10
    level = np.stack([[0.0, 1, 0], [-1, 0, 0], [0, 0, 1]], 1)  # right = +y, up = -x, back = +z
    rots = Rotation.from_rotvec(np.outer(rng.uniform(-np.pi, np.pi, n), [1.0, 0, 0])).as_matrix() @ level
    cams = np.concatenate([rots, np.column_stack([np.full(n, -1.5), np.zeros(n), np.linspace(0, 90, n)])[:, :, None]],
                          2)
    facade = np.column_stack([rng.uniform(-20, 0, 300), np.full(300, 8.0), rng.uniform(0, 90, 300)])
    up, reason = estimate_up(cams, facade)
    np.testing.assert_allclose(up, [-1, 0, 0], atol=1e-9)
    assert "right axes" in reason and "no plane fit" in reason


def test_missing_model_files(colmap_input: tuple[Path, Path], tmp_path: Path) -> None:
    sparse, images = colmap_input
    (sparse / "images.txt").unlink()
    with pytest.raises(UserError, match=r"images\.txt: missing"):
        convert_colmap(sparse, images, tmp_path / "out")
    (sparse / "cameras.txt").unlink()
    with pytest.raises(UserError, match=r"cameras\.txt: missing"):
        convert_colmap(sparse, images, tmp_path / "out")


def test_unsupported_camera_model_is_named(scene: Scene, tmp_path: Path) -> None:
    model = colmap_model(scene, *to_source(scene, np.eye(3), 1.0, np.zeros(3)))
    model.cameras[2] = Camera(2, "OPENCV_FISHEYE", W, H, np.array([30.0, 30, 16, 12, 0.1, 0, 0, 0]))
    write_model(model, tmp_path / "sparse", binary=True)
    write_images(scene, tmp_path / "images")
    with pytest.raises(UserError, match="camera model OPENCV_FISHEYE is not supported"):
        convert_colmap(tmp_path / "sparse", tmp_path / "images", tmp_path / "out")


def test_missing_images_are_counted(colmap_input: tuple[Path, Path], tmp_path: Path) -> None:
    sparse, images = colmap_input
    (images / "img_003.png").unlink()
    (images / "img_007.png").unlink()
    with pytest.raises(UserError, match="2 of 12 images .* missing .*--allow_missing_images"):
        convert_colmap(sparse, images, tmp_path / "out")
    convert_colmap(sparse, images, tmp_path / "out", allow_missing_images=True)
    assert len(load_dataset(tmp_path / "out").images) == 10


def test_degenerate_scene(scene: Scene, tmp_path: Path) -> None:
    c2w, points = to_source(scene, np.eye(3), 1.0, np.zeros(3))
    c2w[:, :, 3] = [1.0, 2.0, 3.0]
    write_model(colmap_model(scene, c2w, points), tmp_path / "sparse")
    write_images(scene, tmp_path / "images")
    with pytest.raises(UserError, match="degenerate scene: all 12 cameras lie at one point"):
        convert_colmap(tmp_path / "sparse", tmp_path / "images", tmp_path / "out")


def test_undistort_writes_undistorted_images(colmap_input: tuple[Path, Path], scene: Scene,
                                             tmp_path: Path) -> None:
    convert_colmap(*colmap_input, tmp_path / "out", undistort=True)
    for m, cam, rgb in zip(load_dataset(tmp_path / "out").images, scene.cameras, scene.images, strict=True):
        assert m.distortion is None
        K, dist = opencv_camera(cam)
        expected = rgb if dist is None else cv2.undistort(
            rgb, np.array([[K[0], 0, K[2]], [0, K[1], K[3]], [0, 0, 1]]), dist)
        np.testing.assert_array_equal(m.load_rgb().numpy(), expected)


def test_cli_error_is_one_line(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "colmap_to_mega_nerf.py"),
                             "--model_path", str(tmp_path / "nope"), "--images_path", str(tmp_path),
                             "--output", str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {tmp_path / 'nope'}: COLMAP model folder not found"


def colmap_argv(sparse: Path, images: Path, out: Path, *extra: str) -> list[str]:
    return ["--model_path", str(sparse), "--images_path", str(images), "--output", str(out), *extra]


def test_killed_conversion_leaves_no_dataset_and_the_same_command_then_succeeds(
        colmap_input: tuple[Path, Path], tmp_path: Path) -> None:
    """kill -9 after the third metadata file: the output does not exist (the work was in a temp folder), and the
    same command run again converts everything, leaving no temp folder and no lock behind."""
    argv = colmap_argv(*colmap_input, tmp_path / "out")
    script = ("import os, signal, sys\nimport mega_nerf.data.convert as c\nfrom mega_nerf.cli import convert\n"
              "from mega_nerf.errors import run_cli\n"
              "real, calls = c.save_torch_atomic, []\n"
              "def dying(obj, path):\n    calls.append(path)\n    if len(calls) == 3:\n"
              "        os.kill(os.getpid(), signal.SIGKILL)\n    real(obj, path)\n"
              f"c.save_torch_atomic = dying\nsys.argv = ['colmap', *{argv!r}]\nrun_cli(convert.colmap_main)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == -9, result.stderr
    assert not (tmp_path / "out").exists()
    colmap_main(argv)
    assert len(load_dataset(tmp_path / "out").images) == 12
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "out", "sparse"]


def test_truncated_or_missized_source_image_is_named(colmap_input: tuple[Path, Path], tmp_path: Path) -> None:
    sparse, images = colmap_input
    image = images / "img_005.png"
    whole = image.read_bytes()
    image.write_bytes(whole[: len(whole) * 3 // 4])
    with pytest.raises(UserError, match=r"img_005\.png: unreadable or truncated image$"):
        convert_colmap(sparse, images, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    cv2.imwrite(str(image), np.zeros((H + 1, W, 3), np.uint8))
    with pytest.raises(UserError, match=rf"img_005\.png: image is {W}x{H + 1} but its camera says {W}x{H}$"):
        convert_colmap(sparse, images, tmp_path / "out")


def test_up_axis_with_a_minus_sign_is_accepted_as_the_readme_writes_it(colmap_input: tuple[Path, Path],
                                                                        tmp_path: Path) -> None:
    """`--up_axis -z` (a value starting with '-') parses like `--up_axis=-z`."""
    colmap_main(colmap_argv(*colmap_input, tmp_path / "a", "--up_axis", "-z", "--val_every", "4"))
    colmap_main(colmap_argv(*colmap_input, tmp_path / "b", "--up_axis=-z", "--val_every", "4"))
    assert (tmp_path / "a" / "coordinates.pt").read_bytes() == (tmp_path / "b" / "coordinates.pt").read_bytes()


def test_an_output_holding_other_files_is_refused(colmap_input: tuple[Path, Path], tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "thesis.tex").write_text("precious")
    with pytest.raises(UserError, match=r"out: exists and is not an empty folder; choose another --output$"):
        convert_colmap(*colmap_input, tmp_path / "out")
    assert os.listdir(tmp_path / "out") == ["thesis.tex"]


@pytest.mark.parametrize(("key", "value"), [("fl_x", "fifty"), ("cx", None), ("k1", [0.1]), ("w", "64")])
def test_transforms_values_of_the_wrong_type_name_the_key(scene: Scene, tmp_path: Path, key: str, value) -> None:
    write_images(scene, tmp_path / "images")
    c2w, _ = to_source(scene, np.eye(3), 1.0, np.zeros(3))
    frames = [{"file_path": f"images/{name}.png", "transform_matrix": np.vstack([c2w[i], [0, 0, 0, 1]]).tolist()}
              for i, name in enumerate(scene.names)]
    shared = {"w": W, "h": H, "fl_x": 30.0, "fl_y": 30.0, "cx": W / 2, "cy": H / 2, key: value}
    (tmp_path / "transforms.json").write_text(json.dumps({**shared, "frames": frames}))
    with pytest.raises(UserError, match=rf"frame images/img_000\.png: '{key}' must be a finite number, got "):
        convert_transforms(tmp_path / "transforms.json", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def assert_back_in_source(path: Path, c2w: np.ndarray, points: np.ndarray) -> None:
    """dataparser_transforms.json takes the converted points and cameras back where the source had them, within
    1e-5 of the scene's size (the dataset stores float32)."""
    to_source = to_source_map(path, "test")
    size = np.ptp(points, axis=0).max()
    np.testing.assert_allclose(to_source.points(np.load(path / "points3D.npy")), points, atol=1e-5 * size)
    converted = np.stack([m.c2w.double().numpy() for m in load_dataset(path).images])
    back = to_source.cameras(converted)
    np.testing.assert_allclose(back[:, :, 3], c2w[:, :, 3], atol=1e-5 * size)
    np.testing.assert_allclose(back[:, :, :3], c2w[:, :, :3], atol=1e-6)


def test_conversions_map_back_to_the_source_frame(scene: Scene, tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    c2w, points = to_source(scene, random_rotation(rng), 7.0, rng.normal(size=3) * 1000)
    write_model(colmap_model(scene, c2w, points), tmp_path / "sparse", binary=True)
    write_images(scene, tmp_path / "images")
    convert_colmap(tmp_path / "sparse", tmp_path / "images", tmp_path / "colmap")
    assert_back_in_source(tmp_path / "colmap", c2w, points)
    assert json.loads((tmp_path / "colmap" / "dataparser_transforms.json").read_text())["source"] == "colmap"
    vertex = np.array([tuple(p) for p in points], dtype=[("x", "f8"), ("y", "f8"), ("z", "f8")])
    PlyData([PlyElement.describe(vertex, "vertex")]).write(str(tmp_path / "points.ply"))
    frames = [{"file_path": f"images/{name}.png", "transform_matrix": np.vstack([c2w[i], [0, 0, 0, 1]]).tolist(),
               "fl_x": 30.0, "w": W, "h": H} for i, name in enumerate(scene.names)]
    (tmp_path / "transforms.json").write_text(json.dumps({"ply_file_path": "points.ply", "frames": frames}))
    convert_transforms(tmp_path / "transforms.json", tmp_path / "ns")
    assert_back_in_source(tmp_path / "ns", c2w, points)


def test_up_of_a_varying_altitude_survey_is_its_flat_ground() -> None:
    """Cameras from 150 to 295 m over flat ground with buildings (the flight climbs across the area, so the
    camera centres' plane is tilted): up comes from the ground points, within 0.1 degree of the truth."""
    rng = np.random.default_rng(7)
    true_up = Rotation.random(random_state=8).as_matrix() @ np.array([-1.0, 0, 0])
    to_world = drb_rotation(true_up).T  # DRB -> a tilted source world
    n = 60
    yz = rng.uniform(-400, 400, (n, 2))
    altitude = 150 + 145 * (yz[:, 0] + 400) / 800 + rng.normal(0, 3, n)  # climbs across the area
    nadir = np.stack([[0.0, 1, 0], [0, 0, -1], [-1, 0, 0]], 1)
    c2w_drb = []
    for i in range(n):
        tilt = Rotation.from_rotvec(np.r_[0, rng.normal(size=2)] / 4) * Rotation.from_rotvec([rng.uniform(-3, 3), 0, 0])
        c2w_drb.append(np.concatenate([tilt.as_matrix() @ nadir, np.r_[-altitude[i], yz[i]][:, None]], 1))
    c2w_drb = np.stack(c2w_drb)
    ground = np.column_stack([rng.normal(0, 0.05, 3000), rng.uniform(-500, 500, (3000, 2))])
    roofs = np.column_stack([-rng.uniform(5, 60, 1500), rng.uniform(-300, 300, (1500, 2))])
    points = np.concatenate([ground, roofs]) @ to_world.T
    c2w = np.concatenate([np.einsum("ij,njk->nik", to_world, c2w_drb[:, :, :3]),
                          (c2w_drb[:, :, 3] @ to_world.T)[:, :, None]], 2)
    centres_normal = np.linalg.eigh(np.cov(c2w[:, :, 3].T))[1][:, 0]
    assert np.degrees(np.arccos(abs(centres_normal @ true_up))) > 1.0  # the cameras' plane is tilted
    up, reason = estimate_up(c2w, points)
    assert np.degrees(np.arccos(min(1.0, up @ true_up))) < 0.1 and "the ground" in reason
