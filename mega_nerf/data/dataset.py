"""Read and write Mega-NeRF's dataset layout, validating it so that bad input fails in one clear line.

Layout (see docs/DESIGN.md):
    coordinates.pt                  {'origin_drb': (3,), 'pose_scale_factor': float}
    {train,val}/rgbs/<stem>.<ext>   ext in jpg, JPG, png, PNG
    {train,val}/metadata/<stem>.pt  {'W', 'H', 'intrinsics': [fx, fy, cx, cy], 'c2w': (3, 4), 'distortion'?}

Image indices (for appearance embeddings) count train and val together, sorted by metadata file name, as
Mega-NeRF does.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from mega_nerf.errors import UserError
from mega_nerf.io import load_torch, save_torch_atomic, write_bgr

SPLITS = ("train", "val")
COORDINATES = "coordinates.pt"  # every Mega-NeRF dataset's root holds it
# Evaluation protocols: Mega-NeRF's trains the left half of each val image and scores the right half; strict trains
# no pixel of a val image, scores it whole and renders it with the nearest training image's appearance.
MEGA_NERF, STRICT = "mega-nerf", "strict"
PROTOCOLS = (MEGA_NERF, STRICT)
IMAGE_EXTENSIONS = (".jpg", ".JPG", ".png", ".PNG", ".jpeg", ".JPEG")
# Largest entry of |R^T R - I| a camera rotation may have: metadata stored in float32, or a converter's float
# output, is orthonormal to about 1e-6; a scaled or sheared matrix is off by far more.
ORTHONORMAL_TOLERANCE = 1e-2
OPENCV_COEFFICIENTS = (4, 5, 8, 12, 14)  # distortion vector lengths cv2.undistort takes


@dataclass
class Coordinates:
    """How normalised positions relate to the real world:
    p_norm = (p_drb - origin_drb) / pose_scale_factor."""

    origin_drb: torch.Tensor  # (3,) float64
    pose_scale_factor: float


@dataclass
class ImageMetadata:
    """One posed image at the scale it was loaded with (intrinsics already divided by `scale_factor`)."""

    name: str  # file stem, unique over train and val
    split: str
    index: int  # appearance index over train + val sorted by file name
    image_path: Path
    W: int
    H: int
    intrinsics: torch.Tensor  # (4,) fx, fy, cx, cy in pixels
    c2w: torch.Tensor  # (3, 4) float32: camera right, up, back axes and centre, normalised DRB world
    distortion: torch.Tensor | None  # OpenCV coefficients at full scale, or None
    scale_factor: int = 1

    def load_rgb(self) -> torch.Tensor:
        """The image as (H, W, 3) uint8 RGB, undistorted and downsampled to this metadata's size."""
        return torch.from_numpy(read_image(self.image_path, self.W * self.scale_factor,
                                           self.H * self.scale_factor, self.scale_factor,
                                           self.intrinsics * self.scale_factor, self.distortion))

    @property
    def scored_columns(self) -> slice:
        """`scored_columns_for` Mega-NeRF's protocol, the default."""
        return self.scored_columns_for(MEGA_NERF)

    def scored_columns_for(self, protocol: str) -> slice:
        """The columns metrics are taken on and training never sees, none of a train image. Mega-NeRF's protocol:
        a val image's right half [W // 2, W); its left half trains its appearance embedding (docs/DESIGN.md, Val
        images). Strict: the whole val image, no pixel of it trained."""
        if self.split != "val":
            return slice(self.W, self.W)
        return slice(0 if protocol == STRICT else self.W // 2, self.W)

    def scored_mask(self, protocol: str = MEGA_NERF) -> torch.Tensor:
        """(H, W) bool: the pixels of `scored_columns_for(protocol)`."""
        mask = torch.zeros(self.H, self.W, dtype=torch.bool)
        mask[:, self.scored_columns_for(protocol)] = True
        return mask

    def trained_mask(self, protocol: str = MEGA_NERF) -> torch.Tensor:
        """(H, W) bool: the pixels training may use, every pixel but the scored ones."""
        return ~self.scored_mask(protocol)


@dataclass
class Dataset:
    path: Path
    coordinates: Coordinates
    images: list[ImageMetadata]  # ordered by appearance index

    @property
    def train(self) -> list[ImageMetadata]:
        return [m for m in self.images if m.split == "train"]

    @property
    def val(self) -> list[ImageMetadata]:
        return [m for m in self.images if m.split == "val"]

    def appearance_for(self, meta: ImageMetadata, protocol: str) -> int:
        """The appearance index a val image is rendered with: its own (Mega-NeRF's protocol, trained on its left
        half) or, strict, that of the training image whose camera centre is nearest (its own was never trained)."""
        if protocol != STRICT or meta.split != "val":
            return meta.index
        train = self.train
        centres = torch.stack([m.c2w[:, 3] for m in train])
        return train[int(torch.linalg.norm(centres - meta.c2w[:, 3], dim=1).argmin())].index


def dataset_fingerprint(dataset: Dataset) -> str:
    """SHA-1 over every image's name, split, size, scale, pose and intrinsics: equal only for the same dataset at
    the same scale. Checkpoints, chunk manifests and containers record it (the partition's `image_sizes` is a
    readable, full-scale one; partition.cells)."""
    h = hashlib.sha1()
    for m in dataset.images:
        h.update(f"{m.name}/{m.split}/{m.W}/{m.H}/{m.scale_factor}".encode())
        h.update(m.c2w.numpy().tobytes())
        h.update(m.intrinsics.numpy().tobytes())
    return h.hexdigest()


def rotation_problem(rot: np.ndarray) -> str | None:
    """Why a (3, 3) matrix is not a camera rotation, as words that follow 'is': not orthonormal (beyond
    ORTHONORMAL_TOLERANCE), or a reflection (a mirrored camera: usually a converter's swapped axes); None when it
    is one."""
    if np.abs(rot.T @ rot - np.eye(3)).max() > ORTHONORMAL_TOLERANCE:
        return "not orthonormal"
    if np.linalg.det(rot) < 0:
        return "a reflection (determinant -1); check the axes"
    return None


def numbers(file: Path, key: str, value: object) -> torch.Tensor:
    """`value` of `key` in `file` as a float64 tensor (its shape kept) of at least one number; UserError naming
    both when it is text or anything else that is not numbers (a converter's or a hand edit's mistake)."""
    try:
        if isinstance(value, (str, bytes)):
            raise TypeError
        tensor = torch.as_tensor(value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise UserError(f"{file}: '{key}' must be numbers, got {type(value).__name__} {str(value)[:40]!r}") from None
    if tensor.numel() == 0:
        raise UserError(f"{file}: '{key}' is empty")
    return tensor


def load_coordinates(path: Path) -> Coordinates:
    """Read `coordinates.pt`, checking its keys and values."""
    file = Path(path) / COORDINATES
    if not file.is_file():
        raise UserError(f"{file}: missing (every Mega-NeRF dataset has coordinates.pt)")
    data = load_torch(file, "torch file")
    if not isinstance(data, dict) or not {"origin_drb", "pose_scale_factor"} <= set(data):
        raise UserError(f"{file}: needs keys 'origin_drb' and 'pose_scale_factor'")
    origin = numbers(file, "origin_drb", data["origin_drb"]).flatten()
    scale_value = numbers(file, "pose_scale_factor", data["pose_scale_factor"])
    if scale_value.numel() != 1:
        raise UserError(f"{file}: 'pose_scale_factor' must be one number, got {scale_value.numel()}")
    scale = float(scale_value)
    if origin.numel() != 3 or not torch.isfinite(origin).all():
        raise UserError(f"{file}: 'origin_drb' must be 3 finite numbers")
    if not np.isfinite(scale) or scale <= 0:
        raise UserError(f"{file}: 'pose_scale_factor' must be a positive finite number, got {scale}")
    return Coordinates(origin, scale)


def _find_images(rgb_dir: Path) -> dict[str, Path]:
    images: dict[str, Path] = {}
    for p in sorted(rgb_dir.iterdir()) if rgb_dir.is_dir() else []:
        if p.suffix in IMAGE_EXTENSIONS:
            if p.stem in images:
                raise UserError(f"{p}: two images share the stem '{p.stem}'")
            images[p.stem] = p
    return images


def _parse_metadata(file: Path, image_path: Path, split: str, scale_factor: int) -> ImageMetadata:
    data = load_torch(file, "torch file")
    if not isinstance(data, dict) or not {"W", "H", "intrinsics", "c2w"} <= set(data):
        raise UserError(f"{file}: needs keys 'W', 'H', 'intrinsics' and 'c2w'")
    size = [numbers(file, key, data[key]) for key in ("W", "H")]
    if any(v.numel() != 1 or v.flatten()[0] != v.flatten()[0].round() for v in size):
        raise UserError(f"{file}: W and H must be whole numbers, got {data['W']!r} and {data['H']!r}")
    W, H = (int(v.flatten()[0]) for v in size)
    if W <= 0 or H <= 0:
        raise UserError(f"{file}: W and H must be positive, got {W}x{H}")
    if W % scale_factor or H % scale_factor:
        raise UserError(f"{file}: size {W}x{H} is not divisible by scale factor {scale_factor}")
    intrinsics = numbers(file, "intrinsics", data["intrinsics"]).flatten()
    c2w = numbers(file, "c2w", data["c2w"])
    if intrinsics.numel() != 4:
        raise UserError(f"{file}: 'intrinsics' must be [fx, fy, cx, cy], got {intrinsics.numel()} values")
    if c2w.shape != (3, 4):
        raise UserError(f"{file}: 'c2w' must be 3x4, got {tuple(c2w.shape)}")
    if not (torch.isfinite(c2w).all() and torch.isfinite(intrinsics).all()):
        raise UserError(f"{file}: 'c2w' or 'intrinsics' holds non-finite values")
    if (intrinsics[:2] <= 0).any():
        raise UserError(f"{file}: focal lengths fx, fy must be positive, got {intrinsics[:2].tolist()}")
    problem = rotation_problem(c2w[:, :3].numpy())
    if problem is not None:
        raise UserError(f"{file}: the rotation in 'c2w' is {problem}")
    distortion = data.get("distortion")
    if distortion is not None:
        distortion = numbers(file, "distortion", distortion).flatten()
        if distortion.numel() not in OPENCV_COEFFICIENTS:
            raise UserError(f"{file}: 'distortion' must hold {', '.join(map(str, OPENCV_COEFFICIENTS))} OpenCV "
                            f"coefficients, got {distortion.numel()}")
        if not torch.isfinite(distortion).all():
            raise UserError(f"{file}: 'distortion' holds non-finite values")
        if not distortion.abs().gt(0).any():
            distortion = None
    return ImageMetadata(name=file.stem, split=split, index=-1, image_path=image_path,
                         W=W // scale_factor, H=H // scale_factor,
                         intrinsics=(intrinsics / scale_factor).float(),
                         c2w=c2w.float(), distortion=distortion, scale_factor=scale_factor)


def load_dataset(path: str | os.PathLike, scale_factor: int = 1) -> Dataset:
    """Read and validate a dataset; raise `UserError` naming the first bad file."""
    root = Path(path)
    if not root.is_dir():
        raise UserError(f"{root}: dataset directory not found")
    if scale_factor < 1 or int(scale_factor) != scale_factor:
        raise UserError(f"scale factor must be a positive integer, got {scale_factor}")
    coordinates = load_coordinates(root)
    images: list[ImageMetadata] = []
    for split in SPLITS:
        meta_dir, rgb_dir = root / split / "metadata", root / split / "rgbs"
        if not meta_dir.is_dir():
            raise UserError(f"{meta_dir}: missing")
        rgbs = _find_images(rgb_dir)
        metas = sorted(p for p in meta_dir.iterdir() if p.suffix == ".pt")
        if not metas:
            raise UserError(f"{meta_dir}: the {split} split is empty")
        for file in metas:
            if file.stem not in rgbs:
                raise UserError(f"{file}: no matching image in {rgb_dir}")
            images.append(_parse_metadata(file, rgbs.pop(file.stem), split, int(scale_factor)))
        if rgbs:
            orphan = next(iter(rgbs.values()))
            raise UserError(f"{orphan}: image has no metadata file in {meta_dir}")
    images.sort(key=lambda m: f"{m.name}.pt")  # metadata file name, as Mega-NeRF ('a-1.pt' < 'a.pt')
    for i, m in enumerate(images):
        if i and images[i - 1].name == m.name:
            raise UserError(f"{root}: image '{m.name}' appears in both train and val")
        m.index = i
    return Dataset(root, coordinates, images)


def _jpeg_truncated(data: bytes) -> bool:
    """True when the JPEG stream ends before its end-of-image marker. Walks the marker segments (and the
    entropy-coded data after each start-of-scan, where 0xFF is followed by 0x00 or a restart marker), so data
    appended after the end marker (e.g. a motion photo's video) is allowed."""
    i = 2  # after SOI
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return True
        marker = data[i + 1]
        if marker == 0xD9:  # EOI
            return False
        if marker == 0xFF or 0xD0 <= marker <= 0xD7 or marker == 0x01:  # fill byte, RSTn, TEM: no length
            i += 1 if marker == 0xFF else 2
            continue
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
        if marker == 0xDA:  # start of scan: skip entropy-coded data up to the next real marker
            i = data.find(b"\xff", i)
            while i != -1 and i + 1 < len(data) and (data[i + 1] == 0x00 or 0xD0 <= data[i + 1] <= 0xD7):
                i = data.find(b"\xff", i + 2)
            if i == -1:
                return True
    return not data[i:i + 2] == b"\xff\xd9"


def decode_image(path: Path, flags: int = cv2.IMREAD_COLOR) -> np.ndarray:
    """Decode a whole image file to BGR uint8 with OpenCV `flags` (IMREAD_REDUCED_COLOR_8 checks a file at an
    eighth of the cost); UserError when it is missing, unreadable or truncated (a cut PNG does not decode, a cut
    JPEG decodes grey at the bottom, so its markers are walked)."""
    data = Path(path).read_bytes() if Path(path).is_file() else b""
    img = cv2.imdecode(np.frombuffer(data, np.uint8), flags) if data else None
    if img is None or (Path(path).suffix.lower() in (".jpg", ".jpeg") and _jpeg_truncated(data)):
        raise UserError(f"{path}: unreadable or truncated image")
    return img


def read_image(path: Path, W: int, H: int, scale_factor: int = 1, intrinsics: torch.Tensor | None = None,
               distortion: torch.Tensor | None = None) -> np.ndarray:
    """Decode one image to (H / scale, W / scale, 3) uint8 RGB, checking it against the metadata size."""
    img = decode_image(path)
    if img.shape[:2] != (H, W):
        raise UserError(f"{path}: image is {img.shape[1]}x{img.shape[0]} but its metadata says {W}x{H}")
    if distortion is not None:
        fx, fy, cx, cy = intrinsics.tolist()
        # OpenCV puts pixel centres at integers; our cx, cy put them at +0.5 (docs/DESIGN.md).
        K = np.array([[fx, 0, cx - 0.5], [0, fy, cy - 0.5], [0, 0, 1]])
        img = cv2.undistort(img, K, distortion.numpy())
    if scale_factor > 1:
        img = cv2.resize(img, (W // scale_factor, H // scale_factor), interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)  # 20x faster than numpy's reversed-stride copy


def write_coordinates(path: str | os.PathLike, origin_drb: torch.Tensor, pose_scale_factor: float) -> None:
    save_torch_atomic({"origin_drb": torch.as_tensor(origin_drb, dtype=torch.float64),
                       "pose_scale_factor": float(pose_scale_factor)}, Path(path) / COORDINATES)


def write_image(path: str | os.PathLike, split: str, name: str, rgb: np.ndarray, intrinsics: torch.Tensor,
                c2w: torch.Tensor, distortion: torch.Tensor | None = None, ext: str = ".png") -> None:
    """Write one image (H, W, 3 uint8 RGB) and its metadata in Mega-NeRF's layout. Tensors are copied first: a
    view (one camera of a stack) would save its whole storage."""
    root = Path(path) / split
    rgb = np.asarray(rgb)
    write_bgr(root / "rgbs" / f"{name}{ext}", rgb[:, :, ::-1])
    meta = {"W": int(rgb.shape[1]), "H": int(rgb.shape[0]),
            "intrinsics": torch.as_tensor(intrinsics, dtype=torch.float32).flatten().clone(),
            "c2w": torch.as_tensor(c2w, dtype=torch.float32).clone()}
    if distortion is not None:
        meta["distortion"] = torch.as_tensor(distortion, dtype=torch.float32).clone()
    save_torch_atomic(meta, root / "metadata" / f"{name}.pt")


def dataset_holding(path: str | os.PathLike) -> Path | None:
    """The dataset folder (one holding COORDINATES) that is `path` or a folder above it, or None."""
    path = Path(path).resolve()
    return next((folder for folder in (path, *path.parents) if (folder / COORDINATES).exists()), None)


def dataset_place(folder: str | os.PathLike) -> tuple[Path, str] | None:
    """(dataset, split) when `folder` is a dataset's own folder (split '') or lies in one of its SPLITS, where no
    output may go (their images and metadata belong to a converter or a generator, and a loader lists what is
    there); None elsewhere, other folders inside a dataset (a user's runs beside the data) included."""
    dataset = dataset_holding(folder)
    if dataset is None:
        return None
    inside = Path(folder).resolve().relative_to(dataset).parts
    if not inside or inside[0] in SPLITS:
        return dataset, inside[0] if inside else ""
    return None


def check_not_in_dataset(folder: str | os.PathLike) -> None:
    """One UserError line before anything is written when an output `folder` is a dataset's own folder or lies in
    one of its SPLITS (dataset_place)."""
    if (place := dataset_place(folder)) is None:
        return
    dataset, split = place
    if not split:
        raise UserError(f"{folder}: a dataset's folder; give this run's output a folder of its own")
    raise UserError(f"{folder}: inside the dataset {dataset}'s {split} images; give this run's output a folder of "
                    "its own")


def check_file_not_in_dataset(path: str | os.PathLike, option: str) -> None:
    """check_not_in_dataset for a single-file output `path` (given as `option`, e.g. --output): one UserError line
    naming it when its folder is a dataset's own or lies in one of its SPLITS (io.check_output, below this
    module, cannot ask)."""
    if (place := dataset_place(Path(path).parent)) is None:
        return
    dataset, split = place
    where = f"{split} images" if split else "own folder"
    raise UserError(f"{option} {path}: inside the dataset {dataset}'s {where}; choose another path")
