"""The dataset reader against what the writer put on disk, OpenCV references, and bad input.

Every bad-input case must raise `UserError` with a message naming the offending file.
"""
from __future__ import annotations

import re
import subprocess
import sys
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import mega_nerf.errors
from mega_nerf.data.dataset import (
    check_not_in_dataset,
    dataset_holding,
    load_dataset,
    write_coordinates,
    write_image,
)
from mega_nerf.errors import UserError, end_process

ROOT = Path(__file__).resolve().parents[1]


def random_c2w(rng: np.random.Generator) -> torch.Tensor:
    """A random proper rotation and centre, (3, 4) float32."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    q = q if np.linalg.det(q) > 0 else -q
    return torch.from_numpy(np.concatenate([q, rng.normal(size=(3, 1))], 1)).float()


def smooth_rgb(rng: np.random.Generator, W: int, H: int) -> np.ndarray:
    """A low-frequency (H, W, 3) uint8 image, so that JPEG compression changes it little."""
    u, v = np.meshgrid(np.linspace(0, 1, W), np.linspace(0, 1, H))
    a = rng.uniform(0.5, 1.0, size=(3, 2))
    rgb = 40 + 170 * np.stack([(a[c, 0] * u + a[c, 1] * v) / 2 for c in range(3)], -1)
    return rgb.round().astype(np.uint8)


def add_image(root: Path, split: str, name: str, W: int, H: int, ext: str = ".png", seed: int = 0,
              distortion: torch.Tensor | None = None) -> dict:
    """Write one image with random content, intrinsics and pose; return what was written."""
    rng = np.random.default_rng(seed)
    rgb = smooth_rgb(rng, W, H) if ext.lower() == ".jpg" else rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    intrinsics = torch.tensor([W * rng.uniform(0.8, 1.2), H * rng.uniform(1.3, 1.6),
                               W * rng.uniform(0.4, 0.6), H * rng.uniform(0.4, 0.6)], dtype=torch.float32)
    c2w = random_c2w(rng)
    write_image(root, split, name, rgb, intrinsics, c2w, distortion=distortion, ext=ext)
    return {"rgb": rgb, "intrinsics": intrinsics, "c2w": c2w, "split": split}


def minimal_dataset(root: Path, ext: str = ".png") -> Path:
    """One 8x6 train image 'a' and one val image 'b'."""
    write_coordinates(root, torch.tensor([1.0, 2.0, 3.0]), 10.0)
    add_image(root, "train", "a", 8, 6, ext, seed=1)
    add_image(root, "val", "b", 8, 6, ext, seed=2)
    return root


def raises_naming(path: Path):
    """pytest.raises for a UserError whose one-line message names `path`."""
    return pytest.raises(UserError, match=re.escape(str(path)))


def test_round_trip_counts_sizes_poses_pixels_and_appearance_order(tmp_path):
    write_coordinates(tmp_path, torch.tensor([5.0, -2.0, 7.5]), 123.0)
    # Names interleave between the splits so that appearance order must merge them; 'img' and 'img-1'
    # compare differently as stems and as file names ('img-1.pt' < 'img.pt'), Mega-NeRF uses file names.
    specs = [("train", "c", 24, 16, ".png"), ("val", "b", 20, 12, ".png"), ("train", "a", 16, 10, ".jpg"),
             ("val", "d", 32, 18, ".jpg"), ("train", "e", 12, 30, ".png"),
             ("train", "img", 10, 8, ".png"), ("val", "img-1", 10, 8, ".png")]
    written = {name: add_image(tmp_path, split, name, W, H, ext, seed=k)
               for k, (split, name, W, H, ext) in enumerate(specs)}
    ds = load_dataset(tmp_path)
    torch.testing.assert_close(ds.coordinates.origin_drb, torch.tensor([5.0, -2.0, 7.5], dtype=torch.float64))
    assert ds.coordinates.pose_scale_factor == 123.0
    assert [m.name for m in ds.images] == ["a", "b", "c", "d", "e", "img-1", "img"]
    assert [m.index for m in ds.images] == list(range(len(specs)))
    assert [m.name for m in ds.train] == ["a", "c", "e", "img"]
    assert [m.name for m in ds.val] == ["b", "d", "img-1"]
    for m in ds.images:
        ref = written[m.name]
        assert m.split == ref["split"] and (m.H, m.W) == ref["rgb"].shape[:2] and m.distortion is None
        assert torch.equal(m.intrinsics, ref["intrinsics"]) and torch.equal(m.c2w, ref["c2w"])
        rgb = m.load_rgb()
        assert rgb.dtype == torch.uint8 and rgb.shape == (m.H, m.W, 3)
        if m.image_path.suffix == ".png":
            assert np.array_equal(rgb.numpy(), ref["rgb"])
        else:  # lossy, but a smooth image survives within a few levels and keeps its channel order
            assert np.abs(rgb.numpy().astype(int) - ref["rgb"]).mean() < 2.0


def test_metadata_written_from_a_view_holds_only_its_own_values(tmp_path):
    """One camera of a stack: torch.save of the view would write the whole stack's storage into every file."""
    poses = torch.randn(50, 3, 4, generator=torch.Generator().manual_seed(0))
    write_image(tmp_path, "train", "a", np.zeros((6, 8, 3), np.uint8), torch.tensor([8.0, 8.0, 4.0, 3.0]), poses[7])
    saved = torch.load(tmp_path / "train" / "metadata" / "a.pt", weights_only=True)
    assert torch.equal(saved["c2w"], poses[7]) and saved["c2w"].untyped_storage().nbytes() == 12 * 4


