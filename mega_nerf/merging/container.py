"""The merged model: every cell's submodule behind one `Field`, each sample point routed to the cells near it.

Routing (docs/DESIGN.md, The container): a point goes to every cell whose centroid lies within `boundary_margin`
times the distance to its nearest centroid (`partition.cell_membership`, horizontal only with `cluster_2d`),
the rule that gave each submodule its training rays. Density and colour are blended with inverse-distance
weights normalised to sum to 1. Mega-NeRF's weights jump from 1/d to 0 where a cell stops being a member; ours
taper linearly to zero at that edge (`blend_weights`), so a point moving across it sees a continuous blend. A
point with a single member gets that submodule's output exactly (its weight is exactly 1). Cells without rays
(empty) are left out: their points route among the rest. A margin of 1 routes to the nearest cell only.

Empty space: when the submodules are hash fields sharing one box and occupancy resolution (as merged ones do), the
container keeps one union grid (`union_occupancy`), so the renderer's "may this point hold density?" is a single
lookup rather than a routing of every sample; the exact, routed answer gates each submodule's density in forward.

The container file (`merged.pt`, written by `mega_nerf.merging.merge`; loads with torch.load(weights_only=True)):
    version, kind = "container"
    centroids (K, 3) float32, boundary_margin, cluster_2d      the partition (from masks/params.pt)
    render {samples, fine_samples, bg_samples}, scene {near, far, altitude_range}   as trained, normalised
    dataset (fingerprint of the training dataset), n_images, eval_protocol (which val pixels trained; absent: mega-nerf)
    val_embeddings_only (whether those pixels trained only their images' embeddings; absent: false)
    submodules: K entries, None for an empty or missing cell, else {field_config, model, step}
The models are inference-only state dicts: hash tables in float16 (where finite), no occupancy running
density (only the mask is needed to skip empty space).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mega_nerf.bounds import box_to_world
from mega_nerf.data.dataset import MEGA_NERF
from mega_nerf.errors import UserError
from mega_nerf.fields import build_field
from mega_nerf.fields.base import BoxField, Field
from mega_nerf.fields.hash import HashField
from mega_nerf.fields.occupancy import GridLookup
from mega_nerf.io import load_torch, save_torch_atomic
from mega_nerf.partition.cells import squared_distances
from mega_nerf.rays import SceneBounds
from mega_nerf.render import RenderConfig

VERSION = 1
KIND = "container"
HALF_SUFFIXES = ("grid.table",)  # hash tables: most of a hash field's bytes, and tolerant of float16
TRAINING_ONLY = ("occupancy.density",)  # the occupancy grid's running maximum: only updates need it
_TINY = 1e-12  # distances below this count as zero (a point on a centroid)


def blend_weights(points: torch.Tensor, centroids: torch.Tensor, boundary_margin: float,
                  cluster_2d: bool) -> torch.Tensor:
    """(N, K) weights of each point's cells, each row summing to 1.

    Member cells (`cell_membership`) get 1 / distance, times a taper (m - r) / (m - 1) clamped to [0, 1], where
    r = distance / nearest distance and m = boundary_margin: 1 for the nearest cell, 0 where membership ends.
    points: (N, 3); centroids: (K, 3).
    """
    d2 = squared_distances(points, centroids.to(points), cluster_2d)
    nearest2 = d2.min(1, keepdim=True).values
    member = d2 <= (boundary_margin ** 2) * nearest2  # cell_membership, from the same distances
    dist = d2.sqrt()
    ratio = dist / nearest2.sqrt().clamp_min(_TINY)
    if boundary_margin > 1:
        taper = ((boundary_margin - ratio) / (boundary_margin - 1)).clamp(0, 1)
    else:
        taper = torch.ones_like(ratio)
    weights = torch.where(member, taper / dist.clamp_min(_TINY), torch.zeros_like(dist))
    return weights / weights.sum(1, keepdim=True)


def union_occupancy(masks: torch.Tensor, edges: list[torch.Tensor], centroids: torch.Tensor,
                    boundary_margin: float, cluster_2d: bool) -> torch.Tensor:
    """(r^3,) bool: grid cells where some submodule that may be routed to a point of the cell is occupied.

    masks: (K, r^3) the submodules' occupancy grids over one shared domain, whose cells along axis d lie between
    world coordinates edges[d] (r + 1,) (infinite at a contracted axis' ends); centroids (K, 3).
    A point p of cell B is a member of cell k only if d_k(p) <= m * min_j d_j(p), so only if
    near_k(B) <= m * min_j far_j(B), with near/far the smallest and largest distance from a centroid to the cell's
    box: the result is a superset of the routed occupancy of every point in the cell.
    """
    K, r = masks.shape[0], round(masks.shape[1] ** (1 / 3))
    near2, far2 = [], []
    for d in range(3):
        lo, hi, c = edges[d][:-1, None], edges[d][1:, None], centroids[:, d].double()  # (r, 1), (r, 1), (K,)
        scale = 0.0 if cluster_2d and d == 0 else 1.0  # cluster_2d: horizontal (y, z) distances only
        near2.append(scale * ((lo - c).clamp_min(0) + (c - hi).clamp_min(0)).square())  # (r, K)
        far2.append(scale * torch.maximum((c - lo).abs(), (c - hi).abs()).square())
    grids = masks.view(K, r, r, r).permute(1, 2, 3, 0)  # (x, y, z, K)
    out = torch.zeros(r, r, r, dtype=torch.bool)
    for i in range(r):  # one x slab at a time: (r, r, K) temporaries
        near = near2[0][i] + near2[1][:, None] + near2[2][None]
        far = far2[0][i] + far2[1][:, None] + far2[2][None]
        # The slack covers float32 rounding: a sample's cell comes from its float32 position, the bound from
        # the cell's box in float64.
        reach = near <= boundary_margin ** 2 * far.min(-1, keepdim=True).values * (1 + 1e-5)
        out[i] = (reach & grids[i]).any(-1)
    return out.reshape(-1)


def grid_edges(field: HashField) -> list[torch.Tensor]:
    """World coordinates (float64) of the occupancy cells' edges along each axis, (r + 1,) each."""
    r = field.occupancy.resolution
    u = (torch.arange(r + 1, dtype=torch.float64) / r)[:, None].expand(r + 1, 3)
    world = box_to_world(u, field.box_min.double().cpu(), field.box_max.double().cpu(), field.contracted.cpu())
    return [world[:, d] for d in range(3)]


class Container(Field):
    """The submodules of a partition as one field. `submodules[k]` belongs to centroid k (None: empty cell)."""

    def __init__(self, centroids: torch.Tensor, submodules: list[Field | None], boundary_margin: float,
                 cluster_2d: bool) -> None:
        super().__init__()
        assert len(submodules) == centroids.shape[0], "one submodule (or None) per centroid"
        self.cells = [k for k, field in enumerate(submodules) if field is not None]
        assert self.cells, "a container needs at least one non-empty submodule"
        self.register_buffer("centroids", centroids[self.cells].float().clone())
        self.submodules = nn.ModuleList(submodules[k] for k in self.cells)
        self.boundary_margin, self.cluster_2d = float(boundary_margin), bool(cluster_2d)
        self.register_buffer("occupancy_mask", self._union_grid(), persistent=False)

    def _union_grid(self) -> torch.Tensor | None:
        """`union_occupancy` of the submodules when they are hash fields on one box and grid, else None."""
        fields = list(self.submodules)
        if not all(isinstance(f, HashField) for f in fields):
            return None
        first = fields[0]
        if any(not (torch.equal(f.box_min, first.box_min) and torch.equal(f.box_max, first.box_max)
                    and torch.equal(f.contracted, first.contracted)
                    and f.occupancy.resolution == first.occupancy.resolution) for f in fields):
            return None
        masks = torch.stack([f.occupancy.mask.cpu() for f in fields])
        return union_occupancy(masks, grid_edges(first), self.centroids.cpu(), self.boundary_margin,
                               self.cluster_2d)

    def weights(self, positions: torch.Tensor) -> torch.Tensor:
        """(N, 3) -> (N, S) blend weights over the non-empty submodules (S = len(self.cells)). Far points beyond
        the shared foreground box are routed where the contraction puts them (BoxField.contracted_position)."""
        if isinstance(self.submodules[0], BoxField):
            positions = self.submodules[0].contracted_position(positions)
        return blend_weights(positions, self.centroids, self.boundary_margin, self.cluster_2d)

    def routes(self, positions: torch.Tensor) -> list[tuple[Field, torch.Tensor, torch.Tensor]]:
        """Per non-empty submodule that sees points: (field, indices (M,) of its points, their weights (M,)).
        One nonzero over all submodules and one read of the counts: two host syncs however many cells."""
        weights = self.weights(positions).T  # (S, N)
        routed = weights > 0
        counts = routed.sum(1).tolist()
        pairs = routed.nonzero()  # (submodule, point), grouped by submodule
        out = []
        for s, (field, rows) in enumerate(zip(self.submodules, pairs.split(counts), strict=True)):
            if rows.numel():
                index = rows[:, 1]
                out.append((field, index, weights[s, index]))
        return out

    def forward(self, positions: torch.Tensor, directions: torch.Tensor, appearance: torch.Tensor,
                ray_of: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Blend of the routed submodules, each run once on its points. Each submodule's density counts only
        where its own occupancy grid says occupied, as when it renders alone."""
        density = torch.zeros(positions.shape[0], device=positions.device)
        rgb = torch.zeros(positions.shape[0], 3, device=positions.device)
        for field, index, w in self.routes(positions):
            points = positions[index]
            if ray_of is None:  # per-point directions: the submodule needs only its own points'
                sigma, color = field(points, directions[index], appearance[index])
            else:  # per-ray directions: its points keep pointing at their rays
                sigma, color = field(points, directions, appearance, ray_of[index])
            sigma = sigma.float() * field.occupied(points)
            density.index_add_(0, index, w * sigma)
            rgb.index_add_(0, index, w[:, None] * color.float())
        return density, rgb

    def occupied(self, positions: torch.Tensor) -> torch.Tensor:
        """(N, 3) -> (N,) bool: True wherever a submodule the point is routed to is occupied. With a union grid
        this may also be True at some points where none is (a superset, one lookup per point): forward gives
        those zero density, so rendering is unchanged."""
        if (lookup := self.grid_lookup()) is not None:
            return lookup(positions)
        occupied = torch.zeros(positions.shape[0], dtype=torch.bool, device=positions.device)
        for field, index, _ in self.routes(positions):
            occupied[index] |= field.occupied(positions[index])
        return occupied

    def grid_lookup(self) -> GridLookup | None:
        """The union grid over the shared box, where there is one (what `occupied` then reads): the first
        submodule's lookup with the union's mask."""
        if self.occupancy_mask is None:
            return None
        return replace(self.submodules[0].grid_lookup(), mask=self.occupancy_mask)

    def foreground_exit(self, origins: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor | None:
        """The submodules share one foreground box (merge checks): the first one's answer."""
        return self.submodules[0].foreground_exit(origins, dirs)

    def background(self, directions: torch.Tensor, appearance: torch.Tensor) -> torch.Tensor:
        """The mean of the non-empty submodules' backgrounds, (N, 3). The renderer asks for the background
        by direction alone (no point to route), and every submodule has learnt the sky it saw."""
        return torch.stack([field.background(directions, appearance).float() for field in self.submodules]).mean(0)


@dataclass
class ContainerInfo:
    """What a container file says besides the weights."""

    path: Path
    render: RenderConfig  # perturb off: evaluation and rendering
    near: float
    far: float
    altitude_range: tuple[float, float] | None
    dataset: str  # fingerprint of the dataset the submodules were trained on
    n_images: int
    cells: list[int]  # the non-empty cells
    steps: list[int | None]  # training steps per cell, None where empty or missing
    eval_protocol: str = MEGA_NERF  # which val pixels the submodules trained on (dataset.PROTOCOLS)
    val_embeddings_only: bool = False  # whether those val pixels trained only their images' embeddings

    @property
    def bounds(self) -> SceneBounds:
        """Where the submodules were trained to sample rays (near, far, slab): where renders must too."""
        return SceneBounds(self.near, self.far, self.altitude_range)


def inference_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A field's state dict as the container stores it: hash tables in float16 (kept float32 where that
    would overflow), training-only buffers dropped."""
    out = {}
    for key, value in state.items():
        if key.endswith(TRAINING_ONLY):
            continue
        if key.endswith(HALF_SUFFIXES) and value.is_floating_point():
            half = value.half()
            value = half if torch.isfinite(half).all() else value
        out[key] = value.detach().cpu().clone()
    return out


def restore_field(config: dict[str, Any], stored: dict[str, torch.Tensor], device: torch.device | str = "cpu"
                  ) -> Field:
    """Rebuild a field on `device` from its config and an `inference_state`; raises KeyError/RuntimeError on
    mismatch. Made on the device, as the initial values it draws are overwritten (on the host, drawing a 2^22-entry
    table's took 0.35 s a submodule). Hash tables stay float16 as stored: the lookups then move half the bytes
    (and a table fits the GPU's L2 cache better); values are the same as their float32 copies, and lookups
    accumulate in float32."""
    with torch.device(device):
        field = build_field(config)
    state = {}
    for key, own in field.state_dict().items():
        state[key] = torch.zeros_like(own) if key.endswith(TRAINING_ONLY) else stored[key].to(own.dtype)
    field.load_state_dict(state)
    for key, value in stored.items():
        if key.endswith(HALF_SUFFIXES) and value.dtype == torch.float16:
            field.get_parameter(key).data = value.to(device, copy=True)
    return field


def save_container(path: Path, state: dict[str, Any]) -> None:
    """Write a container file atomically. `state` holds every key of the module docstring but version/kind."""
    save_torch_atomic({"version": VERSION, "kind": KIND, **state}, path)


def _read(path: Path) -> dict[str, Any]:
    """A container file's content, with one line for a missing file, a folder, a partition's params.pt or a
    training checkpoint given in its place (each said as what it is), and one of another format or version."""
    if path.is_dir():
        raise UserError(f"{path}: a folder, not a container file (give the .pt that scripts/merge_submodules.py "
                        "wrote)")
    if not path.is_file():
        raise UserError(f"{path}: container file not found (made by scripts/merge_submodules.py)")
    state = load_torch(path, "container file")
    if isinstance(state, dict) and "optimizer" in state:
        raise UserError(f"{path}: a training checkpoint, not a container (merge with scripts/merge_submodules.py)")
    if isinstance(state, dict) and "centroids" in state and "grid_dim" in state and "submodules" not in state:
        raise UserError(f"{path}: a partition's params.pt (from scripts/create_cluster_masks.py), not a container "
                        "(merge the trained cells with scripts/merge_submodules.py)")
    if not isinstance(state, dict) or state.get("kind") != KIND or state.get("version") != VERSION:
        raise UserError(f"{path}: not a container file of this version (expected version {VERSION})")
    return state


def load_container(path: str | Path, device: torch.device | str = "cpu") -> tuple[Container, ContainerInfo]:
    """Read a container file into an eval-mode `Container` on `device`, with one-line errors for a missing,
    truncated, foreign or damaged file."""
    path = Path(path)
    state = _read(path)
    fields: list[Field | None] = []
    for k, entry in enumerate(state["submodules"]):
        try:
            fields.append(None if entry is None else restore_field(entry["field_config"], entry["model"], device))
        except (KeyError, RuntimeError, TypeError) as e:  # running out of memory is a RuntimeError too
            if isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in str(e):
                raise UserError(f"{path}: submodule {k} does not fit in the memory free on {device}") from None
            raise UserError(f"{path}: submodule {k} does not match its field config ({type(e).__name__})") from None
    if all(f is None for f in fields):
        raise UserError(f"{path}: every submodule is empty")
    container = Container(state["centroids"], fields, state["boundary_margin"], state["cluster_2d"])
    scene, render = state["scene"], state["render"]
    altitude = scene["altitude_range"]
    info = ContainerInfo(
        path=path, render=RenderConfig(int(render["samples"]), int(render["fine_samples"]), perturb=False,
                                       bg_samples=int(render.get("bg_samples", 0))),
        near=float(scene["near"]), far=float(scene["far"]),
        altitude_range=None if altitude is None else (float(altitude[0]), float(altitude[1])),
        dataset=state["dataset"], n_images=int(state["n_images"]), cells=container.cells,
        steps=[None if e is None else int(e["step"]) for e in state["submodules"]],
        eval_protocol=state.get("eval_protocol", MEGA_NERF),
        val_embeddings_only=bool(state.get("val_embeddings_only", False)))
    return container.to(device).eval(), info
