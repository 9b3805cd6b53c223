"""Dataset preview and camera PLY export on a small dataset whose geometry is known: nadir cameras on a
3x4 grid at x = -0.5 over sparse ground points at x = 0.5, a 2x2 partition, a slab in config.yaml."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from plyfile import PlyData

from mega_nerf.cli.preview import main as preview_main
from mega_nerf.data.dataset import load_dataset, write_coordinates, write_image
from mega_nerf.errors import UserError, run_cli
from mega_nerf.partition.cells import PartitionParams
from mega_nerf.preview import CELLS, TRAIN, VAL, load_preview_scene, render_preview, scene_report, write_cameras_ply
from mega_nerf.rays import rays_from_pixels

REPO = Path(__file__).resolve().parents[1]
W, H = 16, 12
INTRINSICS = torch.tensor([14.0, 15.0, 7.5, 6.5])


def nadir_c2w(centre: list[float], yaw: float, flip: bool = False) -> torch.Tensor:
    """(3, 4) camera looking along +x (down), or along -x (up) when `flip`."""
    c, s = np.cos(yaw), np.sin(yaw)
    right, up = np.array([0.0, c, s]), np.array([0.0, s, -c])
    back = np.cross(right, up)  # = -x: the camera looks down
    rot = np.stack([right, up, back], 1) * (np.array([1.0, -1, -1]) if flip else 1.0)
    return torch.tensor(np.concatenate([rot, np.array(centre)[:, None]], 1))


def make_dataset(root: Path, flip: bool = False) -> Path:
    rng = np.random.default_rng(0)
    write_coordinates(root, torch.tensor([-100.0, 0, 0]), 50.0)  # real down = 50 * x - 100
    for i, (y, z) in enumerate((y, z) for y in np.linspace(-0.6, 0.6, 3) for z in np.linspace(-0.6, 0.6, 4)):
        write_image(root, "val" if i % 5 == 0 else "train", f"im{i:02d}", rng.integers(0, 256, (H, W, 3), np.uint8),
                    INTRINSICS, nadir_c2w([-0.5, y, z], rng.uniform(0, 6.28), flip))
    points = np.column_stack([np.full(500, 0.5), rng.uniform(-0.8, 0.8, (500, 2))])
    np.save(root / "points3D.npy", points.astype(np.float32))
    np.save(root / "points3D_rgb.npy", rng.integers(0, 256, (500, 3), dtype=np.uint8))
    (root / "config.yaml").write_text(yaml.safe_dump({"ray_altitude_range": [-130.0, -72.5]}))  # x: -0.6, 0.55
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("preview") / "data")


@pytest.fixture(scope="module")
def partition(dataset: Path) -> Path:
    folder = dataset.parent / "masks"
    folder.mkdir()
    centroids = torch.tensor([[-0.5, y, z] for y in (-0.3, 0.3) for z in (-0.3, 0.3)])
    PartitionParams(origin_drb=torch.tensor([-100.0, 0, 0], dtype=torch.float64), pose_scale_factor=50.0,
                    ray_altitude_range=(-0.6, 0.55), near=0.0, far=1e3, centroids=centroids, grid_dim=(2, 2),
                    min_position=torch.tensor([-0.5, -0.6, -0.6]), max_position=torch.tensor([-0.5, 0.6, 0.6]),
                    cluster_2d=False, boundary_margin=1.15).save(folder / "params.pt")
    return folder


def test_scene_reads_slab_points_and_cells(dataset: Path, partition: Path) -> None:
    scene = load_preview_scene(dataset, partition)
    assert scene.altitude == pytest.approx((-0.6, 0.55))
    assert scene.points.shape == (500, 3) and scene.colors.shape == (500, 3)
    assert scene.centroids.shape == (4, 3) and scene.is_val.sum() == 3
    np.testing.assert_allclose(scene.forwards, np.tile([1.0, 0, 0], (12, 1)), atol=1e-6)
    assert not [line for line in scene_report(scene) if line.startswith("warning")]
    assert load_preview_scene(dataset, ray_altitude_range=[-110.0, -60.0]).altitude == pytest.approx((-0.2, 0.8))


def test_report_flags_wrong_up_axis(tmp_path: Path) -> None:
    """Cameras looking up, and a slab whose ground lies above them, are what a flipped up axis looks like."""
    scene = load_preview_scene(make_dataset(tmp_path / "flipped", flip=True), ray_altitude_range=[-200.0, -150.0])
    report = "\n".join(scene_report(scene))
    assert "most cameras look up" in report
    assert "12 of 12 cameras lie below the ground plane" in report
    assert "100% of the sparse points lie below the ground plane" in report


def test_bad_slab_is_one_line(dataset: Path) -> None:
    with pytest.raises(UserError, match="top < ground"):
        load_preview_scene(dataset, ray_altitude_range=[10.0, -10.0])


def test_preview_image(dataset: Path, partition: Path) -> None:
    size = 300
    with_cells = render_preview(load_preview_scene(dataset, partition), size)
    plain = render_preview(load_preview_scene(dataset), size)
    assert with_cells.shape == plain.shape == (size, 2 * size, 3) and with_cells.dtype == np.uint8

    def count(img: np.ndarray, colour: tuple[int, int, int], cols: slice) -> int:
        return int((img[:, cols] == colour).all(-1).sum())
    for img in (with_cells, plain):
        left, right = slice(0, size), slice(size, 2 * size)
        assert count(img, TRAIN, left) > 0 and count(img, VAL, left) > 0
        assert count(img, TRAIN, right) > 0
        assert (img != 255).any(-1).mean() > 0.01  # points, cameras, text: not blank
    # the cell boundaries only appear with a partition
    assert count(with_cells, CELLS, slice(0, size)) > size and count(plain, CELLS, slice(0, size)) == 0
    # top view: y to the right, z down the page; val cameras sit at (y, z) = (-0.6, -0.6), (0, -0.2), (0.6, 0.2)
    rows, cols = np.nonzero((plain[:, :size] == VAL).all(-1))
    assert rows[cols.argmin()] < rows[cols.argmax()] and cols.max() - cols.min() > 0.5 * size


def test_preview_script(dataset: Path, partition: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.png"
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "preview_dataset.py"), str(dataset),
                             "--partition", str(partition), "--output", str(out), "--size", "200"],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "altitude slab" in result.stdout
    assert cv2.imread(str(out)).shape == (200, 400, 3)


def test_huge_size_is_one_line(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A --size past the largest useful image is refused by name before numpy asks for it (at 1000000 its
    MemoryError would end the command in a traceback)."""
    out = tmp_path / "p.png"
    with pytest.raises(SystemExit) as ended:
        run_cli(lambda: preview_main([str(dataset), "--output", str(out), "--size", "1000000"]))
    assert ended.value.code == 2
    assert capsys.readouterr().err == ("error: --size must be at most 8192, got 1000000: its 2000000x1000000 image "
                                       "would be wider than many viewers draw, with no more detail (its dots, lines "
                                       "and text have fixed pixel sizes)\n")
    assert not out.exists()