def test_scale_factor_halves_size_and_intrinsics_and_area_downsamples(tmp_path):
    write_coordinates(tmp_path, torch.zeros(3), 1.0)
    written = {"a": add_image(tmp_path, "train", "a", 24, 18, seed=3),
               "b": add_image(tmp_path, "val", "b", 14, 10, ".jpg", seed=4)}
    full = {m.name: m.load_rgb().numpy() for m in load_dataset(tmp_path).images}
    for m in load_dataset(tmp_path, scale_factor=2).images:
        ref = written[m.name]
        assert (m.W, m.H) == (ref["rgb"].shape[1] // 2, ref["rgb"].shape[0] // 2)
        torch.testing.assert_close(m.intrinsics, ref["intrinsics"] / 2)
        assert torch.equal(m.c2w, ref["c2w"])
        expected = cv2.resize(full[m.name], (m.W, m.H), interpolation=cv2.INTER_AREA)
        assert np.array_equal(m.load_rgb().numpy(), expected)
    # INTER_AREA by 2 is the mean of 2x2 blocks: check one pixel by hand on the lossless image.
    a = load_dataset(tmp_path, scale_factor=2).images[0].load_rgb().numpy().astype(int)
    assert np.abs(a[1, 2] - written["a"]["rgb"][2:4, 4:6].reshape(4, 3).mean(0)).max() <= 0.5


def test_val_images_train_their_left_half_and_are_scored_on_the_right(tmp_path):
    """Mega-NeRF's protocol: a val image trains columns [0, W // 2) and is scored on the rest (odd W: the middle
    column is scored); a train image trains everywhere and is never scored."""
    write_coordinates(tmp_path, torch.zeros(3), 1.0)
    add_image(tmp_path, "train", "a", 7, 4)
    add_image(tmp_path, "val", "b", 7, 4)
    train, val = load_dataset(tmp_path).images
    columns = torch.arange(7).expand(4, 7)
    assert torch.equal(val.scored_mask(), columns >= 3) and torch.equal(val.trained_mask(), columns < 3)
    assert not train.scored_mask().any() and train.trained_mask().all()
    assert val.scored_columns == slice(3, 7)


def test_size_not_divisible_by_scale_factor(tmp_path):
    write_coordinates(tmp_path, torch.zeros(3), 1.0)
    add_image(tmp_path, "train", "a", 16, 10)
    add_image(tmp_path, "val", "b", 15, 10)
    load_dataset(tmp_path, scale_factor=1)
    with raises_naming(tmp_path / "val" / "metadata" / "b.pt"):
        load_dataset(tmp_path, scale_factor=2)


def brown_conrady(u: np.ndarray, v: np.ndarray, K: tuple[float, ...], d: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Where an ideal pinhole pixel coordinate (u, v) lands in the distorted image (OpenCV's 5-term model),
    in docs/DESIGN.md's pixel convention (pixel centres at +0.5, the convention of cx, cy)."""
    fx, fy, cx, cy = K
    k1, k2, p1, p2, k3 = d
    x, y = (u - cx) / fx, (v - cy) / fy
    r2 = x * x + y * y
    radial = 1 + k1 * r2 + k2 * r2 ** 2 + k3 * r2 ** 3
    xd = x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x)
    yd = y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y
    return fx * xd + cx, fy * yd + cy


def test_distortion_is_undistorted_at_load(tmp_path):
    """A linear ramp image h(u, v) taken through a distorting lens must read back as h(distort(u, v))."""
    W, H = 96, 64
    K = (55.0, 50.0, 50.3, 30.8)
    d = np.array([-0.4, 0.1, 0.004, -0.005, 0.01])

    def ramp(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        return np.stack([2.5 * u, 3.5 * v, 100 + 0.8 * u - 0.6 * v], -1)

    u, v = np.meshgrid(np.arange(W) + 0.5, np.arange(H) + 0.5)
    captured = np.clip(ramp(u, v).round(), 0, 255).astype(np.uint8)
    write_coordinates(tmp_path, torch.zeros(3), 1.0)
    write_image(tmp_path, "train", "a", captured, torch.tensor(K), torch.eye(3, 4),
                distortion=torch.tensor(d))
    add_image(tmp_path, "val", "b", 8, 6)
    m = load_dataset(tmp_path).images[0]
    assert m.distortion is not None
    torch.testing.assert_close(m.distortion, torch.tensor(d, dtype=torch.float32).double())
    rgb = m.load_rgb().numpy().astype(float)
    expected = ramp(*brown_conrady(u, v, K, d))
    # Barrel distortion: every ideal pixel samples inside the captured image, so no border to exclude.
    # Bound: input and output rounding (0.5 + 0.5) less OpenCV's 1/32-pixel interpolation grid.
    assert np.abs(rgb - expected).max() < 1.0
    assert np.abs(rgb - expected).mean() < 0.35
    assert np.abs(rgb - captured).max() > 20  # the lens really moved pixels, so the check above has teeth
    # And it agrees with OpenCV's own undistortion, given pixel centres at integers in OpenCV's convention.
    K_cv = np.array([[K[0], 0, K[2] - 0.5], [0, K[1], K[3] - 0.5], [0, 0, 1]])
    assert np.abs(rgb - cv2.undistort(captured, K_cv, d)).max() <= 1


def test_missing_coordinates(tmp_path):
    minimal_dataset(tmp_path)
    (tmp_path / "coordinates.pt").unlink()
    with raises_naming(tmp_path / "coordinates.pt"):
        load_dataset(tmp_path)


def test_coordinates_missing_a_key(tmp_path):
    minimal_dataset(tmp_path)
    torch.save({"origin_drb": torch.zeros(3)}, tmp_path / "coordinates.pt")
    with raises_naming(tmp_path / "coordinates.pt"):
        load_dataset(tmp_path)


def test_metadata_without_image(tmp_path):
    minimal_dataset(tmp_path)
    (tmp_path / "val" / "rgbs" / "b.png").unlink()
    with raises_naming(tmp_path / "val" / "metadata" / "b.pt"):
        load_dataset(tmp_path)


def test_image_without_metadata(tmp_path):
    minimal_dataset(tmp_path)
    cv2.imwrite(str(tmp_path / "train" / "rgbs" / "z.png"), np.zeros((6, 8, 3), np.uint8))
    with raises_naming(tmp_path / "train" / "rgbs" / "z.png"):
        load_dataset(tmp_path)


def test_empty_split(tmp_path):
    minimal_dataset(tmp_path)
    (tmp_path / "val" / "metadata" / "b.pt").unlink()
    (tmp_path / "val" / "rgbs" / "b.png").unlink()
    with raises_naming(tmp_path / "val" / "metadata"):
        load_dataset(tmp_path)


def test_unreadable_image(tmp_path):
    minimal_dataset(tmp_path)
    path = tmp_path / "train" / "rgbs" / "a.png"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    m = load_dataset(tmp_path).images[0]
    with raises_naming(path):
        m.load_rgb()


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_truncated_image(tmp_path, ext):
    minimal_dataset(tmp_path, ext)
    path = tmp_path / "val" / "rgbs" / f"b{ext}"
    load_dataset(tmp_path).images[1].load_rgb()  # intact, it reads
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    m = load_dataset(tmp_path).images[1]
    with raises_naming(path):
        m.load_rgb()


@pytest.mark.parametrize("cut", [2, 1, 300])
def test_jpeg_missing_its_end_is_truncated_but_trailing_data_is_fine(tmp_path, cut):
    minimal_dataset(tmp_path, ".jpg")
    path = tmp_path / "val" / "rgbs" / "b.jpg"
    data = path.read_bytes()
    path.write_bytes(data + b"\x00\x00\x00\x18ftypmp42\xff\xda\x00\x08")  # e.g. a motion photo's video
    expected = load_dataset(tmp_path).images[1].load_rgb()
    assert expected.shape[-1] == 3
    path.write_bytes(data[:-cut])
    with raises_naming(path):
        load_dataset(tmp_path).images[1].load_rgb()


def test_image_size_disagrees_with_metadata(tmp_path):
    minimal_dataset(tmp_path)
    meta = tmp_path / "train" / "metadata" / "a.pt"
    torch.save({**torch.load(meta, weights_only=True), "W": 10}, meta)
    m = load_dataset(tmp_path).images[0]
    assert m.W == 10
    with raises_naming(tmp_path / "train" / "rgbs" / "a.png"):
        m.load_rgb()


def corrupt_metadata(root: Path, **changes: object) -> Path:
    """Replace keys in the train image's metadata; return that file."""
    meta = root / "train" / "metadata" / "a.pt"
    torch.save({**torch.load(meta, weights_only=True), **changes}, meta)
    return meta


@pytest.mark.parametrize("changes", [
    {"c2w": torch.eye(4)},
    {"c2w": torch.eye(3)},
    {"c2w": torch.cat([torch.eye(3), torch.tensor([[float("nan")], [0.0], [0.0]])], 1)},
    {"intrinsics": torch.tensor([10.0, float("inf"), 4.0, 3.0])},
    {"c2w": torch.cat([1.1 * torch.eye(3), torch.zeros(3, 1)], 1)},
    {"c2w": torch.cat([torch.tensor([[1.0, 0.3, 0], [0, 1, 0], [0, 0, 1]]), torch.zeros(3, 1)], 1)},
    {"c2w": torch.cat([torch.diag(torch.tensor([1.0, 1.0, -1.0])), torch.zeros(3, 1)], 1)},
    {"intrinsics": torch.tensor([10.0, 10.0, 4.0])},
    {"intrinsics": torch.tensor([10.0, 0.0, 4.0, 3.0])},
    {"distortion": torch.tensor([0.1, float("nan"), 0, 0, 0])},
    {"W": "abc"},
    {"H": 6.5},
    {"intrinsics": "10 10 4 3"},
    {"distortion": "none"},
    {"distortion": torch.tensor([0.1, 0.0, 0.0])},
    {"c2w": [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1]]},
], ids=["c2w4x4", "c2w3x3", "c2w_nan", "intrinsics_inf", "scaled_rotation", "sheared_rotation",
        "reflection", "three_intrinsics", "zero_focal", "distortion_nan", "W_text", "H_fraction", "intrinsics_text",
        "distortion_text", "three_distortion_coefficients", "ragged_c2w"])
def test_bad_metadata_values(tmp_path, changes):
    meta = corrupt_metadata(minimal_dataset(tmp_path), **changes)
    with raises_naming(meta):
        load_dataset(tmp_path)


def test_metadata_missing_a_key(tmp_path):
    minimal_dataset(tmp_path)
    meta = tmp_path / "val" / "metadata" / "b.pt"
    data = torch.load(meta, weights_only=True)
    del data["c2w"]
    torch.save(data, meta)
    with raises_naming(meta):
        load_dataset(tmp_path)


# A command whose main leaves work behind: output not flushed, a thread pool's task still running, an exit handler.
LEAVES_WORK = """
import atexit, concurrent.futures, sys, time
from mega_nerf.errors import run_cli
pool = concurrent.futures.ThreadPoolExecutor(1)
class TornDown:  # Python's teardown finalises it (what it needs is kept with it); the quick exit does not
    def __init__(self, path):
        self.path, self.open = path, open
    def __del__(self):
        self.open(self.path, "w").write("torn down")
kept = TornDown(sys.argv[3])
def main():
    sys.stdout.write("buffered")
    pool.submit(lambda: time.sleep(0.5) or open(sys.argv[1], "w").write("written"))
    atexit.register(lambda: open(sys.argv[2], "w").write("ran"))
run_cli(main)
"""


def test_run_cli_prints_one_line_and_exits_2(tmp_path):
    missing = tmp_path / "no_such_dataset"
    code = f"from mega_nerf.data.dataset import load_dataset; from mega_nerf.errors import run_cli; " \
           f"run_cli(lambda: load_dataset({str(missing)!r}))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("error: ") and str(missing) in result.stderr and result.stderr.count("\n") == 1


def test_a_command_ends_once_its_work_is_done(tmp_path, monkeypatch):
    """run_cli ends the process without Python's teardown (errors.end_process), but only after what a normal exit
    waits for: a thread pool's pending task, the exit handlers, the buffered output. In this process (QUICK_EXIT
    off: tests/conftest.py) and where threading lacks its shutdown hook, a plain SystemExit with the code."""
    done, handler, teardown = tmp_path / "task", tmp_path / "handler", tmp_path / "teardown"
    result = subprocess.run([sys.executable, "-c", LEAVES_WORK, str(done), str(handler), str(teardown)],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0 and result.stdout == "buffered" and result.stderr == ""
    assert done.read_text() == "written" and handler.read_text() == "ran"
    assert not teardown.exists()  # the teardown was skipped
    plain = subprocess.run([sys.executable, "-c", LEAVES_WORK.replace("run_cli(main)", "main()"), str(done),
                            str(handler), str(teardown)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert plain.returncode == 0 and teardown.read_text() == "torn down"  # as Python's own exit does
    for quick in (False, True):  # True: the hook is missing
        monkeypatch.setattr(mega_nerf.errors, "QUICK_EXIT", quick)
        if quick:
            monkeypatch.delattr(threading, "_shutdown")
        with pytest.raises(SystemExit) as exit_info:
            end_process(3)
        assert exit_info.value.code == 3


@pytest.mark.parametrize("scale", ["abc", [1.0, 2.0], None])
def test_coordinates_of_the_wrong_type_are_one_line(tmp_path, scale):
    minimal_dataset(tmp_path)
    torch.save({"origin_drb": torch.zeros(3), "pose_scale_factor": scale}, tmp_path / "coordinates.pt")
    with pytest.raises(UserError, match=re.escape(str(tmp_path / "coordinates.pt")) + ": 'pose_scale_factor'"):
        load_dataset(tmp_path)


@pytest.mark.parametrize("content", [b"garbage bytes", "numpy"])
def test_metadata_that_is_not_a_plain_torch_file_is_one_line(tmp_path, content):
    """Foreign bytes, or numpy arrays (which weights_only refuses): one line, not PyTorch's advice."""
    minimal_dataset(tmp_path)
    meta = tmp_path / "train" / "metadata" / "a.pt"
    if content == "numpy":
        torch.save({"W": 8, "H": 6, "intrinsics": np.ones(4), "c2w": np.eye(3, 4)}, meta)
    else:
        meta.write_bytes(content)
    with pytest.raises(UserError) as error:
        load_dataset(tmp_path)
    assert str(error.value).startswith(f"{meta}: unreadable or truncated torch file") and "\n" not in str(error.value)


def test_a_folder_inside_a_dataset_is_refused_as_an_output(tmp_path: Path) -> None:
    """A dataset (a folder holding coordinates.pt) and every folder in its splits, existing or not, are refused in
    one line naming the dataset; a folder beside it, or beside its splits inside it, passes."""
    data = tmp_path / "data"
    (data / "train" / "rgbs").mkdir(parents=True)
    (data / "coordinates.pt").write_bytes(b"")
    with pytest.raises(UserError) as refused:
        check_not_in_dataset(data)
    assert str(refused.value) == f"{data}: a dataset's folder; give this run's output a folder of its own"
    for inside, split in ((data / "train" / "rgbs", "train"), (data / "val", "val"),
                          (data / "exp" / ".." / "train" / "x", "train")):
        with pytest.raises(UserError) as refused:
            check_not_in_dataset(inside)
        assert str(refused.value) == f"{inside}: inside the dataset {data}'s {split} images; give this run's " \
                                     "output a folder of its own"
    check_not_in_dataset(tmp_path / "render")
    check_not_in_dataset(data / "runs" / "render")
    assert dataset_holding(tmp_path / "render") is None and dataset_holding(data / "val" / "x") == data
