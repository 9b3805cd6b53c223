"""The synthetic city written as a COLMAP model (in a rotated, scaled world with z up) converts into a dataset on
which the whole pipeline runs: preview, partition, training, merge, evaluation."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from mega_nerf.data.colmap import Camera, Image, Model, Points3D, rotmat_to_qvec, write_model
from mega_nerf.data.dataset import load_dataset
from mega_nerf.rays import image_rays

REPO = Path(__file__).resolve().parents[1]
# The source world: z up, metres x 3, shifted. Maps DRB (down, right, back) real-world positions into it.
TO_SOURCE = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, -1.0], [-1.0, 0.0, 0.0]]) * 3.0
SHIFT = np.array([100.0, -20.0, 7.0])


def write_city_as_colmap(city: Path, out: Path) -> tuple[Path, Path]:
    dataset = load_dataset(city)
    origin, scale = dataset.coordinates.origin_drb.numpy(), dataset.coordinates.pose_scale_factor
    cameras, images, points = {}, {}, []
    (out / "images").mkdir(parents=True)
    for i, m in enumerate(dataset.images, start=1):
        c2w = m.c2w.double().numpy()
        rot_cv = TO_SOURCE @ c2w[:, :3] @ np.diag([1.0, -1.0, -1.0]) / 3.0  # camera right, down, forward
        centre = TO_SOURCE @ (c2w[:, 3] * scale + origin) + SHIFT
        fx, fy, cx, cy = m.intrinsics.double().tolist()
        cameras[i] = Camera(i, "PINHOLE", m.W, m.H, np.array([fx, fy, cx, cy]))
        images[i] = Image(i, rotmat_to_qvec(rot_cv.T), -rot_cv.T @ centre, i, f"{m.name}.png",
                          np.zeros((0, 2)), np.zeros(0, dtype=np.int64))
        (out / "images" / f"{m.name}.png").write_bytes(m.image_path.read_bytes())
        depth = torch.from_numpy(np.load(city / "depth" / m.split / f"{m.name}.npy")).flatten()
        origins, dirs = image_rays(m.c2w.double(), m.intrinsics.double(), m.W, m.H)
        hit = torch.isfinite(depth)
        surface = (origins + dirs * depth[:, None].double())[hit][::7].numpy()
        points.append((TO_SOURCE @ (surface * scale + origin).T).T + SHIFT)
    xyz = np.concatenate(points)
    n = len(xyz)
    write_model(Model(cameras, images, Points3D(np.arange(1, n + 1), xyz, np.full((n, 3), 128, np.uint8),
                                                np.zeros(n), [np.zeros((0, 2), np.int32)] * n)), out / "sparse")
    return out / "sparse", out / "images"


def run(*args: str) -> str:
    done = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_colmap_city_runs_the_whole_pipeline(tiny_city, tmp_path):
    sparse, images = write_city_as_colmap(tiny_city, tmp_path / "colmap")
    data = tmp_path / "data"
    report = run("scripts/colmap_to_mega_nerf.py", "--model_path", str(sparse), "--images_path", str(images),
                 "--output", str(data))
    assert "up" in report.lower()
    converted = load_dataset(data)
    assert len(converted.images) == 40
    # the estimated up axis recovered the city's: every camera still looks down (+x is down in DRB)
    assert all(float(-m.c2w[0, 2]) > 0.3 for m in converted.images)
    config = data / "config.yaml"
    run("scripts/preview_dataset.py", str(data), "--output", str(tmp_path / "preview.png"))
    assert (tmp_path / "preview.png").stat().st_size > 10_000
    run("scripts/create_cluster_masks.py", "--config_file", str(config), "--dataset_path", str(data),
        "--output", str(tmp_path / "masks"), "--grid_dim", "2", "1", "--ray_samples", "32")
    small = ["--data_mode", "memory", "--batch_size", "256", "--train_iterations", "20", "--samples", "16",
             "--hash_levels", "4", "--log2_hashmap_size", "12", "--max_resolution", "64", "--occupancy_resolution",
             "16", "--val_interval", "20", "--val_images", "1", "--no_progress"]
    for k in range(2):
        run("mega_nerf/train.py", "--config_file", str(config), "--dataset_path", str(data), "--exp_name",
            str(tmp_path / f"exp-{k}"), "--cluster_mask_path", str(tmp_path / "masks" / str(k)), *small)
    run("scripts/merge_submodules.py", "--config_file", str(config), "--ckpt_prefix", str(tmp_path / "exp-"),
        "--centroid_path", str(tmp_path / "masks" / "params.pt"), "--output", str(tmp_path / "merged.pt"))
    run("mega_nerf/eval.py", "--config_file", str(config), "--dataset_path", str(data), "--container_path",
        str(tmp_path / "merged.pt"), "--exp_name", str(tmp_path / "eval"), "--val_scale_factor", "1", "--no_progress")
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["mean"]["psnr"] > 10
