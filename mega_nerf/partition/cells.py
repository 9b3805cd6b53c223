"""Spatial cells: centroids on a grid, the point-to-cell rule, ray-to-cell assignment, and `params.pt`.

Centroids sit at the cell centres of a `grid_dim` = (X, Y) grid over the horizontal extent (y, z) of the
camera positions: X cells along y (right), Y along z (back); cell k = i * Y + j for the i-th y, j-th z cell.
A centroid's x (down) is the middle of the altitude slab, where rays are sampled (they are clipped to it), so
3D distances there are nearly horizontal; centroids at the cameras' altitude would add a large vertical term
for points near the ground and widen the boundary band (overlap 1.95 instead of 1.74 on the tiny city's 2 x 2).
Every centroid shares this x, so a point's nearest centroid is the same in 3D and with `cluster_2d`.

The rule (docs/DESIGN.md, Partitioning): a point belongs to cell k when its distance to centroid k is at most
`boundary_margin` times its distance to the nearest centroid; a ray belongs to every cell one of its
samples belongs to. The merged container routes points with the same `cell_membership`.
"""
from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

import torch

from mega_nerf.bounds import FOREGROUND_SCALE, contracted_axes, foreground_box
from mega_nerf.data.dataset import Dataset, ImageMetadata
from mega_nerf.errors import UserError
from mega_nerf.fields import kernels
from mega_nerf.io import load_torch, save_torch_atomic
from mega_nerf.partition.exact import DEFAULT_ARCS, Box, routed
from mega_nerf.partition.exact_kernel import exact_membership, exact_membership_reference, pixel_membership
from mega_nerf.partition.pixels import camera_table, piece_rays

EXACT = 0  # `ray_samples` of the exact rule (partition.exact); a positive count is Mega-NeRF's sampled rule


def parse_grid_dim(values: list[str] | None) -> tuple[int, int]:
    """`--grid_dim X Y` as two positive ints, or a one-line error."""
    if values is None:
        raise UserError("missing option --grid_dim (two positive integers: cells along y and along z)")
    try:
        dims = tuple(int(v) for v in values)
    except ValueError:
        dims = ()
    if len(dims) != 2 or min(dims) < 1:
        raise UserError(f"--grid_dim must be two positive integers, got {' '.join(map(str, values))!r}")
    return dims  # type: ignore[return-value]


def grid_centroids(positions: torch.Tensor, grid_dim: tuple[int, int], altitude: float) -> torch.Tensor:
    """Cell centres of a grid over the (y, z) extent of `positions` (N, 3), all at x = `altitude`.

    Returns (X * Y, 3) float32, ordered k = i * Y + j (i along y, j along z).
    """
    lo, hi = positions.min(0).values.double(), positions.max(0).values.double()
    for d, n in zip((1, 2), grid_dim, strict=True):
        if n > 1 and hi[d] <= lo[d]:
            raise UserError(f"--grid_dim: the cameras span no extent along {'yz'[d - 1]}, "
                            "so that axis takes 1 cell")
    axes = [lo[d] + (torch.arange(n, dtype=torch.float64) + 0.5) * (hi[d] - lo[d]) / n
            for d, n in zip((1, 2), grid_dim, strict=True)]
    y, z = torch.meshgrid(axes[0], axes[1], indexing="ij")
    x = torch.full_like(y, altitude)
    return torch.stack([x, y, z], -1).reshape(-1, 3).float()


def squared_distances(points: torch.Tensor, centroids: torch.Tensor, cluster_2d: bool) -> torch.Tensor:
    """(N, K) squared distances from points (N, 3) to centroids (K, 3), horizontal (y, z) only with
    `cluster_2d`; summed coordinate by coordinate: no (N, K, 3) temporary, and elementwise
    (unlike torch.cdist's matmul path), so a point's result never depends on the batch it came in."""
    total = torch.zeros(points.shape[0], centroids.shape[0], dtype=points.dtype, device=points.device)
    for d in range(1 if cluster_2d else 0, 3):
        total += (points[:, d:d + 1] - centroids[:, d]).square()
    return total