def test_an_output_that_would_destroy_a_file_is_refused_and_a_rerun_replaces_its_own(tmp_path: Path) -> None:
    """--output DATASET/train/rgbs/<image>.png replaced a training image with the preview, and any existing file
    of any kind was replaced; each is now refused untouched, and a rerun over its own preview still works."""
    data = make_dataset(tmp_path / "data")
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me\n")
    refused = {data / "train" / "rgbs" / "im01.png": f"inside the dataset {data}'s train images",
               data / "val" / "new.png": f"inside the dataset {data}'s val images",
               data / "config.yaml": f"lies inside {data}, one of this command's inputs",
               notes: "exists and is not a PNG image"}
    for output, message in refused.items():
        before = output.read_bytes() if output.exists() else None
        with pytest.raises(UserError, match=message):
            preview_main([str(data), "--output", str(output), "--size", "200"])
        assert (output.read_bytes() if output.exists() else None) == before
    for args in ([], ["--output", str(tmp_path / "p.png")]):
        for _ in range(2):
            preview_main([str(data), *args, "--size", "200"])
    assert cv2.imread(str(data / "preview.png")).shape == cv2.imread(str(tmp_path / "p.png")).shape == (200, 400, 3)


def test_cameras_ply(dataset: Path, tmp_path: Path) -> None:
    ds = load_dataset(dataset)
    assert write_cameras_ply(ds, tmp_path / "c.ply") == 9
    centres = torch.stack([m.c2w[:, 3] for m in ds.train]).numpy()
    v = PlyData.read(str(tmp_path / "c.ply"))["vertex"]
    np.testing.assert_allclose(np.stack([v["x"], v["y"], v["z"]], 1), centres, atol=1e-6)
    write_cameras_ply(ds, tmp_path / "f.ply", frusta=True, depth=0.1)
    ply = PlyData.read(str(tmp_path / "f.ply"))
    xyz = np.stack([ply["vertex"][k] for k in "xyz"], 1)
    edges = np.stack([ply["edge"]["vertex1"], ply["edge"]["vertex2"]], 1)
    assert xyz.shape == (45, 3) and edges.shape == (72, 2)
    # camera 0's first corner lies on the ray through the image's top-left corner, 0.1 in front (along -back)
    m = ds.train[0]
    o, d = rays_from_pixels(m.c2w.double(), m.intrinsics.double(), torch.zeros(1), torch.zeros(1), center=0.0)
    corner = xyz[9] - o[0].numpy()
    np.testing.assert_allclose(corner / np.linalg.norm(corner), d[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(-corner @ m.c2w[:, 2].double().numpy(), 0.1, atol=1e-6)
    assert {tuple(e) for e in edges[:4]} == {(0, 9), (0, 10), (0, 11), (0, 12)}


def test_truncated_images_are_named(tmp_path: Path) -> None:
    """Images that do not decode whole are reported before training would stop at them."""
    data = make_dataset(tmp_path / "data")
    assert not any("unreadable" in line for line in scene_report(load_preview_scene(data)))
    for name in ("im03", "im07"):
        image = data / "train" / "rgbs" / f"{name}.png"
        image.write_bytes(image.read_bytes()[:-40])
    assert ("warning: 2 images are unreadable or truncated (training stops at them): im03.png, im07.png"
            in scene_report(load_preview_scene(data)))