def centroid_distances(points: torch.Tensor, centroids: torch.Tensor, cluster_2d: bool) -> torch.Tensor:
    """Euclidean distance (N, K) from points (N, 3) to centroids (K, 3); horizontal (y, z) only with
    `cluster_2d`."""
    return squared_distances(points, centroids.to(points), cluster_2d).sqrt()


def cell_membership(points: torch.Tensor, centroids: torch.Tensor, boundary_margin: float,
                    cluster_2d: bool) -> torch.Tensor:
    """(N, K) bool: point n belongs to cell k when dist(n, k) <= boundary_margin * min_k' dist(n, k').

    Compared as squared distances (same order, no sqrt). The nearest cell always holds the point for a
    margin >= 1; a margin of exactly 1 gives the nearest cell only (several on exact ties).
    points: (N, 3); centroids: (K, 3) in the same normalised frame.
    """
    d2 = squared_distances(points, centroids.to(points), cluster_2d)
    return d2 <= (boundary_margin ** 2) * d2.min(1, keepdim=True).values


def ray_membership(origins: torch.Tensor, dirs: torch.Tensor, near: torch.Tensor, far: torch.Tensor,
                   centroids: torch.Tensor, ray_samples: int, boundary_margin: float, cluster_2d: bool,
                   dist_chunk: int = 1 << 18, place: Callable[[torch.Tensor], torch.Tensor] | None = None,
                   disparity: bool = False) -> torch.Tensor:
    """(N, K) bool: the cells that at least one of each ray's samples belongs to.

    origins, dirs: (N, 3); near, far: (N,); samples are `ray_samples` evenly spaced distances from near to
    far inclusive (deterministic, no jitter), or evenly spaced in 1 / t with `disparity`; `place` maps the
    sample points (M, 3) to where they are routed (the contraction, for the world beyond the foreground).
    Samples are taken in blocks so that at most about `dist_chunk` point-centroid distances exist at once,
    whatever N and K.
    """
    K = centroids.shape[0]
    steps = torch.linspace(0, 1, ray_samples, device=origins.device, dtype=origins.dtype)
    member = torch.zeros(origins.shape[0], K, dtype=torch.bool, device=origins.device)
    rays_per_block = max(1, dist_chunk // (K * ray_samples))
    samples_per_block = max(1, dist_chunk // (K * max(1, min(rays_per_block, origins.shape[0]))))
    for r in range(0, origins.shape[0], rays_per_block):
        o, d = origins[r:r + rays_per_block], dirs[r:r + rays_per_block]
        n, f = near[r:r + rays_per_block, None], far[r:r + rays_per_block, None]
        for s in range(0, ray_samples, samples_per_block):
            w = steps[s:s + samples_per_block]
            t = 1 / ((1 - w) / n + w / f) if disparity else n * (1 - w) + f * w  # (R, S)
            points = (o[:, None] + d[:, None] * t[..., None]).reshape(-1, 3)  # (R S, 3)
            inside = cell_membership(points if place is None else place(points), centroids, boundary_margin,
                                     cluster_2d)
            member[r:r + rays_per_block] |= inside.view(o.shape[0], -1, K).any(1)
    return member


def exact_ray_membership(origins: torch.Tensor, dirs: torch.Tensor, near: torch.Tensor, split: torch.Tensor,
                         far: torch.Tensor, centroids: torch.Tensor, boundary_margin: float, cluster_2d: bool,
                         dist_chunk: int, box: Box | None) -> torch.Tensor:
    """(N, K) bool without sampling (partition.exact): exact over the straight part [near, split], conservative
    over the remainder [split, far] routed by `box`'s contraction (only with a box), tested only where there is
    one: rays whose far bound lies beyond the box exit (on the synthetic city about a quarter of them; its arcs
    are most of the work). On a GPU in one kernel for float32 rays (partition.exact_kernel, which takes no
    `dist_chunk`); else rays go in blocks of about `dist_chunk` point-centroid distances."""
    if kernels.available(origins) and all(x.dtype == torch.float32 for x in (origins, dirs, near, split, far)):
        return exact_membership(origins, dirs, near, split, far, centroids, boundary_margin, cluster_2d, box)
    K, place = centroids.shape[0], routed(box)
    rows = max(1, dist_chunk // (K * max(K, 2 * DEFAULT_ARCS)))
    member = torch.empty(origins.shape[0], K, dtype=torch.bool, device=origins.device)
    for r in range(0, origins.shape[0], rows):
        part = slice(r, r + rows)
        member[part] = exact_membership_reference(origins[part], dirs[part], near[part], split[part], far[part],
                                                  centroids, boundary_margin, cluster_2d, place)
    return member


# Work per launch. A CPU keeps each (points, cells) tensor near its cache (about 1 MiB); a GPU wants few, large
# launches: a whole image at once took survey256's exact partition from 9.8 to 7.9 s (bench/RESULTS.md, seventh
# session), at most what its free memory holds: a distance takes 24-56 bytes of temporaries (both rules, 4-64 cells,
# measured on a CPU), so BYTES_PER_DISTANCE leaves room.
CPU_RAY_CHUNK, CPU_DIST_CHUNK = 1 << 16, 1 << 18
GPU_RAY_CHUNK, GPU_DIST_CHUNK = 1 << 20, 1 << 28
BYTES_PER_DISTANCE = 64


def default_chunks(device: torch.device) -> tuple[int, int]:
    """(ray_chunk, dist_chunk) for the device when the user gives none: on a GPU, bounded by its free memory."""
    if device.type != "cuda":
        return CPU_RAY_CHUNK, CPU_DIST_CHUNK
    free = torch.cuda.mem_get_info(device)[0]
    return GPU_RAY_CHUNK, max(CPU_DIST_CHUNK, min(GPU_DIST_CHUNK, free // BYTES_PER_DISTANCE))


# The exact rule's reference (partition.exact.voronoi_ends) builds (rays, K, K) float64 tensors, at least one ray
# at a time: its peak resident memory over one ray is 6.6-6.7 such tensors (measured at K = 3000 and 5000).
EXACT_PAIR_TENSORS = 7


def membership_bytes(params: PartitionParams, pixels: int, device: torch.device, ray_chunk: int,
                     dist_chunk: int) -> tuple[int, int]:
    """(host, device) bytes, at least, that `image_membership` needs at once for an image of `pixels` pixels
    (a chunk of min(ray_chunk, pixels) rays): the image's (pixels, K) bool masks on the host, and on the device
    the chunk's (rays, K) membership plus the rule's temporaries: the exact rule's reference K^2 float64 tensors
    (`EXACT_PAIR_TENSORS`, for as many rays as `exact_ray_membership` takes at once) or its kernel's (rays, K)
    uint8 output on a GPU; the sampled rule's distances (BYTES_PER_DISTANCE each, at least K of them). On the CPU
    both pools are one: add them."""
    K, rays = params.num_cells, min(ray_chunk, pixels)
    host, work = pixels * K, rays * K
    if params.ray_samples != EXACT:
        work += max(dist_chunk, K) * BYTES_PER_DISTANCE
    elif device.type == "cuda" and kernels.ENABLED and kernels.triton is not None:
        work += rays * K
    else:
        rows = min(rays, max(1, dist_chunk // (K * max(K, 2 * DEFAULT_ARCS))))
        work += rows * K * K * 8 * EXACT_PAIR_TENSORS
    if device.type == "cuda":
        host += rays * K  # the chunk's copy back
    return host, work


def image_membership(images: list[ImageMetadata], params: PartitionParams, device: torch.device,
                     ray_chunk: int = CPU_RAY_CHUNK, dist_chunk: int = CPU_DIST_CHUNK) -> list[torch.Tensor]:
    """(H, W, K) bool on the CPU per image: the cells each pixel's ray belongs to.

    Rays are made `ray_chunk` pixels at a time (row-major, partition.pixels), and several small images go into one
    chunk: on a GPU the exact rule makes each image piece's rays, bounds and cells in one launch (exact_kernel's
    pixel_membership) and copies a chunk back at once. Each ray is bounded to [near, far] and the altitude slab.
    With a foreground box (params.foreground()), the ray's part inside it is taken as it is and the part beyond
    routed where the container routes it (pulled in by the contraction: bounds.contracted_position).
    `params.ray_samples` EXACT (0) answers without sampling (partition.exact); a positive count samples as
    Mega-NeRF does: that many evenly spaced points over the part inside the box and a quarter as many, evenly
    spaced in 1 / t, beyond. A pixel's result never depends on the chunk it came in, so any sharding and any
    grouping of images give the same bits.
    """
    assert params.boundary_margin is not None and params.ray_samples is not None
    centroids = params.centroids.to(device)
    foreground = params.foreground()
    box = None if foreground is None else (foreground[0].to(device), foreground[1].to(device),
                                           torch.tensor(contracted_axes(params.ray_altitude_range), device=device))
    place = routed(box)
    cameras = camera_table(images, device)
    bounds = (params.near, params.far, params.ray_altitude_range)
    rule = (params.boundary_margin, params.cluster_2d)
    in_kernel = params.ray_samples == EXACT and kernels.available(cameras)
    out = [torch.empty(image.H * image.W, params.num_cells, dtype=torch.bool) for image in images]
    for pieces in _chunks(images, ray_chunk):
        widths = [(i, images[i].W, first, last) for i, first, last in pieces]
        if in_kernel:
            member = pixel_membership(cameras, widths, *bounds, centroids, *rule, box)
        else:
            origins, dirs, near, split, far = piece_rays(cameras, widths, *bounds, box)
            if params.ray_samples == EXACT:
                member = exact_ray_membership(origins, dirs, near, split, far, centroids, *rule, dist_chunk, box)
            else:
                member = ray_membership(origins, dirs, near, split, centroids, params.ray_samples, *rule, dist_chunk,
                                        place)
                if place is not None:
                    member |= ray_membership(origins, dirs, split, far, centroids, max(2, params.ray_samples // 4),
                                             *rule, dist_chunk, place, disparity=True)
        member, at = member.cpu(), 0
        for i, first, last in pieces:
            out[i][first:last] = member[at:at + last - first]
            at += last - first
    return [o.view(image.H, image.W, -1) for o, image in zip(out, images, strict=True)]


def _chunks(images: list[ImageMetadata], ray_chunk: int) -> list[list[tuple[int, int, int]]]:
    """The images' pixels in order, cut into chunks of at most `ray_chunk`: each a list of pieces (image index,
    first pixel, end pixel), a piece ending where its image or its chunk does."""
    chunks, current, room = [], [], ray_chunk
    for i, image in enumerate(images):
        first = 0
        while first < image.H * image.W:
            last = min(image.H * image.W, first + room)
            current.append((i, first, last))
            room -= last - first
            first = last
            if room == 0:
                chunks.append(current)
                current, room = [], ray_chunk
    return chunks + [current] if current else chunks


@dataclass
class PartitionParams:
    """Everything later stages need to reuse a partition (`<masks>/params.pt`).

    Distances (near, far, altitude range, positions) are normalised. `image_sizes` (stem -> (H, W), sorted
    by stem) fingerprints the dataset the masks were made from; it, `boundary_margin` and `ray_samples` are
    None in a `params.pt` written by Mega-NeRF, which lacks them.
    """

    origin_drb: torch.Tensor  # (3,) float64
    pose_scale_factor: float
    ray_altitude_range: tuple[float, float]  # normalised (top, ground) down-coordinates
    near: float
    far: float
    centroids: torch.Tensor  # (K, 3) float32
    grid_dim: tuple[int, int]
    min_position: torch.Tensor  # (3,) camera positions' minimum
    max_position: torch.Tensor  # (3,)
    cluster_2d: bool
    boundary_margin: float | None = None
    ray_samples: int | None = None
    image_sizes: dict[str, tuple[int, int]] | None = None
    foreground_scale: float | None = None  # None (older files): rays are not clipped to the foreground box
    fingerprint: str | None = None  # partition_fingerprint of the dataset; None in older files

    def foreground(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The foreground box (bounds.foreground_box) the fields of this partition share, or None."""
        if self.foreground_scale is None:
            return None
        return foreground_box(torch.stack([self.min_position, self.max_position]), self.ray_altitude_range,
                              self.foreground_scale)

    @property
    def num_cells(self) -> int:
        return self.centroids.shape[0]

    def save(self, path: Path) -> None:
        """Write atomically, as plain types and tensors (loads with weights_only=True; the bytes depend on the
        values only, io.save_torch_atomic)."""
        save_torch_atomic(asdict(self), path)

    def differences(self, other: PartitionParams) -> list[str]:
        """Names of the fields that differ."""
        def same(a: object, b: object) -> bool:
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
                return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
            return a == b
        return [f.name for f in fields(self) if not same(getattr(self, f.name), getattr(other, f.name))]

    def check_dataset(self, dataset: Dataset, source: Path) -> None:
        """UserError when `source` (this params file) was made from another dataset: names or sizes, or (files
        that record it) poses. `dataset` may be loaded at any scale."""
        if self.image_sizes is None:
            return
        sizes = dataset_image_sizes(dataset)
        if sizes != self.image_sizes:
            odd = sorted(set(sizes.items()) ^ set(self.image_sizes.items()))
            raise UserError(f"{source}: made from another dataset than {dataset.path} "
                            f"({len(odd)} image names or sizes differ, e.g. '{odd[0][0]}')")
        if self.fingerprint is not None and self.fingerprint != partition_fingerprint(dataset):
            raise UserError(f"{source}: made from another dataset than {dataset.path} (same image names and "
                            "sizes, other poses); partition this dataset")

    def check_cell(self, cell: str, source: Path) -> int:
        """Cell `cell` (a mask folder's name) as an index; UserError when this partition has no such cell."""
        if not cell.isdigit() or int(cell) >= self.num_cells:
            raise UserError(f"{source}: the partition there has cells 0-{self.num_cells - 1}, not '{cell}'")
        return int(cell)


def make_params(dataset: Dataset, grid_dim: tuple[int, int], near: float, far: float,
                altitude_range: tuple[float, float], boundary_margin: float, cluster_2d: bool,
                ray_samples: int, foreground_scale: float | None = FOREGROUND_SCALE) -> PartitionParams:
    """The partition of `dataset`: a grid over its train and val camera positions (normalised units)."""
    positions = torch.stack([m.c2w[:, 3] for m in dataset.images])
    coordinates = dataset.coordinates
    return PartitionParams(
        origin_drb=coordinates.origin_drb.clone(), pose_scale_factor=coordinates.pose_scale_factor,
        ray_altitude_range=(float(altitude_range[0]), float(altitude_range[1])),
        near=float(near), far=float(far), grid_dim=grid_dim,
        centroids=grid_centroids(positions, grid_dim, sum(altitude_range) / 2),
        min_position=positions.min(0).values, max_position=positions.max(0).values,
        cluster_2d=bool(cluster_2d), boundary_margin=float(boundary_margin), ray_samples=int(ray_samples),
        image_sizes=dataset_image_sizes(dataset), foreground_scale=foreground_scale,
        fingerprint=partition_fingerprint(dataset))


def dataset_image_sizes(dataset: Dataset) -> dict[str, tuple[int, int]]:
    """A readable dataset fingerprint: image stem -> full-scale (H, W), sorted by stem."""
    return {m.name: (m.H * m.scale_factor, m.W * m.scale_factor) for m in sorted(dataset.images, key=lambda m: m.name)}


def partition_fingerprint(dataset: Dataset) -> str:
    """SHA-1 over every image's name, split, full-scale size and pose (c2w as stored): what masks depend on, and
    the same at any --train_scale_factor, so that masks of another dataset with the same names and sizes are
    refused (data.dataset.dataset_fingerprint differs between scales)."""
    h = hashlib.sha1()
    for m in dataset.images:
        h.update(f"{m.name}/{m.split}/{m.W * m.scale_factor}/{m.H * m.scale_factor}".encode())
        h.update(m.c2w.numpy().tobytes())
    return h.hexdigest()


def check_cell_masks(mask_dir: Path, dataset: Dataset) -> int | None:
    """The cell index of a training run's mask folder `<masks>/<k>`, after checking that the partition in
    `<masks>/params.pt` was made from `dataset` and has cell k, and that the folder holds files (one-line
    UserErrors; even a cell without rays has a mask per image). None when the folder has no params.pt beside it
    (loose masks: their sizes are still checked as they are read)."""
    if (mask_dir / "params.pt").is_file():
        raise UserError(f"--cluster_mask_path: {mask_dir} is a whole partition's folder; give one cell's, "
                        f"e.g. {mask_dir / '0'}")
    if not any(p.is_file() for p in mask_dir.iterdir()):  # else named as chunks of other masks, or a missing mask
        raise UserError(f"--cluster_mask_path: {mask_dir} holds no masks (emptied, or not yet written: make the "
                        "partition again with scripts/create_cluster_masks.py)")
    file = mask_dir.parent / "params.pt"
    if not file.is_file():
        return None
    params = load_params(file)
    params.check_dataset(dataset, file)
    return params.check_cell(mask_dir.name, mask_dir)


def _pair(value: object, cast: type) -> tuple:
    items = tuple(cast(v) for v in (value.tolist() if isinstance(value, torch.Tensor) else value))
    if len(items) != 2:
        raise ValueError("expected two values")
    return items


def params_file(path: str | os.PathLike) -> Path:
    """The partition's `params.pt`: `path` itself, or the file of that name in the mask folder `path`."""
    file = Path(path)
    return file / "params.pt" if file.is_dir() else file


def load_params(path: str | os.PathLike) -> PartitionParams:
    """Read `params.pt` (ours or Mega-NeRF's; `path` may be its mask folder); UserError naming the file when
    missing or malformed."""
    file = params_file(path)
    if not file.is_file():
        raise UserError(f"{file}: partition parameters missing (made by scripts/create_cluster_masks.py)")
    data = load_torch(file, "partition params file")
    try:
        optional = {f.name for f in fields(PartitionParams) if f.default is not MISSING}
        required = {f.name for f in fields(PartitionParams)} - optional
        if not isinstance(data, dict) or not required <= set(data):
            raise ValueError(f"needs keys {sorted(required)}")
        sizes = data.get("image_sizes")
        params = PartitionParams(
            origin_drb=torch.as_tensor(data["origin_drb"], dtype=torch.float64).reshape(3),
            pose_scale_factor=float(data["pose_scale_factor"]),
            ray_altitude_range=_pair(data["ray_altitude_range"], float),
            near=float(data["near"]), far=float(data["far"]),
            centroids=torch.as_tensor(data["centroids"], dtype=torch.float32).reshape(-1, 3),
            grid_dim=_pair(data["grid_dim"], int),
            min_position=torch.as_tensor(data["min_position"]).reshape(3),
            max_position=torch.as_tensor(data["max_position"]).reshape(3),
            cluster_2d=bool(data["cluster_2d"]),
            boundary_margin=None if data.get("boundary_margin") is None else float(data["boundary_margin"]),
            ray_samples=None if data.get("ray_samples") is None else int(data["ray_samples"]),
            image_sizes=None if sizes is None else {str(k): _pair(v, int) for k, v in sizes.items()},
            foreground_scale=None if data.get("foreground_scale") is None else float(data["foreground_scale"]),
            fingerprint=None if data.get("fingerprint") is None else str(data["fingerprint"]))
    except (ValueError, TypeError, LookupError, RuntimeError, AttributeError) as e:  # a value of the wrong kind
        raise UserError(f"{file}: not a valid partition params file ({type(e).__name__}: {e})") from None
    if math.prod(params.grid_dim) != params.num_cells:
        raise UserError(f"{file}: grid_dim {params.grid_dim} does not match {params.num_cells} centroids")
    return params

